"""Scratch (GPU): the block multiplier staged in shared memory by TMA (separate K and V rings,
a fourth partition loading M) against the kernel it was built on (M read from global memory by
the consumers, one joint K/V ring), paired ratios over that kernel's plain call; plus the plain
calls of both (the ring change). Measured and reverted (bench/NOTES.md 41). To rerun:
``git show HEAD:kernels/hopper_fwd.py > kernels/hopper_prev.py; git apply scratch/mult_staged.patch``
(the patch also holds the staged variant's tests), then ``bash scratch/device_mult.sh`` on the device."""
import statistics
import sys

import torch

from iidkern import BlockMultiplier
from iidkern.kernels import hopper_fwd as new, hopper_prev as old
from hopper_calls import hopper_call
from bench.timing import paired_ratios
from bench.workloads import DTYPES, SHAPES, build_workload, random_qkv

shapes = sys.argv[1].split(",") if len(sys.argv) > 1 else ["flux_1024", "flux_edit"]
for name in shapes:
    shape = SHAPES[name]
    dev = torch.device("cuda")
    q, k, v = random_qkv(shape, DTYPES["bf16"], dev, seed=0)
    m = build_workload(shape, DTYPES["bf16"], "block_mult", dev).multiplier
    m16 = BlockMultiplier(m.values.to(torch.bfloat16), m.query_start, m.key_start)
    one = BlockMultiplier(m.values[..., :128].contiguous(), m.query_start, m.key_start)
    one16 = BlockMultiplier(one.values.to(torch.bfloat16), m.query_start, m.key_start)

    def call(mod, mult=None):
        return hopper_call(mod, q, k, v, mult)
    cases = {"new plain": call(new)}
    for label, mult in (("4 tiles fp32", m), ("4 tiles bf16", m16), ("1 tile fp32", one), ("1 tile bf16", one16)):
        cases[f"old {label}"] = call(old, mult)
        cases[f"new {label} (staged)"] = call(new, mult)
    for label in ("4 tiles fp32", "4 tiles bf16"):
        ref = cases[f"old {label}"]().float()
        got = cases[f"new {label} (staged)"]().float()
        print(f"{name} {label}: staged vs old rel diff {((got - ref).norm() / ref.norm()).item():.2e}", flush=True)
    base = call(old)
    for label, fn in cases.items():
        r = paired_ratios(fn, base, 1, rounds=3, reps=40)
        print(f"{name:9s} {label:26s} {statistics.median(r):.3f}x old plain (rounds {min(r):.3f}-{max(r):.3f})",
              flush=True)
