"""Scratch (CPU): host cost of a plain call routed to the Hopper kernel, launch stubbed.

The GPU-only pieces are replaced (usable() -> True, the launcher -> no-op); the rest is
iidkern's own Python: validation, routing, allocation, descriptors, launcher key."""
import cProfile, pstats, sys, time
import torch
import iidkern
import iidkern.kernels.launch as L
import iidkern.kernels.hopper_fwd as HF

L._INTERPRET = False
HF.usable = lambda q, k, v, layout: True
HF._is_sm90 = lambda i: True


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *a, **k: None


if "--launcher" not in sys.argv:
    HF._ATTN_HOPPER = _NoLaunch()
q, k, v = (torch.randn(1, 24, 768, 128, dtype=torch.bfloat16) for _ in range(3))
f = lambda: iidkern.attention(q, k, v, backend="triton")
for _ in range(200):
    f()
t0 = time.perf_counter(); n = 5000
for _ in range(n):
    f()
print(f"plain (hopper route, no launch): {1e6 * (time.perf_counter() - t0) / n:.1f} us/call")
if "--profile" in sys.argv:
    pr = cProfile.Profile(); pr.enable()
    for _ in range(2000):
        f()
    pr.disable(); pstats.Stats(pr).sort_stats("tottime").print_stats(25)
