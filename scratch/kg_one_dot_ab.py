"""Scratch (GPU): the Triton kernel's fused key-group sums (D=64, SD3) with one fp16 product
instead of hi + lo (env KG_ONE_DOT=1 in a diagnostic build, scratch/kg_one_dot.patch, NOTES.md 58).
Paired ratios over the plain call (3 rounds x 40 pairs), graph beside; the probe's error
against float64 sums."""
import os
import sys

import torch

import iidkern
from bench.timing import num_input_sets, paired_graph_ratio, paired_ratios
from bench.workloads import DTYPES, SHAPES, build_workload, random_qkv

dev = torch.device("cuda")
for name in (sys.argv[1].split(",") if len(sys.argv) > 1 else ["sd3_1024"]):
    shape, dtype = SHAPES[name], DTYPES["bf16"]
    first = random_qkv(shape, dtype, dev, seed=0)
    n_sets = num_input_sets(sum(t.numel() * t.element_size() for t in first))
    inputs = [first] + [random_qkv(shape, dtype, dev, seed=s) for s in range(1, n_sets)]
    probes = build_workload(shape, dtype, "probe", dev).probes
    ref = iidkern.attention(*(t.float() for t in first), probes=probes[:1], backend="reference").probes[0].double()

    def plain(i):
        return iidkern.attention(*inputs[i])
    got = iidkern.attention(*first, probes=probes[:1]).probes[0].double()
    rel = ((got - ref).abs() / ref.abs().clamp_min(1e-30)).max().item()
    print(f"KG_ONE_DOT={os.environ.get('KG_ONE_DOT', '0')} {name} iid probe max rel err vs fp32 reference {rel:.2e}, "
          f"max abs {(got - ref).abs().max().item():.2e}", flush=True)
    for label, chosen in (("iid probe", probes[:1]), ("both probes", probes)):
        def call(i, chosen=chosen):
            return iidkern.attention(*inputs[i], probes=chosen)
        call(0)
        r = sorted(paired_ratios(call, plain, n_sets, rounds=3))
        g = paired_graph_ratio(call, plain, n_sets)
        print(f"KG_ONE_DOT={os.environ.get('KG_ONE_DOT', '0')} {name} {label:11s} {r[len(r) // 2]:.4f}x plain "
              f"(min {r[0]:.4f} max {r[-1]:.4f}) graph {g:.4f}x", flush=True)
