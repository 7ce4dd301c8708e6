"""Scratch (GPU): the Triton kernel's tiles for short plain D=128 calls (launch.SHORT_KEYS_CONFIG)
against cuDNN, paired CUDA-graph ratios (bench.timing.paired_graph_ratio, as the bench's target
table reads them) on the bench's input sets, configs the first sweep (NOTES.md 45,
scratch/short_cfg_sweep.py) left out: 2 stages, 8 warps, register caps (NOTES.md 59)."""
import sys

import torch

import iidkern
from ab_timing import bench_inputs
from bench.implementations import make_impl
from bench.timing import paired_graph_ratio
from bench.workloads import build_workload

configs = [dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),  # the default
           dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
           dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, maxnreg=168),
           dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, maxnreg=168),
           dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3, maxnreg=168),
           dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3),
           dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
           dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
           dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2)]
for name in (sys.argv[1].split(",") if len(sys.argv) > 1 else ["flux_256"]):
    for dt in ("bf16", "fp16"):
        shape, dtype, inputs, n_sets = bench_inputs(name, dt)
        cudnn = make_impl("sdpa_cudnn", build_workload(shape, dtype, "plain", torch.device("cuda")))

        def base(i):
            return cudnn.call(*inputs[i])
        base(0)
        for rep in range(2):
            for cfg in configs:
                def call(i, cfg=cfg):
                    return iidkern.attention(*inputs[i], kernel_options=cfg)
                try:
                    call(0)
                    ratio = paired_graph_ratio(call, base, n_sets)
                except Exception as e:  # noqa: BLE001 - a config that does not compile or fit
                    print(f"{name} {dt} {cfg}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                    continue
                label = " ".join(f"{k}={v}" for k, v in cfg.items())
                print(f"{name} {dt} pass {rep} {label:55s} graph {ratio:.4f}x cudnn", flush=True)
