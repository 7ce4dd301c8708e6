"""Scratch: Python host cost of one iidkern.attention call, kernels replaced by no-ops (CPU).

Measures validation, argument packing and tile-list lookup: the part of a call's latency that
is ours rather than Triton's launcher or the GPU."""
import sys, time, cProfile, pstats
import torch
import iidkern
import iidkern.kernels.launch as L
from iidkern import Probe, TokenGroups as TG, BlockMultiplier


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *a, **k: None


# The launch.py launchers (the kernels are reached through them since NOTES.md 18).
for name in ("_ATTN", "_PROBE", "_PAIR_STATS"):
    setattr(L, name, _NoLaunch())

h, nt, ni, d = 24, 333, 4096, 64
n = nt + ni
q, k, v = (torch.randn(1, n, h, d, dtype=torch.bfloat16) for _ in range(3))
qt = torch.zeros(1, n, dtype=torch.int64); qt[:, : n // 2] = 1; qt[:, n // 2:] = 2
tm = iidkern.tag_mask(qt, qt)
instr = [(0, 100), (100, 200), (200, 300)]
probes = (Probe(TG.each(nt, n), TG.segments(instr, n), heads="keep"), Probe(TG.each(0, nt), TG.each(nt, n), heads="mean"))
mult = BlockMultiplier(torch.rand(1, ni, nt), query_start=nt, key_start=0)
cases = {
    "plain": {},
    "tags": dict(tags=tm),
    "probes": dict(probes=probes),
    "head_w": dict(head_weights=torch.rand(h)),
    "mult": dict(block_multiplier=mult),
}
for cname, kw in cases.items():
    f = lambda: iidkern.attention(q, k, v, layout="bnhd", backend="triton", **kw)
    for _ in range(20):
        f()
    t0 = time.perf_counter(); reps = 500
    for _ in range(reps):
        f()
    print(f"{cname:8s} {1e6 * (time.perf_counter() - t0) / reps:7.1f} us per call (host, no kernels)")
if len(sys.argv) > 1:
    kw = cases[sys.argv[1]]
    pr = cProfile.Profile(); pr.enable()
    for _ in range(300):
        iidkern.attention(q, k, v, layout="bnhd", backend="triton", **kw)
    pr.disable(); pstats.Stats(pr).sort_stats("tottime").print_stats(18)
