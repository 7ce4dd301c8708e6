"""Scratch (GPU): at the short D=128 shapes (Flux 256² / 512², where the Hopper kernel's
128-row programs leave a partial second wave), the Triton kernel's tile configs against the
Hopper kernel and cuDNN, graph replays (median ms), two passes in turn."""
import itertools

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import iidkern
from graph_timing import graph_ms
from bench.workloads import DTYPES, SHAPES, random_qkv

configs = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
           for bm, bn, w, s in itertools.product((64, 128), (64, 128), (4, 8), (2, 3))]
for name in ("flux_256", "flux_512"):
    for dt in ("bf16", "fp16"):
        q, k, v = random_qkv(SHAPES[name], DTYPES[dt], torch.device("cuda"), seed=0)
        ref = iidkern.attention(q, k, v)

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        cases = {"cudnn": cudnn, "hopper": lambda: iidkern.attention(q, k, v, kernel_options={"hopper": True})}
        for c in configs:
            label = "triton m{BLOCK_M} n{BLOCK_N} w{num_warps} s{num_stages}".format(**c)
            cases[label] = (lambda c=c: iidkern.attention(q, k, v, kernel_options=c))
        times = {label: [] for label in cases}
        for _ in range(2):
            for label, fn in cases.items():
                try:
                    times[label].append(graph_ms(fn, calls=20, reps=11))
                except Exception:  # a config that does not fit (shared memory)
                    times[label].append(float("nan"))
        base = min(times["cudnn"])
        for label, t in sorted(times.items(), key=lambda kv: min(kv[1])):
            print(f"{name} {dt} {label:28s} {min(t) * 1000:7.2f} us  {min(t) / base:.3f}x cudnn", flush=True)
        err = (iidkern.attention(q, k, v, kernel_options=configs[0]).float() - ref.float()).abs().max().item()
        print(f"{name} {dt} triton vs hopper max abs diff {err:.2e}", flush=True)
