"""Scratch (GPU): the Hopper kernel's rotated key walk (scratch/rotate_walk.patch, NOTES.md 56; reverted)
against the in-order walk, for the block multiplier and the fused key-group probe: paired
ratios over the plain call (bench.timing.paired_ratios, 3 rounds x 40 pairs), graph ratio
beside, and the rotated call paired over the in-order one. Also the outputs' difference."""
import sys

import torch

import iidkern
from iidkern.kernels import hopper_fwd
from ab_timing import bench_inputs
from bench.timing import paired_graph_ratio, paired_ratios
from bench.workloads import build_workload


def with_rotation(modes, fn):
    def call(i):
        hopper_fwd.ROTATE_WITH = frozenset(modes)
        try:
            return fn(i)
        finally:
            hopper_fwd.ROTATE_WITH = frozenset({"mult"})
    return call


shapes = sys.argv[1].split(",") if len(sys.argv) > 1 else ["flux_1024", "flux_edit"]
dev = torch.device("cuda")
for name in shapes:
    shape, dtype, inputs, n_sets = bench_inputs(name)

    def plain(i):
        return iidkern.attention(*inputs[i])
    for feature, mode in (("block_mult", "mult"), ("probe", "kg")):
        kw = build_workload(shape, dtype, feature, dev).iidkern_kwargs()

        def call(i, kw=kw):
            return iidkern.attention(*inputs[i], **kw)
        rot, ordered = with_rotation({mode}, call), with_rotation(set(), call)
        a, b = rot(0), ordered(0)
        oa, ob = (a.out if hasattr(a, "out") else a), (b.out if hasattr(b, "out") else b)
        torch.cuda.synchronize()
        diff = (oa.float() - ob.float()).abs().max().item()
        extra = ""
        if feature == "probe":
            pa, pb = a.probes, b.probes
            extra = " probes " + " ".join(f"{((x - y).abs().max() / y.abs().max()).item():.1e}" for x, y in zip(pa, pb))
        print(f"{name} {feature}: max |rot - in order| output {diff:.2e}{extra}", flush=True)
        for label, fn in (("rotated", rot), ("in order", ordered)):
            r = sorted(paired_ratios(fn, plain, n_sets, rounds=3))
            g = paired_graph_ratio(fn, plain, n_sets)
            print(f"{name} {feature:10s} {label:9s} {r[len(r) // 2]:.4f}x plain (min {r[0]:.4f} max {r[-1]:.4f}) "
                  f"graph {g:.4f}x", flush=True)
        r = sorted(paired_ratios(rot, ordered, n_sets, rounds=3))
        print(f"{name} {feature:10s} rotated / in order {r[len(r) // 2]:.4f}x (min {r[0]:.4f} max {r[-1]:.4f}) "
              f"graph {paired_graph_ratio(rot, ordered, n_sets):.4f}x", flush=True)
