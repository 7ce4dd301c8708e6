"""Scratch (GPU; needs scratch/pair_items.patch applied): branch-pair statistics as items of
the Hopper launch (NOTES.md 47, design a, not adopted) against
the separate pass over the output (``fuse_pair_stats=False``) and the plain call; paired
ratios (eager, then graph) over the plain iidkern call, and each path's error against
float64 sums on random pairs, both layouts."""
import statistics

import torch

import iidkern
from bench.timing import paired_graph_ratio, paired_ratios
from bench.workloads import DTYPES, SHAPES, Shape, random_qkv
from iidkern.kernels import hopper_fwd

dev = torch.device("cuda")
SEP = {"fuse_pair_stats": False}


def errors():
    g = torch.Generator().manual_seed(3)
    for b, h, n, pairs in ((2, 3, 1000, [[0, 1]]), (4, 5, 777, [[3, 0], [1, 2]]), (3, 2, 4100, [[2, 2], [0, 1]]),
                           (5, 4, 300, [[4, 1], [1, 3], [0, 2], [2, 4]])):
        for layout in ("bhnd", "bnhd"):
            shape = (b, h, n, 128) if layout == "bhnd" else (b, n, h, 128)
            q, k, v = (torch.randn(shape, generator=g).to(dev, torch.bfloat16) for _ in range(3))
            res = iidkern.attention(q, k, v, layout=layout, pair_stats=pairs, kernel_options={"poison": True})
            sep = iidkern.attention(q, k, v, layout=layout, pair_stats=pairs, kernel_options=dict(SEP, poison=True))
            o = res.out.double() if layout == "bhnd" else res.out.double().transpose(1, 2)
            want = torch.stack([(o[a] * o[c]).sum((-1, -2)) for a, c in pairs])
            n0 = torch.stack([(o[a] * o[a]).sum((-1, -2)) for a, c in pairs])
            for name, s in (("items", res.pair_stats), ("pass", sep.pair_stats)):
                e = max(((s.dot.double() - want).abs().max() / want.abs().max()).item(),
                        ((s.norm0_sq.double() - n0).abs().max() / n0.abs().max()).item())
                print(f"B={b} H={h} N={n} {layout} pairs={pairs} {name}: rel err {e:.1e}", flush=True)


import os
if os.environ.get('AB_ERRORS'):
    errors()
cases = [(SHAPES["flux_1024_b2"], [[0, 1]]),
         (Shape("flux_1024_b4", 4, heads=24, text=512, image=4096, head_dim=128, text_first=True), [[0, 2], [1, 3]]),
         (Shape("flux_edit_b2", 2, heads=24, text=512, image=8192, head_dim=128, text_first=True), [[0, 1]]),
         ]
real_chunks = hopper_fwd.pair_chunks
for shape, pairs in cases:
    sets = [random_qkv(shape, DTYPES["bf16"], dev, seed=s) for s in range(2)]
    pt = torch.tensor(pairs, dtype=torch.int64)

    def plain(i):
        return iidkern.attention(*sets[i])

    def items(i):
        return iidkern.attention(*sets[i], pair_stats=pt)

    def separate(i):
        return iidkern.attention(*sets[i], pair_stats=pt, kernel_options=SEP)
    def no_items(i):  # the ticket and the stored counts without any item: their own cost
        hopper_fwd.pair_chunks = lambda *args: (64, 0)
        try:
            return iidkern.attention(*sets[i], pair_stats=pt)
        finally:
            hopper_fwd.pair_chunks = real_chunks
    for label, fn, base in (("items / plain", items, plain), ("separate pass / plain", separate, plain),
                            ("ticket+counts / plain", no_items, plain)):
        r = paired_ratios(fn, base, 2, rounds=3, reps=40)
        gr = paired_graph_ratio(fn, base, 2)
        print(f"{shape.name:13s} {label:24s} {statistics.median(r):.4f}x (rounds {min(r):.3f}-{max(r):.3f}) "
              f"graph {gr:.4f}x", flush=True)
