"""Scratch (GPU): are two identical calls with a value probe bit-identical, with and without autocast?"""
import torch
import iidkern
from iidkern import Probe, TokenGroups as TG, ValueProbe

g = torch.Generator(device="cuda").manual_seed(9)
q, k, v = (torch.randn(2, 4, n, 128, generator=g, device="cuda").to(torch.bfloat16) for n in (1200, 1100, 1100))
x = torch.randn(2, 1100, 5, generator=g, device="cuda")
probes = [ValueProbe(x, TG.segments([(0, 600), (600, 1200)], 1200, device="cuda"))]
a = iidkern.attention(q, k, v, probes=probes)
b = iidkern.attention(q, k, v, probes=probes)
print("same call twice equal:", torch.equal(a.probes[0], b.probes[0]), (a.probes[0] - b.probes[0]).abs().max().item())
with torch.autocast("cuda", dtype=torch.float16):
    c = iidkern.attention(q, k, v, probes=probes)
print("autocast equal:", torch.equal(a.probes[0], c.probes[0]), (a.probes[0] - c.probes[0]).abs().max().item())
for i in range(5):
    d = iidkern.attention(q, k, v, probes=probes)
    print(i, torch.equal(a.probes[0], d.probes[0]), torch.equal(a.out, d.out))
