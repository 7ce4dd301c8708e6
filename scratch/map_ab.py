"""Scratch (GPU): the Gluon text x image map (kernels/hopper_map.py) against the Triton probe
pass. First exactness on odd shapes against the fp32 reference, then paired ratios over the
plain call (3 rounds x 40 pairs; graph ratio beside) of the map alone and of both bench probes,
for the Triton pass and Gluon tile variants (module constants set before each call).

    python scratch/map_ab.py [sd3_1024,flux_1024,flux_edit]

Needs scratch/gluon_map.patch applied (`git apply scratch/gluon_map.patch`): the kernel was reverted
(NOTES.md 65).
"""
import sys

import torch

import iidkern
from ab_timing import bench_inputs, paired_summary
from bench.workloads import build_workload
from iidkern import Probe, TokenGroups as TG
from iidkern.kernels import hopper_map

SERVES = hopper_map.serves
VARIANTS = {  # name: (use gluon, BLOCK_M, BLOCK_N, NUM_BUFFERS, NUM_WARPS)
    "triton pass": (False, 64, 128, 2, 4),
    "gluon 64x128 nbuf2": (True, 64, 128, 2, 4),
    "gluon 64x128 nbuf3": (True, 64, 128, 3, 4),
    "gluon 128x128 nbuf2": (True, 128, 128, 2, 8),
    "gluon 64x64 nbuf2": (True, 64, 64, 2, 4),
    "gluon 64x64 nbuf3": (True, 64, 64, 3, 4),
}


def use(variant):
    gluon, bm, bn, nbuf, nw = VARIANTS[variant]
    hopper_map.serves = SERVES if gluon else (lambda *a, **kw: False)
    hopper_map.BLOCK_M, hopper_map.BLOCK_N, hopper_map.NUM_BUFFERS, hopper_map.NUM_WARPS = bm, bn, nbuf, nw


def exactness():
    g = torch.Generator(device="cuda").manual_seed(0)
    worst = 0.0
    for (b, h, n, d, layout, dtype, q_rng, k_rng, heads) in [
            (1, 3, 333, 128, "bhnd", torch.bfloat16, (0, 77), (77, 333), "mean"),
            (2, 5, 700, 64, "bnhd", torch.float16, (13, 300), (290, 700), "sum"),
            (2, 24, 1100, 128, "bnhd", torch.bfloat16, (1000, 1100), (0, 1000), "tensor"),
            (1, 1, 200, 64, "bhnd", torch.bfloat16, (0, 200), (0, 200), "mean")]:
        shape = (b, h, n, d) if layout == "bhnd" else (b, n, h, d)
        q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, generator=g) for _ in range(3))
        hw = torch.rand(b, h, device="cuda", generator=g) if heads == "tensor" else heads
        probe = Probe(TG.each(*q_rng), TG.each(*k_rng), heads=hw)
        ref = iidkern.attention(q.float(), k.float(), v.float(), layout=layout, probes=[probe],
                                backend="reference").probes[0].double()
        for variant in VARIANTS:
            use(variant)
            got = iidkern.attention(q, k, v, layout=layout, probes=[probe], kernel_options={"poison": True}).probes[0]
            err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
            worst = max(worst, err)
            print(f"exact {variant:19s} b{b} h{h} n{n} d{d} {layout} {dtype} {heads}: {err:.2e} "
                  f"finite {bool(torch.isfinite(got).all())}", flush=True)
    return worst


worst = exactness()
print(f"worst {worst:.2e}", flush=True)
shapes = sys.argv[1].split(",") if len(sys.argv) > 1 else ["flux_1024", "sd3_1024", "flux_edit"]
dev = torch.device("cuda")
for name in shapes:
    shape, dtype, inputs, n_sets = bench_inputs(name)
    probes = build_workload(shape, dtype, "probe", dev).probes

    def plain(i):
        return iidkern.attention(*inputs[i])
    for variant in VARIANTS:
        for label, chosen in (("map", probes[1:]), ("both", probes)):
            def call(i, chosen=chosen, variant=variant):
                use(variant)
                return iidkern.attention(*inputs[i], probes=chosen)
            print(f"{name} {variant:19s} {label:5s} {paired_summary(call, plain, n_sets)}", flush=True)
