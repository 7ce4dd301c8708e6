"""Scratch (GPU; bench/NOTES.md 62): the Hopper kernel's steady-state turn under build switches
read from the environment by a build with ``scratch/turn_variants.patch`` applied (IIDKERN_Q_REGS: Q as a register operand of S = Q K^T instead of shared memory;
IIDKERN_LATE_RESCALE: O rescaled after S_i is issued, FA3's order, instead of after PV_{i-1}).
Run once per variant, each in its own process and Triton cache:

    IIDKERN_Q_REGS=1 python scratch/turn_variant_ab.py

1. exactness of plain calls (with head weights and LSE, forced splits) against float32 SDPA
   (scratch/tail_split_ab.exactness);
2. plain calls paired over cuDNN (bench.timing, 3 rounds x 40 pairs) and graph ratios."""
import os
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import iidkern
from bench.timing import paired_graph_ratio, paired_ratios
from bench.workloads import DTYPES, SHAPES, random_qkv
from tail_split_ab import exactness

tag = f"q{os.environ.get('IIDKERN_Q_REGS', '0')}l{os.environ.get('IIDKERN_LATE_RESCALE', '0')}"
dev = torch.device("cuda")
worst = exactness(dev)  # split and unsplit plain calls, head weights, LSE, both layouts and dtypes
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
