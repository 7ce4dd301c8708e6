"""Scratch (GPU): the list-free tag path's ragged last tile (SD3 1024², 4429 keys) as the
0/1-tile loop (mode 0), inlined under a run-time if (1), or inlined and always run with the
tag mask (2; correct only without lists). Paired ratios over the plain call."""
import statistics

import torch

import iidkern
from bench.timing import paired_graph_ratio, paired_ratios
from bench.workloads import Shape, build_workload, random_qkv
from iidkern.kernels import launch

dev, dtype = torch.device("cuda"), torch.bfloat16
real = launch._ATTN


class Inject:
    mode = 0

    def __getitem__(self, grid):
        run = real[grid]
        return lambda *a, **kw: run(*a, **kw, RAGGED_INLINE=Inject.mode)


launch._ATTN = Inject()
shape = Shape("sd3_1024", 1, heads=24, text=333, image=4096, head_dim=64, text_first=False)
sets = [random_qkv(shape, dtype, dev, seed=s)[:3] for s in range(2)]


def plain(i):
    return iidkern.attention(*sets[i])


for feature in ("tags_0", "tags_50", "tags_75"):
    w = build_workload(shape, dtype, feature, dev)
    kw = w.iidkern_kwargs()
    ref = iidkern.attention(*sets[0], backend="reference", tags=(w.q_tags, w.k_tags)).float()
    for mode in (0, 1, 2, 0):
        Inject.mode = mode

        def tagged(i, kw=kw):
            return iidkern.attention(*sets[i], **kw)
        err = ((tagged(0).float() - ref).abs().max() / ref.abs().max()).item()
        r = paired_ratios(tagged, plain, 2, rounds=3, reps=40)
        g = paired_graph_ratio(tagged, plain, 2)
        print(f"{feature:8s} mode {mode}: {statistics.median(r):.4f}x ({min(r):.3f}-{max(r):.3f}) graph {g:.4f}x "
              f"err {err:.1e}", flush=True)
