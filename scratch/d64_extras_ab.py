"""Scratch (GPU): SD3 (D=64) extras under register caps and tile options (NOTES.md 29),
interleaved A/B, ratio to plain of the same round. Uses the bench's workloads (same tags,
probes and multiplier as bench/)."""
import sys

import iidkern
import torch
from ab_timing import interleaved_ratios
from bench.workloads import SHAPES, build_workload, random_qkv

shape, dtype, dev = SHAPES["sd3_1024"], torch.bfloat16, torch.device("cuda")
q, k, v = random_qkv(shape, dtype, dev, seed=0)[:3]
CAPS = [{}, {"maxnreg": 176}, {"maxnreg": 184}, {"maxnreg": None}]
plan = {
    "tags_0": CAPS, "tags_50": CAPS,
    "probe": CAPS[:3] + [{"maxnreg": 176, "kg_split": True}],
    "block_mult": [{}, {"maxnreg": 168}, {"BLOCK_N": 32}, {"num_stages": 2}],
}
variants = {"plain": lambda: iidkern.attention(q, k, v)}
for feature, options in plan.items():
    kw = build_workload(shape, dtype, feature, dev).iidkern_kwargs()
    for o in options:
        variants[f"{feature} {o or 'default'}"] = lambda kw=kw, o=o: iidkern.attention(q, k, v, **kw, kernel_options=o)
interleaved_ratios(variants, "plain", rounds=int(sys.argv[1]) if len(sys.argv) > 1 else 7, label="sd3")
