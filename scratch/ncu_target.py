"""Scratch (GPU): one call of a bench workload between cudaProfilerStart/Stop, for ncu
(``ncu --profile-from-start off``). Warm-up calls compile first, outside the profiled range.

    python scratch/ncu_target.py flux_1024 map|iid|both|mult|plain
"""
import sys

import torch

import iidkern
from ab_timing import bench_inputs
from bench.workloads import build_workload

name, mode = sys.argv[1], sys.argv[2]
dev = torch.device("cuda")
shape, dtype, inputs, _ = bench_inputs(name)
q, k, v = inputs[0]
kw = {}
if mode in ("map", "iid", "both"):
    probes = build_workload(shape, dtype, "probe", dev).probes
    kw["probes"] = {"iid": probes[:1], "map": probes[1:], "both": probes}[mode]
elif mode == "mult":
    kw["block_multiplier"] = build_workload(shape, dtype, "block_mult", dev).multiplier
for _ in range(5):
    iidkern.attention(q, k, v, **kw)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
iidkern.attention(q, k, v, **kw)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
