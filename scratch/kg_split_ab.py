"""Scratch (GPU): key groups split into their own key-tile range vs tested per tile, A/B
interleaved over rounds (clock drift hits all variants alike); ratio to plain of the same
round, median over rounds."""
import statistics
import torch
import iidkern
from iidkern import Probe, TokenGroups as TG

def med(f, reps=100):
    s = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    e = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for _ in range(5): f()
    torch.cuda.synchronize()
    for i in range(reps):
        s[i].record(); f(); e[i].record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(s, e))

for name, nt, ni, d, txt_first in (("sd3", 333, 4096, 64, False), ("flux", 512, 4096, 128, True),
                                   ("flux_edit", 512, 8192, 128, True)):
    n = nt + ni
    q, k, v = (torch.randn(1, 24, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    txt, img = ((0, nt), (nt, n)) if txt_first else ((ni, n), (0, ni))
    s = nt // 3
    segs = [(txt[0], txt[0] + s), (txt[0] + s, txt[0] + 2 * s), (txt[0] + 2 * s, txt[1])]
    p1 = Probe(TG.each(*img), TG.segments(segs, n, device="cuda"), heads="keep", normalize="keys")
    p2 = Probe(TG.each(*txt), TG.each(*img), heads="mean")
    variants = {"plain": ((), {})}
    for probes, pname in (((p1,), "kg"), ((p1, p2), "both")):
        for split in (True, False):
            variants[f"{pname} {'split' if split else 'per-tile'}"] = (probes, {"kg_split": split})
    ratios = {key: [] for key in variants}
    for _ in range(3): med(lambda: iidkern.attention(q, k, v))  # clocks up
    for r in range(7):
        times = {key: med(lambda: iidkern.attention(q, k, v, probes=pr, kernel_options=o)) for key, (pr, o) in variants.items()}
        for key in variants:
            ratios[key].append(times[key] / times["plain"])
    for key in variants:
        rs = ratios[key]
        print(f"{name:9s} {key:14s} {statistics.median(rs):.3f}x plain (min {min(rs):.3f}, max {max(rs):.3f})")
