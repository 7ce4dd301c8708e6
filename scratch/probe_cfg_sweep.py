"""Scratch (GPU): probe-pass tile configs for the text x image head-mean map (and the D=64
default), the bench's probe workload against the plain call, paired (bench/timing)."""
import statistics
import sys

import torch

import iidkern
from bench.timing import paired_ratios
from bench.workloads import DTYPES, SHAPES, build_workload, random_qkv

CONFIGS = {
    # First sweep (NOTES.md 43): the first nine; the second: 64x128 w4 s2 and its neighbours.
    "flux": [(128, 128, 8, 2), (128, 128, 8, 3), (64, 128, 4, 2), (64, 128, 4, 3), (128, 64, 4, 3),
             (128, 64, 8, 3), (64, 64, 4, 3), (64, 256, 8, 2), (128, 256, 8, 1)]
    if len(sys.argv) < 3 else [(128, 128, 8, 2), (64, 128, 4, 2), (64, 128, 4, 1), (64, 128, 8, 2), (32, 128, 4, 2),
                               (64, 128, 2, 2), (64, 256, 4, 2), (32, 256, 4, 2), (32, 128, 2, 2)],
    "sd3": [(64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 4, 3),
            (64, 128, 4, 4), (128, 64, 8, 3)],
}
for name in (sys.argv[1].split(",") if len(sys.argv) > 1 else ["flux_1024", "flux_edit", "sd3_1024"]):
    shape = SHAPES[name]
    dev = torch.device("cuda")
    q, k, v = random_qkv(shape, DTYPES["bf16"], dev, seed=0)
    w = build_workload(shape, DTYPES["bf16"], "probe", dev)
    base = lambda i=0: iidkern.attention(q, k, v)  # noqa: E731
    ref = None
    for bm, bn, nw, ns in CONFIGS["sd3" if name.startswith("sd3") else "flux"]:
        opts = {"PROBE_BLOCK_M": bm, "PROBE_BLOCK_N": bn, "PROBE_NUM_WARPS": nw, "PROBE_NUM_STAGES": ns}
        fn = lambda i=0, opts=opts: iidkern.attention(q, k, v, probes=w.probes, kernel_options=opts)  # noqa: E731
        try:
            res = fn()
        except Exception as e:  # a config that does not compile (shared memory)
            print(f"{name} {bm}x{bn} w{nw} s{ns}: {type(e).__name__} {str(e)[:100]}", flush=True)
            continue
        if ref is None:
            ref = res.probes[1]
        err = ((res.probes[1] - ref).norm() / ref.norm()).item()
        r = paired_ratios(fn, base, 1, rounds=3, reps=30)
        print(f"{name:9s} {bm:3d}x{bn:<3d} w{nw} s{ns}: {statistics.median(r):.3f}x plain "
              f"({min(r):.3f}-{max(r):.3f}) map diff {err:.1e}", flush=True)
