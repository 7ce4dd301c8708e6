"""Scratch (GPU): what the tail split's join pass costs (bench/NOTES.md 62). Paired graph
ratios over cuDNN (and eager paired ratios) of plain calls: unsplit, split with the join as
shipped, with the join under other program shapes (tail_split.COMBINE_VALUES_PER_WARP /
COMBINE_WARPS), and split with the join launch skipped (wrong rows in the split tiles:
timing only). Replays off, so that the switches take effect on every call.
First the split's exactness against float32 SDPA (scratch/tail_split_ab.exactness)."""
import os
import statistics

os.environ["IIDKERN_REPLAY"] = "0"
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import iidkern
from bench.timing import paired_graph_ratio, paired_ratios
from bench.workloads import DTYPES, SHAPES, random_qkv
from iidkern.kernels import hopper_fwd, tail_split


class _NoJoin:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


dev = torch.device("cuda")
shipped = hopper_fwd._COMBINE
if os.environ.get("EXACT", "1") == "1":
    from tail_split_ab import exactness
    exactness(dev)
for name in os.environ.get("SHAPES", "flux_512,flux_1024,flux_1024_b2").split(","):
    sets = [random_qkv(SHAPES[name], DTYPES["bf16"], dev, seed=s) for s in range(2)]

    def cudnn(i):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(*sets[i])
    variants = [("unsplit", {"tail_split": False}, None), ("split, no join", None, "skip")]
    for _ in range(2):
        variants += [(f"join {cfg}", None, cfg) for cfg in ((2048, 1), (1024, 1), (4096, 1), (4096, 2))]
    for label, opts, cfg in variants:
        hopper_fwd._COMBINE = _NoJoin() if cfg == "skip" else shipped
        if isinstance(cfg, tuple):
            tail_split.COMBINE_VALUES_PER_WARP, tail_split.COMBINE_WARPS = cfg

        def ours(i, opts=opts):
            return iidkern.attention(*sets[i], kernel_options=opts)
        grs = [paired_graph_ratio(ours, cudnn, 2) for _ in range(3)]
        r = paired_ratios(ours, cudnn, 2, rounds=3, reps=40)
        print(f"{name:13s} {label:15s} graph {statistics.median(grs):.4f}x cuDNN ({min(grs):.3f}-{max(grs):.3f}) "
              f"paired {statistics.median(r):.4f}x", flush=True)
    hopper_fwd._COMBINE = shipped
    tail_split.COMBINE_VALUES_PER_WARP, tail_split.COMBINE_WARPS = 2048, 1
