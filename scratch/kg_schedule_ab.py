"""Scratch (GPU): where the Hopper kernel's key-group update goes (hopper_fwd.KG_SCHEDULE):
0 ids loaded at the update, 1 ids prefetched at the turn's start, 2 prefetched and the update
after the PV wait. IID probe alone vs the plain call, interleaved; graph ratios (NOTES.md 32)."""
import torch

import iidkern
from ab_timing import interleaved_ratios
from graph_timing import graph_ms
from bench.workloads import DTYPES, SHAPES, build_workload, random_qkv
from iidkern.kernels import hopper_fwd

for name in ("flux_1024", "flux_edit"):
    shape = SHAPES[name]
    q, k, v = random_qkv(shape, DTYPES["bf16"], torch.device("cuda"), seed=0)
    iid = build_workload(shape, DTYPES["bf16"], "probe", torch.device("cuda")).probes[0]

    def iid_call(mode):
        def call():
            hopper_fwd.KG_SCHEDULE = mode
            return iidkern.attention(q, k, v, probes=[iid])
        return call
    ref = iid_call(0)().probes[0]
    for mode in (1, 2):
        got = iid_call(mode)().probes[0]
        print(f"{name} mode {mode}: max |diff| vs mode 0 {(got - ref).abs().max().item():.3e}", flush=True)
    fns = {"plain": lambda: iidkern.attention(q, k, v), "lse": lambda: iidkern.attention(q, k, v, return_lse=True),
           **{f"iid{m}": iid_call(m) for m in (0, 1, 2)}}
    interleaved_ratios(fns, "plain", rounds=7, label=name)
    base = graph_ms(fns["plain"])
    for label in ("lse", "iid0", "iid1", "iid2"):
        print(f"{name:9s} graph {label:5s} {graph_ms(fns[label]) / base:.3f}x plain ({base:.4f} ms)", flush=True)
