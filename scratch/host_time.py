"""Scratch (GPU): host time per iidkern call (tiny GPU work, so wall time per call is the
host's), plain / fused key-group probe / probe-pass map / both, and where it goes."""
import time, cProfile, pstats, io
import torch
import iidkern
from iidkern import Probe, TokenGroups as TG
from iidkern.kernels import launch

def run(nt, ni, d, h=24, tag=""):
    n = nt + ni
    q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    img, txt = (0, ni), (ni, n)   # SD3 bench layout? both orders are tried below
    for order in ("img_first", "txt_first"):
        if order == "txt_first":
            txt, img = (0, nt), (nt, n)
        s = nt // 3
        segs = [(txt[0], txt[0] + s), (txt[0] + s, txt[0] + 2 * s), (txt[0] + 2 * s, txt[1])]
        p1 = Probe(TG.each(*img), TG.segments(segs, n, device="cuda"), heads="keep", normalize="keys")
        p2 = Probe(TG.each(*txt), TG.each(*img), heads="mean")
        for name, probes in (("plain", ()), ("fused kg", (p1,)), ("pass map", (p2,)), ("both", (p1, p2))):
            f = lambda: iidkern.attention(q, k, v, probes=probes)
            for _ in range(20): f()
            torch.cuda.synchronize()
            N = 300
            t = time.perf_counter()
            for _ in range(N): f()
            host = (time.perf_counter() - t) / N * 1e6
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t) / N * 1e6
            print(f"{tag} {order:9s} {name:9s} host {host:7.1f} us/call, wall {wall:7.1f} us/call")
        pr = cProfile.Profile(); pr.enable()
        for _ in range(200): iidkern.attention(q, k, v, probes=(p1, p2))
        pr.disable(); torch.cuda.synchronize()
        sio = io.StringIO(); pstats.Stats(pr, stream=sio).sort_stats("tottime").print_stats(14); print(sio.getvalue()[-3000:])
    print("launcher enabled:", launch._ATTN.enabled, launch._PROBE.enabled, len(launch._ATTN._cache), len(launch._PROBE._cache))

run(333, 64, 64, h=1, tag="tiny")
run(333, 4096, 64, tag="sd3")
