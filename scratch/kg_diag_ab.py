"""Scratch (GPU): where the Hopper kernel's fused key-group probe spends its time (NOTES.md 57).
Run once per KG_DIAG (env, read by a diagnostic build of hopper_fwd): 0 as shipped, 1 synthetic
ids instead of their load, 3 no ids and no mma_v2 (only the rescale of the sums). Paired
ratios over the plain call (3 rounds x 40 pairs), graph beside: IID's probe alone, both probes."""
import os
import sys

import torch

import iidkern
from bench.timing import num_input_sets, paired_graph_ratio, paired_ratios
from bench.workloads import DTYPES, SHAPES, build_workload, random_qkv

dev = torch.device("cuda")
for name in (sys.argv[1].split(",") if len(sys.argv) > 1 else ["flux_1024", "flux_edit"]):
    shape, dtype = SHAPES[name], DTYPES["bf16"]
    first = random_qkv(shape, dtype, dev, seed=0)
    n_sets = num_input_sets(sum(t.numel() * t.element_size() for t in first))
    inputs = [first] + [random_qkv(shape, dtype, dev, seed=s) for s in range(1, n_sets)]
    probes = build_workload(shape, dtype, "probe", dev).probes

    def plain(i):
        return iidkern.attention(*inputs[i])
    for label, chosen in (("iid probe", probes[:1]), ("both probes", probes)):
        def call(i, chosen=chosen):
            return iidkern.attention(*inputs[i], probes=chosen)
        call(0)
        r = sorted(paired_ratios(call, plain, n_sets, rounds=3))
        g = paired_graph_ratio(call, plain, n_sets)
        print(f"KG_DIAG={os.environ.get('KG_DIAG', '0')} {name} {label:11s} {r[len(r) // 2]:.4f}x plain "
              f"(min {r[0]:.4f} max {r[-1]:.4f}) graph {g:.4f}x", flush=True)
