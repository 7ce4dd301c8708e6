"""Scratch: where the host time of an SD3-size probe call goes, on the GPU machine."""
import cProfile, pstats, time, torch
import iidkern
from iidkern import Probe, TokenGroups as TG

h, nt, ni, d = 24, 333, 4096, 64
n = nt + ni
q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
probes = (Probe(TG.each(nt, n), TG.segments([(0, 100), (100, 200), (200, 300)], n, device="cuda"), heads="keep"),
          Probe(TG.each(0, nt), TG.each(nt, n), heads="mean"))
for kw_name, kw in [("plain", {}), ("probes", dict(probes=probes))]:
    f = lambda: iidkern.attention(q, k, v, layout="bnhd", **kw)
    for _ in range(20):
        f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        f()
    host = (time.perf_counter() - t0) / 200
    torch.cuda.synchronize()
    total = (time.perf_counter() - t0) / 200
    print(f"{kw_name}: host {1e6 * host:.0f} us/call, with sync {1e6 * total:.0f} us/call")
pr = cProfile.Profile(); pr.enable()
for _ in range(200):
    iidkern.attention(q, k, v, layout="bnhd", probes=probes)
pr.disable(); torch.cuda.synchronize()
pstats.Stats(pr).sort_stats("tottime").print_stats(14)
