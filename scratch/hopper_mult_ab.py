"""Scratch (GPU): HeadRouter's block multiplier in the Hopper kernel against the plain call
of the same kernel and the Triton kernel's multiplier call, interleaved rounds; CUDA-graph
ratios beside. Also fp32 vs bf16 values (half the M bytes). NOTES.md 33 also compared where
the multiply sits, through a knob the kernel had for that A/B only (before the PV wait, or
loaded before it and applied after: adopted); the knob is gone, so this times the kernel."""
import sys

import torch

import iidkern
from iidkern import BlockMultiplier
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
    fns = {
        "hopper": lambda: iidkern.attention(q, k, v),
        "hopper+mult": lambda: iidkern.attention(q, k, v, block_multiplier=m),
        "hopper+mult_bf16": lambda: iidkern.attention(q, k, v, block_multiplier=m_bf16),
        "triton+mult": lambda: iidkern.attention(q, k, v, block_multiplier=m, kernel_options=TRITON),
    }
    interleaved_ratios(fns, "hopper", rounds=7, label=name)
    base = graph_ms(fns["hopper"])
    for label in list(fns)[1:]:
        print(f"{name:9s} graph {label:17s} {graph_ms(fns[label]) / base:.3f}x hopper (hopper {base:.4f} ms)",
              flush=True)
