"""Scratch (GPU): fused pair statistics (scratch/pair_fused.patch) against the separate pass
and the plain call, paired ratios over the plain iidkern call; and the plain Hopper kernel
before the patch (``kernels/hopper_prev.py`` = ``git show HEAD:kernels/hopper_fwd.py``) against
after (the batch0 argument). Also each pass's relative error against float64 sums."""
import statistics
import sys

import torch

import iidkern
from iidkern.kernels import hopper_fwd as new, hopper_prev as old
from hopper_calls import hopper_call
from bench.timing import paired_ratios
from bench.workloads import DTYPES, SHAPES, Shape, random_qkv

dev = torch.device("cuda")
cases = [(SHAPES["flux_1024_b2"], [[0, 1]]),
         (Shape("flux_1024_b4", 4, heads=24, text=512, image=4096, head_dim=128, text_first=True), [[0, 2], [1, 3]]),
         (Shape("flux_512_b2", 2, heads=24, text=512, image=1024, head_dim=128, text_first=True), [[0, 1]])]
real_fusable = new.pairs_fusable


def separate_pass(flag):
    new.pairs_fusable = real_fusable if not flag else (lambda pairs: False)


for shape, pairs in cases:
    sets = [random_qkv(shape, DTYPES["bf16"], dev, seed=s) for s in range(2)]
    pt = torch.tensor(pairs, dtype=torch.int64)
    out = iidkern.attention(*sets[0]).double()
    d = torch.stack([(out[a] * out[b]).sum((-1, -2)) for a, b in pairs])
    for flag in (False, True):
        separate_pass(flag)
        s = iidkern.attention(*sets[0], pair_stats=pt).pair_stats
        err = ((s.dot.double() - d).abs().max() / d.abs().max()).item()
        print(f"{shape.name} {'separate' if flag else 'fused'} dot rel err {err:.1e}", flush=True)

    def plain(i):
        return iidkern.attention(*sets[i])

    def fused(i):
        separate_pass(False)
        return iidkern.attention(*sets[i], pair_stats=pt)

    def separate(i):
        separate_pass(True)
        return iidkern.attention(*sets[i], pair_stats=pt)
    olds = [hopper_call(old, *s) for s in sets]
    news = [hopper_call(new, *s) for s in sets]
    for label, fn, base in (("new plain kernel / old plain kernel", lambda i: news[i](), lambda i: olds[i]()),
                            ("fused pair stats / plain", fused, plain),
                            ("separate pass / plain", separate, plain),
                            ("fused / separate", fused, separate)):
        r = paired_ratios(fn, base, 2, rounds=3, reps=40)
        print(f"{shape.name:13s} {label:38s} {statistics.median(r):.3f}x (rounds {min(r):.3f}-{max(r):.3f})", flush=True)
    separate_pass(False)
