"""Scratch (GPU): IID's probe alone and both of the bench's probes, paired over the plain call
(3 rounds x 40 pairs; graph ratio beside), for a diagnostic build of the kernels that reads
one variant switch from the environment (NOTES.md 57: KG_DIAG, scratch/kg_diag.patch; 58:
KG_ONE_DOT, scratch/kg_one_dot.patch, and KG_IDS, scratch/kg_ids.patch). Run once per value:

    KG_IDS=1 python scratch/probe_variant_ab.py KG_IDS sd3_1024 [--error]

``--error`` also prints the IID probe's error against the reference backend (fp32, dense)."""
import os
import sys

import torch

import iidkern
from ab_timing import bench_inputs, paired_summary
from bench.workloads import build_workload

switch = sys.argv[1]
shapes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["flux_1024", "flux_edit"]
tag = f"{switch}={os.environ.get(switch, '0')}"
dev = torch.device("cuda")
for name in shapes:
    shape, dtype, inputs, n_sets = bench_inputs(name)
    first = inputs[0]
    probes = build_workload(shape, dtype, "probe", dev).probes
    if "--error" in sys.argv:
        ref = iidkern.attention(*(t.float() for t in first), probes=probes[:1], backend="reference").probes[0].double()
        got = iidkern.attention(*first, probes=probes[:1]).probes[0].double()
        rel = ((got - ref).abs() / ref.abs().clamp_min(1e-30)).max().item()
        print(f"{tag} {name} iid probe max rel err vs fp32 reference {rel:.2e}, "
              f"max abs {(got - ref).abs().max().item():.2e}", flush=True)

    def plain(i):
        return iidkern.attention(*inputs[i])
    for label, chosen in (("iid probe", probes[:1]), ("map probe", probes[1:]), ("both probes", probes)):
        def call(i, chosen=chosen):
            return iidkern.attention(*inputs[i], probes=chosen)
        print(f"{tag} {name} {label:11s} {paired_summary(call, plain, n_sets)}", flush=True)
