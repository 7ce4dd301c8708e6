"""Scratch (GPU): the block multiplier as HeadRouterPolicy passed it in scratch/mult_offset.patch
(offset + 16-bit deviations, NOTES.md 72; apply the patch to run this) against fp32 values and plain
16-bit values, paired over the plain call, with each variant's max error against the fp32 reference."""
import sys

import torch

import iidkern
from ab_timing import bench_inputs, paired_summary
from bench.workloads import build_workload
from iidkern import BlockMultiplier
from iidkern.reference import attention_reference

dev = torch.device("cuda")
for name in sys.argv[1].split(","):
    shape, dtype, inputs, n_sets = bench_inputs(name)
    m32 = build_workload(shape, dtype, "block_mult", dev).multiplier
    hr = build_workload(shape, dtype, "block_mult_hr", dev).multiplier
    m16 = BlockMultiplier(m32.values.to(dtype), query_start=m32.query_start, key_start=m32.key_start)
    odd = BlockMultiplier(hr.values, query_start=hr.query_start, key_start=hr.key_start, offset=0.7)  # folded
    q, k, v = inputs[0]
    cases = {"fp32 M": m32, "16-bit M": m16, "offset + 16-bit dev": hr, "offset 0.7 (folded)": odd}

    def plain(i):
        return iidkern.attention(*inputs[i])
    for label, mult in cases.items():
        ref = attention_reference(q, k, v, block_multiplier=mult, compute_dtype=torch.float32).out
        err = (iidkern.attention(q, k, v, block_multiplier=mult).float() - ref).abs().max().item()

        def call(i, mult=mult):
            return iidkern.attention(*inputs[i], block_multiplier=mult)
        print(f"{name:10s} {label:22s} {paired_summary(call, plain, n_sets)} err {err:.2e}", flush=True)
