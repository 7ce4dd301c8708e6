"""Scratch (GPU): is the block multiplier's cost the M load? The Hopper kernel with M's load
replaced by a constant inside the sub-block (kernels/hopper_exp_const.py, a scratch copy)
against the real one, both over the plain call (Flux 1024², 4 and 36 multiplied key tiles).
The copy: kernels/hopper_fwd.py with ``_multiplier_tile``'s load and return replaced by
``return gl.where(inside, 1.5, 1.0)`` (bench/NOTES.md 41)."""
import statistics

import torch

from iidkern import BlockMultiplier
from iidkern.kernels import hopper_fwd as real, hopper_exp_const as const
from hopper_calls import hopper_call
from bench.timing import paired_ratios
from bench.workloads import DTYPES, SHAPES, random_qkv

shape = SHAPES["flux_1024"]
dev = torch.device("cuda")
q, k, v = random_qkv(shape, DTYPES["bf16"], dev, seed=0)
n = q.shape[2]


def call(mod, mult=None):
    return hopper_call(mod, q, k, v, mult)


for label, m in (("4 tiles", BlockMultiplier(2 * torch.rand(1, 4096, 512, device=dev), 512, 0)),
                 ("36 tiles", BlockMultiplier(2 * torch.rand(1, n, n, device=dev), 0, 0))):
    for name, mod in (("real M load", real), ("constant M", const)):
        r = paired_ratios(call(mod, m), call(real), 1, rounds=3, reps=40)
        print(f"{label:9s} {name:12s} {statistics.median(r):.3f}x plain", flush=True)
