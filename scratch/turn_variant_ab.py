"""Scratch (GPU; bench/NOTES.md 62): the Hopper kernel's steady-state turn under build switches
read from the environment by a build with ``scratch/turn_variants.patch`` applied (IIDKERN_Q_REGS: Q as a register operand of S = Q K^T instead of shared memory;
IIDKERN_LATE_RESCALE: O rescaled after S_i is issued, FA3's order, instead of after PV_{i-1}).
Run once per variant, each in its own process and Triton cache:

    IIDKERN_Q_REGS=1 python scratch/turn_variant_ab.py

1. exactness of plain calls (with head weights and LSE, forced splits) against float32 SDPA;
2. plain calls paired over cuDNN (bench.timing, 3 rounds x 40 pairs) and graph ratios."""
import os
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import iidkern
from bench.timing import paired_graph_ratio, paired_ratios
from bench.workloads import DTYPES, SHAPES, random_qkv

tag = f"q{os.environ.get('IIDKERN_Q_REGS', '0')}l{os.environ.get('IIDKERN_LATE_RESCALE', '0')}"
dev = torch.device("cuda")
g = torch.Generator().manual_seed(7)
worst = 0.0
for b, h, nq, nk, opts in [(1, 5, 1000, 1037, None), (2, 3, 700, 2049, {"tail_split_tiles": 2, "tail_split_pieces": 5}),
                           (1, 24, 4608, 4608, None)]:
    for layout in ("bhnd", "bnhd"):
        for dtype in (torch.bfloat16, torch.float16):
            def mk(n):
                shape = (b, h, n, 128) if layout == "bhnd" else (b, n, h, 128)
                return (torch.randn(shape, generator=g) * 1.5).to(dev, dtype)
            q, k, v = mk(nq), mk(nk), mk(nk)
            hw = torch.rand(b, h, generator=g).to(dev)
            ko = dict(opts or {}, poison=True, hopper=True)
            res = iidkern.attention(q, k, v, layout=layout, kernel_options=ko, return_lse=True, head_weights=hw)
            plain = iidkern.attention(q, k, v, layout=layout, kernel_options=ko)
            t = (lambda x: x) if layout == "bhnd" else (lambda x: x.transpose(1, 2))
            qf, kf, vf = (t(x).float() for x in (q, k, v))
            with sdpa_kernel([SDPBackend.MATH]):
                ref = F.scaled_dot_product_attention(qf, kf, vf)
            lse_ref = torch.logsumexp(qf @ kf.transpose(-1, -2) / 128 ** 0.5, -1)
            e = max((t(plain).float() - ref).abs().max().item(),
                    (t(res.out).float() - ref * hw[..., None, None]).abs().max().item(),
                    0.1 * (res.lse - lse_ref).abs().max().item())
            if torch.isnan(plain).any() or torch.isnan(res.out).any():
                e = float("inf")
            worst = max(worst, e)
print(f"{tag} exactness worst {worst:.1e} {'OK' if worst < 5e-2 else 'NOT EXACT'}", flush=True)

for name in os.environ.get("SHAPES", "flux_1024,flux_edit,flux_1024_b2").split(","):
    sets = [random_qkv(SHAPES[name], DTYPES["bf16"], dev, seed=s) for s in range(2)]

    def cudnn(i):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(*sets[i])

    def ours(i):
        return iidkern.attention(*sets[i])
    r = paired_ratios(ours, cudnn, 2, rounds=3, reps=40)
    gr = paired_graph_ratio(ours, cudnn, 2)
    print(f"{tag} {name:14s} {statistics.median(r):.4f}x cuDNN (rounds {min(r):.3f}-{max(r):.3f}) graph {gr:.4f}x",
          flush=True)
