"""Scratch (CPU): host cost of a plain call with and without the launch replay (kernels/replay.py).

The kernels' launchers get stand-in kernels whose compiled kernel does nothing, so what is
timed is iidkern's Python plus the launcher; the Hopper route is forced (usable() -> True).
Usage: python scratch/host_replay.py [--profile]"""
import sys, time, cProfile, pstats
import torch
import iidkern
from iidkern.kernels import fast_launch, launch as L, hopper_fwd as HF

A = sys.modules["iidkern.attention"]
L._INTERPRET = False
import iidkern.kernels as K
K.INTERPRETING = True  # lets CPU tensors past the "needs CUDA" check


class _Compiled:
    def __getitem__(self, grid):
        return lambda *args: None


class _StandIn:
    def __init__(self, kernel):
        self.params = kernel.params

    def __getitem__(self, grid):
        return lambda *args, **kwargs: _Compiled()


def stand_in(launcher):
    launcher.kernel = _StandIn(launcher.kernel)
    launcher.enabled = True
    launcher._cache = {}


stand_in(L._ATTN)
if HF.AVAILABLE:
    stand_in(HF._ATTN_HOPPER)
    HF.usable = lambda q, k, v, layout: q.shape[-1] == 128
    HF._is_sm90 = lambda i: True


def timed(f, n=4000):
    for _ in range(200):
        f()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return 1e6 * (time.perf_counter() - t0) / n


cases = {"sd3_256 (Triton, D=64)": (589, 64), "flux_256 (Hopper, D=128)": (768, 128)}
for name, (n, d) in cases.items():
    if d == 128 and not HF.AVAILABLE:
        continue
    q, k, v = (torch.randn(1, n, 24, d, dtype=torch.bfloat16) for _ in range(3))
    f = lambda: iidkern.attention(q, k, v, layout="bnhd", backend="triton")
    row = []
    for replay in (False, True):
        A._REPLAY = replay
        A._REPLAYS.clear()
        row.append(min(timed(f) for _ in range(3)))
    print(f"{name:26s} checked path {row[0]:6.1f} us   replay {row[1]:6.1f} us")
    if "--profile" in sys.argv:
        pr = cProfile.Profile(); pr.enable()
        for _ in range(3000):
            f()
        pr.disable(); pstats.Stats(pr).sort_stats("tottime").print_stats(12)
