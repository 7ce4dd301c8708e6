"""Scratch (GPU): the block multiplier with 16-bit values (the inputs' dtype), split with the
last wave at head dim 128, against fp32 values (whole tiles) and 16-bit values unsplit, paired
over the plain call (NOTES.md 71)."""
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
    m16 = BlockMultiplier(m32.values.to(dtype), query_start=m32.query_start, key_start=m32.key_start)
    q, k, v = inputs[0]
    cases = {"fp32 M (whole tiles)": (m32, None), "16-bit M unsplit": (m16, {"tail_split": False}),
             "16-bit M split": (m16, None)}
    if "--hw" in sys.argv:  # HeadRouter's calls may carry head weights beside the multiplier
        hw = 1.0 + 0.2 * torch.rand(shape.batch, shape.heads, device=dev)
        cases = {"16-bit M unsplit + hw": (m16, {"tail_split": False}), "16-bit M split + hw": (m16, None)}

    def plain(i):
        return iidkern.attention(*inputs[i])
    for label, (mult, opts) in cases.items():
        extra = {"head_weights": hw} if "--hw" in sys.argv else {}
        ref = attention_reference(q, k, v, block_multiplier=mult, compute_dtype=torch.float32, **extra).out
        err = (iidkern.attention(q, k, v, block_multiplier=mult, kernel_options=opts, **extra).float()
               - ref).abs().max().item()

        def call(i, mult=mult, opts=opts):
            return iidkern.attention(*inputs[i], block_multiplier=mult, kernel_options=opts, **extra)
        print(f"{name:10s} {label:22s} {paired_summary(call, plain, n_sets)} err {err:.2e}", flush=True)
