"""Scratch (GPU): the Triton kernel's tiles for short plain D=128 calls (launch.SHORT_KEYS_CONFIG),
graph replays against cuDNN at Flux 256² (bf16, fp16) and at 512 / 896 keys (bf16), two passes
in turn, best pass (ms)."""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import iidkern
from graph_timing import graph_ms

configs = [(64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 4, 5), (64, 32, 4, 3), (64, 32, 4, 4), (32, 64, 4, 3),
           (32, 64, 2, 3), (64, 64, 2, 3), (32, 32, 2, 3), (128, 32, 4, 3), (64, 128, 4, 2), (32, 128, 4, 3),
           (64, 32, 2, 4), (32, 32, 4, 4)]
for n, dt in ((768, torch.bfloat16), (768, torch.float16), (512, torch.bfloat16), (896, torch.bfloat16)):
    q, k, v = (torch.randn(1, 24, n, 128, device="cuda", dtype=dt) for _ in range(3))

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    cases = {"cudnn": cudnn, "hopper": lambda: iidkern.attention(q, k, v, kernel_options={"hopper": True})}
    for bm, bn, w, s in configs:
        opts = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
        cases[f"m{bm} n{bn} w{w} s{s}"] = (lambda o=opts: iidkern.attention(q, k, v, kernel_options=o))
    times = {label: [] for label in cases}
    for _ in range(2):
        for label, fn in cases.items():
            try:
                times[label].append(graph_ms(fn, calls=20, reps=11))
            except Exception:
                times[label].append(float("nan"))
    base = min(times["cudnn"])
    for label, t in sorted(times.items(), key=lambda kv: min(kv[1]))[:8]:
        print(f"N={n} {str(dt)[6:]} {label:16s} {min(t) * 1000:6.2f} us {min(t) / base:.3f}x cudnn", flush=True)
