"""Scratch (GPU): SD3 probe cost, the bench's workload vs probes built by hand, interleaved
(NOTES.md 29: launched-call noise)."""
import iidkern
import torch
from ab_timing import interleaved_ratios
from bench.workloads import SHAPES, build_workload, random_qkv
from iidkern import Probe, TokenGroups as TG

shape, dtype, dev = SHAPES["sd3_1024"], torch.bfloat16, torch.device("cuda")
q, k, v = random_qkv(shape, dtype, dev, seed=0)[:3]
bench_probes = build_workload(shape, dtype, "probe", dev).probes
n, nt, ni = shape.tokens, shape.text, shape.image
txt, img = (ni, n), (0, ni)
s = nt // 3
segs = [(txt[0], txt[0] + s), (txt[0] + s, txt[0] + 2 * s), (txt[0] + 2 * s, txt[1])]
p1 = Probe(TG.each(*img), TG.segments(segs, n, device="cuda"), heads="keep", normalize="keys")
p2 = Probe(TG.each(*txt), TG.each(*img), heads="mean")
sets = {"plain": (), "bench probes": bench_probes, "local both": (p1, p2), "local kg": (p1,), "local map": (p2,),
        "bench kg": bench_probes[:1], "bench map": bench_probes[1:]}
interleaved_ratios({name: (lambda pr=pr: iidkern.attention(q, k, v, probes=pr)) for name, pr in sets.items()},
                   "plain", rounds=9, label="sd3")
