"""Scratch: the fused key-group probe and the cached-kernel launcher on the GPU.

Kernel times from CUDA-graph replays (no host cost), eager times from back-to-back calls,
host microseconds per call with Triton's launch path vs the cached compiled kernel.
"""
import cProfile
import pstats
import time

import torch
import triton

import iidkern
from iidkern import Probe, TokenGroups as TG
from iidkern.kernels import launch
from graph_timing import graph_ms  # scratch/graph_timing.py (a script's folder is on sys.path)


def eager_ms(fn, reps=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps // 5):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / (reps // 5))
    return sorted(times)[2]


def host_us(fn, reps=300):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t = (time.perf_counter() - t0) / reps
    torch.cuda.synchronize()
    return 1e6 * t


def set_fast(on):
    for w in (launch._ATTN, launch._PROBE, launch._PAIR_STATS):
        w.enabled = on


print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
SHAPES = [("flux256", 24, 512, 256, 128), ("flux512", 24, 512, 1024, 128), ("flux1024", 24, 512, 4096, 128),
          ("fluxedit", 24, 512, 8192, 128), ("sd3", 24, 333, 4096, 64)]
print(f"{'shape':9s} {'case':22s} {'graph ms':>9s} {'x plain':>8s} {'eager ms':>9s} {'eager slow':>10s} {'host us':>8s} {'host slow':>9s}")
for name, h, nt, ni, d in SHAPES:
    n = nt + ni
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    instr = [(0, 128), (128, 256), (256, 384)] if nt >= 384 else [(0, 100), (100, 200), (200, 300)]
    iid = Probe(TG.each(nt, n), TG.segments(instr, n, device="cuda"), heads="keep")
    txt = Probe(TG.each(0, nt), TG.each(nt, n), heads="mean")
    nofuse = {"fuse_key_groups": False}
    cases = [("plain", {}), ("iid fused", dict(probes=(iid,))), ("iid 2nd pass", dict(probes=(iid,), kernel_options=nofuse)),
             ("txt", dict(probes=(txt,))), ("both fused", dict(probes=(iid, txt))),
             ("both 2nd pass", dict(probes=(iid, txt), kernel_options=nofuse))]
    if name == "flux1024":
        for bm, bn, w, st in [(128, 128, 8, 3), (64, 256, 8, 2), (128, 64, 4, 3), (256, 64, 8, 2), (64, 128, 4, 3)]:
            opts = dict(PROBE_BLOCK_M=bm, PROBE_BLOCK_N=bn, PROBE_NUM_WARPS=w, PROBE_NUM_STAGES=st)
            cases.append((f"txt {bm}x{bn} w{w} s{st}", dict(probes=(txt,), kernel_options=opts)))
    base = None
    for case, kw in cases:
        fn = lambda: iidkern.attention(q, k, v, layout="bnhd", **kw)
        try:
            g = graph_ms(fn, reps=50)
        except Exception as e:  # noqa: BLE001
            print(f"{name:9s} {case:22s} failed: {type(e).__name__}: {str(e)[:100]}")
            continue
        base = g if case == "plain" else base
        e_fast, h_fast = eager_ms(fn), host_us(fn)
        set_fast(False)
        e_slow, h_slow = eager_ms(fn), host_us(fn)
        set_fast(True)
        print(f"{name:9s} {case:22s} {g:9.4f} {g / base:8.3f} {e_fast:9.4f} {e_slow:10.4f} {h_fast:8.1f} {h_slow:9.1f}")

# Where the host time of a plain and of a two-probe call goes now (Flux 256^2 shapes).
n = 768
q, k, v = (torch.randn(1, n, 24, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
probes = (Probe(TG.each(512, n), TG.segments([(0, 100), (100, 200), (200, 300)], n, device="cuda"), heads="keep"),
          Probe(TG.each(0, 512), TG.each(512, n), heads="mean"))
for label, kw in [("plain", {}), ("two probes", dict(probes=probes))]:
    for _ in range(20):
        iidkern.attention(q, k, v, layout="bnhd", **kw)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        iidkern.attention(q, k, v, layout="bnhd", **kw)
    pr.disable()
    torch.cuda.synchronize()
    print(f"--- host profile: {label} (200 calls)")
    pstats.Stats(pr).sort_stats("tottime").print_stats(12)
