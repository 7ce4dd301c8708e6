"""Scratch (GPU): the pair-statistics pass overlapped with the Hopper kernel's last wave
(programmatic dependent launch, per-head stored counts; NOTES.md 47, design b; needs
scratch/pair_overlap.patch applied) against the pass after
the whole grid (``overlap_pair_stats=False``) and the plain call: paired ratios (eager, then
graph) over the plain iidkern call, and each path's error against float64 sums."""
import os

import torch

from pair_ab_common import print_pair_errors, print_paired_table
from bench.workloads import SHAPES, Shape
from iidkern.kernels import launch

dev = torch.device("cuda")
SEP = {"overlap_pair_stats": False}


if os.environ.get("AB_ERRORS", "1") == "1":
    print_pair_errors({"overlapped": {}, "after": SEP})
    launch.PAIR_OVERLAP = "grid"
    print_pair_errors({"overlapped": {}, "after": SEP})
    launch.PAIR_OVERLAP = "counts"
cases = [(SHAPES["flux_1024_b2"], [[0, 1]]),
         (Shape("flux_1024_b4", 4, heads=24, text=512, image=4096, head_dim=128, text_first=True), [[0, 2], [1, 3]]),
         (Shape("flux_edit_b2", 2, heads=24, text=512, image=8192, head_dim=128, text_first=True), [[0, 1]])]


def comparisons(call, plain):
    def overlapped(i):
        return call(i)

    def after(i):
        return call(i, kernel_options=SEP)

    def grid(i):
        launch.PAIR_OVERLAP = "grid"
        try:
            return call(i)
        finally:
            launch.PAIR_OVERLAP = "counts"
    return (("overlapped / plain", overlapped, plain), ("after grid / plain", after, plain),
            ("pdl grid wait / plain", grid, plain), ("pdl grid wait / after", grid, after))


print_paired_table(cases, comparisons)
