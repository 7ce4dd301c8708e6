"""Scratch (GPU): IID's key-group probe fused into the main pass against the probe pass
(``kernel_options={"fuse_key_groups": False}``), alone and beside the text x image map,
paired over the plain call (3 rounds x 40 pairs; graph ratio beside). Probe-pass tiles for
the unfused key groups are swept through ``PROBE_*`` options. Also each result's max error
against the fp32 reference backend, relative to the result's largest value.

    python scratch/kg_route_ab.py sd3_1024,flux_1024,flux_edit
"""
import sys

import torch

import iidkern
from ab_timing import bench_inputs, paired_summary
from bench.workloads import build_workload

shapes = sys.argv[1].split(",") if len(sys.argv) > 1 else ["sd3_1024", "flux_1024", "flux_edit"]
dev = torch.device("cuda")
UNFUSED = {"fuse_key_groups": False}
TILES = {
    "64x64 w4 s3": {},  # the probe pass's default for this probe
    "128x64 w8 s3": dict(PROBE_BLOCK_M=128, PROBE_BLOCK_N=64, PROBE_NUM_WARPS=8, PROBE_NUM_STAGES=3),
    "64x128 w4 s2": dict(PROBE_BLOCK_M=64, PROBE_BLOCK_N=128, PROBE_NUM_WARPS=4, PROBE_NUM_STAGES=2),
    "128x32 w4 s3": dict(PROBE_BLOCK_M=128, PROBE_BLOCK_N=32, PROBE_NUM_WARPS=4, PROBE_NUM_STAGES=3),
}


def rel_err(got, ref):
    got, ref = got.double(), ref.double()
    return ((got - ref).abs().max() / ref.abs().max()).item()


for name in shapes:
    shape, dtype, inputs, n_sets = bench_inputs(name)
    probes = build_workload(shape, dtype, "probe", dev).probes
    ref = iidkern.attention(*(t.float() for t in inputs[0]), probes=probes, backend="reference").probes
    variants = {"kg fused": (probes[:1], {}), "map alone": (probes[1:], {}), "both fused": (probes, {})}
    for tile, opts in TILES.items():
        variants[f"kg pass {tile}"] = (probes[:1], {**UNFUSED, **opts})
        variants[f"both, kg pass {tile}"] = (probes, {**UNFUSED, **opts})

    def plain(i):
        return iidkern.attention(*inputs[i])
    for label, (chosen, opts) in variants.items():
        def call(i, chosen=chosen, opts=opts):
            return iidkern.attention(*inputs[i], probes=chosen, kernel_options=opts or None)
        try:
            res = call(0)
        except Exception as exc:  # a tile choice the pass refuses: report and go on
            print(f"{name} {label:28s} failed: {type(exc).__name__}: {exc}"[:200], flush=True)
            continue
        errs = [rel_err(res.probes[j], ref[j if len(chosen) == 2 else (0 if chosen[0] is probes[0] else 1)])
                for j in range(len(chosen))]
        print(f"{name} {label:28s} {paired_summary(call, plain, n_sets)} "
              f"err {' '.join(f'{e:.1e}' for e in errs)}", flush=True)
