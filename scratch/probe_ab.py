"""Scratch (GPU): SD3 probe cost, the bench's workload vs probes built by hand, interleaved."""
import statistics
import torch
import iidkern
from iidkern import Probe, TokenGroups as TG
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
bench_probes = build_workload(shape, dtype, "probe", dev).probes
for p in bench_probes:
    print(p.queries.kind, p.queries.start, p.queries.stop, p.keys.kind, p.keys.start, p.keys.stop, p.keys.count,
          None if p.keys.group_ids is None else (p.keys.group_ids.dtype, p.keys.group_ids.device, p.keys.group_ids.shape),
          p.heads, p.normalize)
n, nt, ni = shape.tokens, shape.text, shape.image
txt, img = (ni, n), (0, ni)
s = nt // 3
segs = [(txt[0], txt[0] + s), (txt[0] + s, txt[0] + 2 * s), (txt[0] + 2 * s, txt[1])]
p1 = Probe(TG.each(*img), TG.segments(segs, n, device="cuda"), heads="keep", normalize="keys")
p2 = Probe(TG.each(*txt), TG.each(*img), heads="mean")
variants = {"plain": (), "bench probes": bench_probes, "local both": (p1, p2), "local kg": (p1,), "local map": (p2,),
            "bench kg": bench_probes[:1], "bench map": bench_probes[1:]}
ratios = {key: [] for key in variants}
for _ in range(3): med(lambda: iidkern.attention(q, k, v))
for r in range(9):
    times = {key: med(lambda: iidkern.attention(q, k, v, probes=pr)) for key, pr in variants.items()}
    for key in variants:
        ratios[key].append(times[key] / times["plain"])
    print("round", r, " ".join(f"{key}={t:.4f}" for key, t in times.items()), flush=True)
for key in variants:
    rs = ratios[key]
    print(f"{key:14s} {statistics.median(rs):.3f}x plain (min {min(rs):.3f}, max {max(rs):.3f})")
