"""Scratch (GPU): SD3 (D=64) extras under register caps and tile options, interleaved A/B
over rounds; each variant's ratio to plain of the same round, median over rounds. Uses the
bench's workloads (same tags, probes and multiplier as bench/)."""
import statistics
import sys
import torch
import iidkern
from bench.workloads import SHAPES, build_workload, random_qkv

def med(f, reps=100):
    s = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    e = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for _ in range(5): f()
    torch.cuda.synchronize()
    for i in range(reps):
        s[i].record(); f(); e[i].record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(s, e))

shape, dtype, dev = SHAPES["sd3_1024"], torch.bfloat16, torch.device("cuda")
q, k, v = random_qkv(shape, dtype, dev, seed=0)[:3]
CAPS = [{}, {"maxnreg": 176}, {"maxnreg": 184}, {"maxnreg": None}]
plan = {
    "tags_0": CAPS, "tags_50": CAPS,
    "probe": CAPS[:3] + [{"maxnreg": 176, "kg_split": True}],
    "block_mult": [{}, {"maxnreg": 168}, {"BLOCK_N": 32}, {"num_stages": 2}],
}
variants = {"plain": ({}, {})}
for feature, opts in plan.items():
    kw = build_workload(shape, dtype, feature, dev).iidkern_kwargs()
    for o in opts:
        variants[f"{feature} {o or 'default'}"] = (kw, o)
ratios = {key: [] for key in variants}
for _ in range(3): med(lambda: iidkern.attention(q, k, v))
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
    times = {key: med(lambda: iidkern.attention(q, k, v, **kw, kernel_options=o)) for key, (kw, o) in variants.items()}
    for key in variants:
        ratios[key].append(times[key] / times["plain"])
    print("round", r, "plain", f"{times['plain']:.4f} ms", flush=True)
for key in variants:
    rs = ratios[key]
    print(f"{key:46s} {statistics.median(rs):.3f}x plain (min {min(rs):.3f}, max {max(rs):.3f})")
