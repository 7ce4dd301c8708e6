"""Scratch (GPU): the block multiplier's M load issued at the start of the turn (before the S
wait; kernels/hopper_exp.py, a scratch copy) against the kernel's (after the softmax), paired
over the plain call, fp32 and bf16 values, Flux 1024² and Flux-edit (bench/NOTES.md 41: 1.5x,
reverted). The copy: kernels/hopper_fwd.py with ``_turn``'s multiplier load moved to just after
``mbarrier.arrive(turn_bar...)``, masked by the tile's span test, and the multiply after the PV wait."""
import statistics
import sys

import torch

from iidkern import BlockMultiplier
from iidkern.kernels import hopper_fwd as cur, hopper_exp as exp
from hopper_calls import hopper_call
from bench.timing import paired_ratios
from bench.workloads import DTYPES, SHAPES, build_workload, random_qkv

for name in (sys.argv[1].split(",") if len(sys.argv) > 1 else ["flux_1024", "flux_edit"]):
    shape = SHAPES[name]
    dev = torch.device("cuda")
    q, k, v = random_qkv(shape, DTYPES["bf16"], dev, seed=0)
    m = build_workload(shape, DTYPES["bf16"], "block_mult", dev).multiplier
    m16 = BlockMultiplier(m.values.to(torch.bfloat16), m.query_start, m.key_start)

    def call(mod, mult=None):
        return hopper_call(mod, q, k, v, mult)
    for label, mult in (("fp32", m), ("bf16", m16)):
        ref, got = call(cur, mult)().float(), call(exp, mult)().float()
        print(f"{name} {label}: early vs current rel diff {((got - ref).norm() / ref.norm()).item():.2e}", flush=True)
    base = call(cur)
    for label, fn in (("current fp32", call(cur, m)), ("early fp32", call(exp, m)),
                      ("current bf16", call(cur, m16)), ("early bf16", call(exp, m16))):
        r = paired_ratios(fn, base, 1, rounds=3, reps=40)
        print(f"{name:9s} {label:14s} {statistics.median(r):.3f}x plain (rounds {min(r):.3f}-{max(r):.3f})", flush=True)
