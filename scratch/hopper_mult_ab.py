"""Scratch (GPU): HeadRouter's block multiplier in the Hopper kernel against the plain call
of the same kernel and the Triton kernel's multiplier call, interleaved rounds; CUDA-graph
ratios beside. Also fp32 vs bf16 values (half the M bytes), and where the multiply sits
(hopper_fwd.MULT_AT, a knob the kernel had for this A/B only: 0 multiply before the PV wait,
1 load before it and multiply after, adopted; NOTES.md 33). Without the knob both rows time the kernel."""
import sys

import torch

import iidkern
from iidkern import BlockMultiplier
from iidkern.kernels import hopper_fwd
from ab_timing import interleaved_ratios
from graph_timing import graph_ms
from bench.workloads import DTYPES, SHAPES, build_workload, random_qkv

shapes = sys.argv[1].split(",") if len(sys.argv) > 1 else ["flux_1024", "flux_edit"]
TRITON = {"hopper": False}
for name in shapes:
    shape = SHAPES[name]
    q, k, v = random_qkv(shape, DTYPES["bf16"], torch.device("cuda"), seed=0)
    w = build_workload(shape, DTYPES["bf16"], "block_mult", torch.device("cuda"))
    m = w.multiplier
    m_bf16 = BlockMultiplier(m.values.to(torch.bfloat16), m.query_start, m.key_start)
    def at(where, mult):
        def call():
            hopper_fwd.MULT_AT = where
            return iidkern.attention(q, k, v, block_multiplier=mult)
        return call
    fns = {
        "hopper": lambda: iidkern.attention(q, k, v),
        "hopper+mult@0": at(0, m),
        "hopper+mult@1": at(1, m),
        "hopper+mult_bf16@1": at(1, m_bf16),
        "triton+mult": lambda: iidkern.attention(q, k, v, block_multiplier=m, kernel_options=TRITON),
    }
    interleaved_ratios(fns, "hopper", rounds=7, label=name)
    base = graph_ms(fns["hopper"])
    for label in list(fns)[1:]:
        print(f"{name:9s} graph {label:17s} {graph_ms(fns[label]) / base:.3f}x hopper (hopper {base:.4f} ms)",
              flush=True)
