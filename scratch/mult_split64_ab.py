"""Scratch (GPU): SD3 1024² block multiplier on the Hopper kernel with the tail split (the
2-piece plan by default there, and the model's 5 pieces forced) against no split, paired over
the plain call (NOTES.md 69)."""
import torch

import iidkern
from ab_timing import bench_inputs, paired_summary
from bench.workloads import build_workload

dev = torch.device("cuda")
shape, dtype, inputs, n_sets = bench_inputs("sd3_1024")
mult = build_workload(shape, dtype, "block_mult", dev).multiplier
cases = {"split (default)": None, "split 5 pieces": {"tail_split_tiles": 48, "tail_split_pieces": 5},
         "no split": {"tail_split": False}}


def plain(i):
    return iidkern.attention(*inputs[i])


ref = iidkern.attention(*inputs[0], block_multiplier=mult, kernel_options={"tail_split": False}).float()
for label, opts in cases.items():
    def call(i, opts=opts):
        return iidkern.attention(*inputs[i], block_multiplier=mult, kernel_options=opts)
    err = (call(0).float() - ref).abs().max().item()
    print(f"sd3_1024 mult {label:16s} {paired_summary(call, plain, n_sets)} max diff to unsplit {err:.1e}", flush=True)
