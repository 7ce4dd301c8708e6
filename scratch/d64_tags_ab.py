"""Scratch (GPU): where the D=64 (Triton kernel) tag call's 0%-skipped overhead comes from.
SD3 1024² has 4429 tokens, so the last 64-key tile is ragged and, by the tile rules, partial
for every query tile (one masked list iteration beside the run of 69 full tiles); at 4416
tokens (320 text) every tile is full and only the run loop executes. Paired ratios over the
plain call of the same shape (bench.timing.paired_ratios), tags built like the bench's."""
import statistics

import torch

import iidkern
from bench.timing import paired_graph_ratio, paired_ratios
from bench.workloads import Shape, build_workload, random_qkv

dev, dtype = torch.device("cuda"), torch.bfloat16
for text in (333, 320):
    shape = Shape(f"sd3_{text}", 1, heads=24, text=text, image=4096, head_dim=64, text_first=False)
    sets = [random_qkv(shape, dtype, dev, seed=s)[:3] for s in range(2)]
    for feature in ("tags_0", "tags_50"):
        kw = build_workload(shape, dtype, feature, dev).iidkern_kwargs()

        def tagged(i, kw=kw):
            return iidkern.attention(*sets[i], **kw)

        def plain(i):
            return iidkern.attention(*sets[i])
        r = paired_ratios(tagged, plain, 2, rounds=3, reps=40)
        g = paired_graph_ratio(tagged, plain, 2)
        print(f"{shape.name} ({shape.tokens} tokens) {feature}: {statistics.median(r):.4f}x plain "
              f"(rounds {min(r):.3f}-{max(r):.3f}) graph {g:.4f}x", flush=True)
