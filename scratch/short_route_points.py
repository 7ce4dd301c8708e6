"""Scratch (GPU): where the Triton kernel's 64x64 tiles (4 warps, 3 stages) beat the Hopper
kernel on plain D=128 calls: graph replays over sequence length, batch and heads (bf16)."""
import torch

import iidkern
from graph_timing import graph_ms

SHORT = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
for b, h, n in [(1, 24, 512), (1, 24, 768), (1, 24, 896), (1, 24, 1024), (1, 24, 1152), (1, 24, 1280),
                (1, 24, 1536), (2, 24, 768), (4, 24, 768), (2, 24, 1024), (1, 8, 768), (1, 8, 1536),
                (1, 8, 2048), (1, 48, 768), (1, 24, 300)]:
    q, k, v = (torch.randn(b, h, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    hop = lambda: iidkern.attention(q, k, v, kernel_options={"hopper": True})
    tri = lambda: iidkern.attention(q, k, v, kernel_options=SHORT)
    th, tt = [], []
    for _ in range(3):
        th.append(graph_ms(hop, calls=20, reps=11))
        tt.append(graph_ms(tri, calls=20, reps=11))
    th, tt = min(th), min(tt)
    print(f"B={b} H={h} N={n:5d} hopper {th * 1000:7.2f} us triton64 {tt * 1000:7.2f} us ratio {tt / th:.3f} "
          f"hopper programs {b * h * -(-n // 128)}", flush=True)
