"""Scratch (GPU): host time per call (CPU loop, no sync inside) of the Hopper path and the
Triton path at a tiny shape, where the GPU work is far shorter than the launch."""
import time
import torch
import iidkern

for dt in (torch.bfloat16,):
    q, k, v = (torch.randn(1, 24, 768, 128, device="cuda", dtype=dt) for _ in range(3))
    for name, opts in (("hopper", None), ("triton", {"hopper": False})):
        for _ in range(20):
            iidkern.attention(q, k, v, kernel_options=opts)
        torch.cuda.synchronize()
        n = 300
        t0 = time.perf_counter()
        for _ in range(n):
            iidkern.attention(q, k, v, kernel_options=opts)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        print(f"{name}: host {1e6 * (t1 - t0) / n:.1f} us/call, with GPU {1e6 * (t2 - t0) / n:.1f} us/call")

# GPU time without the host: CUDA-graph replay of 20 calls, per call (median of 30 replays)
from graph_timing import graph_ms  # scratch/graph_timing.py
from bench.workloads import SHAPES, random_qkv
for name in ("flux_256", "flux_512", "flux_1024"):
    q, k, v = random_qkv(SHAPES[name], torch.bfloat16, torch.device("cuda"), seed=0)
    fns = (("cudnn", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)),
           ("hopper", lambda: iidkern.attention(q, k, v)),
           ("triton", lambda: iidkern.attention(q, k, v, kernel_options={"hopper": False})))
    print(name, "graph:", ", ".join(f"{label} {1000 * graph_ms(fn, calls=20, reps=30):.1f} us" for label, fn in fns))
