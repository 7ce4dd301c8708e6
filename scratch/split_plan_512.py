"""Scratch (GPU): forced tail-split plans at Flux 512² (288 tiles of 12 key tiles on 132 SMs)
against cuDNN, paired CUDA-graph ratios (bench.timing.paired_graph_ratio), bf16 (NOTES.md 60).
The cost model (tail_split.plan_split) picks (24, 4)."""
import torch

import iidkern
from ab_timing import bench_inputs
from bench.implementations import make_impl
from bench.timing import paired_graph_ratio
from bench.workloads import build_workload

shape, dtype, inputs, n_sets = bench_inputs("flux_512")
cudnn = make_impl("sdpa_cudnn", build_workload(shape, dtype, "plain", torch.device("cuda")))


def base(i):
    return cudnn.call(*inputs[i])


plans = [None, "auto"] + [(24, p) for p in (2, 3, 4, 5, 6, 8, 12)] + [(156, 2), (156, 3), (288, 2), (288, 3)]
base(0)
for rep in range(2):
    for plan in plans:
        if plan is None:
            opts = {"tail_split": False}
        elif plan == "auto":
            opts = {}
        else:
            opts = {"tail_split_tiles": plan[0], "tail_split_pieces": plan[1]}

        def call(i, opts=opts):
            return iidkern.attention(*inputs[i], kernel_options=opts)
        call(0)
        print(f"flux_512 pass {rep} plan {str(plan):10s} graph {paired_graph_ratio(call, base, n_sets):.4f}x cudnn",
              flush=True)
