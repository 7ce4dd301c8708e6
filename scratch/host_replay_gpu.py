"""Scratch (GPU): host time per plain call, replayed (kernels/replay.py) or checked, beside SDPA.

Shapes small enough that wall time per call is host time (calls launched back to back, no
sync inside the loop), except where the kernel is as fast as the host path: flux_256's
default route (the Triton kernel's short-key tiles, ~25 us of GPU time) bounds the loop.
Prints one table; pieces of a replayed call below it."""
import importlib
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import iidkern

api = importlib.import_module("iidkern.attention")


def per_call_us(fn, n=3000):
    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        best = min(best, 1e6 * (t1 - t0) / n)
    return best


def cudnn(q, k, v):
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v)


print(f"{'shape':31s} {'sdpa default':>13s} {'sdpa cudnn ctx':>15s} {'iidkern checked':>16s} {'iidkern replay':>15s}")
# flux_256's default route is the Triton kernel's short-key tiles (launch.HOPPER_MIN_KEYS), whose
# GPU time (~25 us) bounds the loop; hopper=True times the Hopper route's host path.
for name, n, d, opts in (("flux_256 hopper=True", 768, 128, {"hopper": True}), ("sd3_256 (Triton, D=64)", 589, 64, None),
                         ("flux_256 hopper=False", 768, 128, {"hopper": False}),
                         ("flux_256 (default: short keys)", 768, 128, None)):
    q, k, v = (torch.randn(1, 24, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    row = [per_call_us(lambda: F.scaled_dot_product_attention(q, k, v)), per_call_us(lambda: cudnn(q, k, v))]
    for replay in (False, True):
        api._REPLAY = replay
        api._REPLAYS.clear()
        row.append(per_call_us(lambda: iidkern.attention(q, k, v, kernel_options=opts)))
    print(f"{name:31s} " + " ".join(f"{x:13.1f} us" for x in row))
    if name == "flux_256 hopper=True":
        rep, = api._REPLAYS.values()
        sig = api._plain_signature
        print("   pieces: signature %.1f us, torch.empty %.1f us, whole replay %.1f us" % (
            per_call_us(lambda: sig(q, k, v, "bhnd", None, "auto", None)),
            per_call_us(lambda: torch.empty(q.shape, dtype=q.dtype, device=q.device)),
            per_call_us(lambda: rep(q, k, v))))
