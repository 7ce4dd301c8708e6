"""Scratch (GPU): the text x image map's probe pass (the bench's second probe alone) under
register caps (env PROBE_MAXNREG in a diagnostic build) and tile options, paired over the plain
call (3 rounds x 40 pairs), graph beside (NOTES.md 61)."""
import os
import sys

import iidkern
from ab_timing import bench_inputs
from bench.timing import paired_graph_ratio, paired_ratios
from bench.workloads import build_workload

OPTIONS = {
    "default": {},
    "64x64 w4 s2": dict(PROBE_BLOCK_M=64, PROBE_BLOCK_N=64, PROBE_NUM_WARPS=4, PROBE_NUM_STAGES=2),
    "32x64 w4 s3": dict(PROBE_BLOCK_M=32, PROBE_BLOCK_N=64, PROBE_NUM_WARPS=4, PROBE_NUM_STAGES=3),
    "64x128 w4 s2": dict(PROBE_BLOCK_M=64, PROBE_BLOCK_N=128, PROBE_NUM_WARPS=4, PROBE_NUM_STAGES=2),
}
tag = f"PROBE_MAXNREG={os.environ.get('PROBE_MAXNREG', 'none')}"
for name in (sys.argv[1].split(",") if len(sys.argv) > 1 else ["sd3_1024", "flux_1024"]):
    shape, dtype, inputs, n_sets = bench_inputs(name)
    the_map = build_workload(shape, dtype, "probe", inputs[0][0].device).probes[1:]

    def plain(i):
        return iidkern.attention(*inputs[i])
    for label, opts in OPTIONS.items():
        def call(i, opts=opts):
            return iidkern.attention(*inputs[i], probes=the_map, kernel_options=opts or None)
        call(0)
        r = sorted(paired_ratios(call, plain, n_sets, rounds=3))
        print(f"{tag} {name} map {label:13s} {r[len(r) // 2]:.4f}x plain (min {r[0]:.4f} max {r[-1]:.4f}) "
              f"graph {paired_graph_ratio(call, plain, n_sets):.4f}x", flush=True)
