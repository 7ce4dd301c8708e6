"""Scratch (GPU): SD3 1024² (head dim 64) block multiplier and IID probe on the Triton kernel
(default route) and on the Hopper kernel (kernel_options hopper=True), paired over the
default plain call (NOTES.md 68; entry 38 measured the Hopper route before later changes)."""
import sys

import torch

import iidkern
from iidkern.kernels import hopper_fwd
from ab_timing import bench_inputs, paired_summary
from bench.workloads import build_workload

dev = torch.device("cuda")
for name in sys.argv[1].split(",") if len(sys.argv) > 1 else ("sd3_1024",):
    shape, dtype, inputs, n_sets = bench_inputs(name)
    mult = build_workload(shape, dtype, "block_mult", dev).multiplier
    probes = build_workload(shape, dtype, "probe", dev).probes

    cases = {
        "plain hopper": dict(kernel_options={"hopper": True}),
        "mult triton": dict(block_multiplier=mult),
        "mult hopper": dict(block_multiplier=mult, kernel_options={"hopper": True}),
        "iid triton": dict(probes=probes[:1]),
        "iid hopper": dict(probes=probes[:1], kernel_options={"hopper": True}),
        "iid hopper nosplit": dict(probes=probes[:1], kernel_options={"hopper": True, "tail_split": False}),
        "both triton": dict(probes=probes),
        "both hopper": dict(probes=probes, kernel_options={"hopper": True}),
        "both hopper nosplit": dict(probes=probes, kernel_options={"hopper": True, "tail_split": False}),
    }
    for label, kw in cases.items():
        def call(i, kw=kw, label=label):
            # the Hopper kernel serves head dim 64 from LONG_MIN_KEYS keys: lowered for its cases
            hopper_fwd.LONG_MIN_KEYS = 0 if "hopper" in label else 16384
            return iidkern.attention(*inputs[i], **kw)

        def plain(i):
            hopper_fwd.LONG_MIN_KEYS = 16384
            return iidkern.attention(*inputs[i])
        print(f"{name} {label:19s} {paired_summary(call, plain, n_sets)}", flush=True)
