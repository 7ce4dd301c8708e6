"""Scratch (GPU; needs scratch/pair_items.patch applied): branch-pair statistics as items of
the Hopper launch (NOTES.md 47, design a, not adopted) against the separate pass over the
output (``fuse_pair_stats=False``) and the plain call; paired ratios (eager, then graph) over
the plain iidkern call, and (``AB_ERRORS=1``) each path's error against float64 sums."""
import os

import torch

from pair_ab_common import print_pair_errors, print_paired_table
from bench.workloads import SHAPES, Shape
from iidkern.kernels import hopper_fwd

dev = torch.device("cuda")
SEP = {"fuse_pair_stats": False}


if os.environ.get("AB_ERRORS"):
    print_pair_errors({"items": {}, "pass": SEP})
cases = [(SHAPES["flux_1024_b2"], [[0, 1]]),
         (Shape("flux_1024_b4", 4, heads=24, text=512, image=4096, head_dim=128, text_first=True), [[0, 2], [1, 3]]),
         (Shape("flux_edit_b2", 2, heads=24, text=512, image=8192, head_dim=128, text_first=True), [[0, 1]]),
         ]
real_chunks = hopper_fwd.pair_chunks


def comparisons(call, plain):
    def items(i):
        return call(i)

    def separate(i):
        return call(i, kernel_options=SEP)

    def no_items(i):  # the ticket and the stored counts without any item: their own cost
        hopper_fwd.pair_chunks = lambda *args: (64, 0)
        try:
            return call(i)
        finally:
            hopper_fwd.pair_chunks = real_chunks
    return (("items / plain", items, plain), ("separate pass / plain", separate, plain),
            ("ticket+counts / plain", no_items, plain))


print_paired_table(cases, comparisons)
