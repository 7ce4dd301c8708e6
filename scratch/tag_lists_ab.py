"""Scratch (GPU): the Triton kernel's tag path without its list loops (tiles.TileLists.has_lists,
NOTES.md 54) against the same masks with the loops compiled in (has_lists forced True), at
SD3 1024² (D=64, 4429 keys: a ragged last tile) and at 4416 keys. Paired ratios over the
plain call of the same shape (bench.timing), tags built like the bench's."""
import statistics

import torch

import iidkern
from bench.timing import paired_graph_ratio, paired_ratios
from bench.workloads import Shape, build_workload, random_qkv
from iidkern.kernels.launch import default_config

dev, dtype = torch.device("cuda"), torch.bfloat16
cfg = default_config(64, dtype)
for text in (333, 320):
    shape = Shape(f"sd3_{text}", 1, heads=24, text=text, image=4096, head_dim=64, text_first=False)
    sets = [random_qkv(shape, dtype, dev, seed=s)[:3] for s in range(2)]

    def plain(i):
        return iidkern.attention(*sets[i])
    for feature in ("tags_0", "tags_50", "tags_75", "tags_iid"):
        rows = []
        for forced in (False, True):
            w = build_workload(shape, dtype, feature, dev)
            lists = w.tag_mask.tile_lists(cfg["BLOCK_M"], cfg["BLOCK_N"], shape.batch)
            auto = lists.has_lists
            if forced:
                lists.has_lists = True
            kw = w.iidkern_kwargs()

            def tagged(i, kw=kw):
                return iidkern.attention(*sets[i], **kw)
            ref = iidkern.attention(*sets[0], backend="reference", tags=(w.q_tags, w.k_tags))
            err = ((tagged(0).float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            r = paired_ratios(tagged, plain, 2, rounds=3, reps=40)
            g = paired_graph_ratio(tagged, plain, 2)
            rows.append(f"{'lists' if forced else 'auto ':5s} (has_lists {lists.has_lists}, auto {auto}) "
                        f"{statistics.median(r):.4f}x ({min(r):.3f}-{max(r):.3f}) graph {g:.4f}x err {err:.1e}")
        for row in rows:
            print(f"{shape.name} ({shape.tokens}) {feature:8s} {row}", flush=True)
