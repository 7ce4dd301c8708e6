"""Scratch (GPU): key groups split into their own key-tile range vs tested per tile (NOTES.md 27),
A/B interleaved over rounds, ratio to plain of the same round."""
import iidkern
import torch
from ab_timing import interleaved_ratios
from iidkern import Probe, TokenGroups as TG

for name, nt, ni, d, txt_first in (("sd3", 333, 4096, 64, False), ("flux", 512, 4096, 128, True),
                                   ("flux_edit", 512, 8192, 128, True)):
    n = nt + ni
    q, k, v = (torch.randn(1, 24, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    txt, img = ((0, nt), (nt, n)) if txt_first else ((ni, n), (0, ni))
    s = nt // 3
    segs = [(txt[0], txt[0] + s), (txt[0] + s, txt[0] + 2 * s), (txt[0] + 2 * s, txt[1])]
    p1 = Probe(TG.each(*img), TG.segments(segs, n, device="cuda"), heads="keep", normalize="keys")
    p2 = Probe(TG.each(*txt), TG.each(*img), heads="mean")
    variants = {"plain": lambda: iidkern.attention(q, k, v)}
    for probes, pname in (((p1,), "kg"), ((p1, p2), "both")):
        for split in (True, False):
            variants[f"{pname} {'split' if split else 'per-tile'}"] = (
                lambda pr=probes, o={"kg_split": split}: iidkern.attention(q, k, v, probes=pr, kernel_options=o))
    interleaved_ratios(variants, "plain", label=name)
