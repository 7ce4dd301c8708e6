"""Scratch: bench workloads (plain, probe, tags, multiplier) with kernel-option variants,
timed interleaved from CUDA-graph replays (median of 5 rounds), x own plain."""
import sys

import torch
import triton

import iidkern
from bench.workloads import SHAPES, build_workload, random_qkv
from graph_timing import graph_ms  # scratch/graph_timing.py (a script's folder is on sys.path)


print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
VARIANTS_D64 = {
    "plain": [{}, {"maxnreg": None}],
    "probe": [{}, {"kg_split": False}, {"maxnreg": None, "kg_split": False}],
    "block_mult": [{}, {"mult_split": True}, {"maxnreg": None}],
    "tags_0": [{}, {"maxnreg": None}],
    "tags_50": [{}, {"maxnreg": None}],
    "tags_iid": [{}, {"maxnreg": None}],
}
VARIANTS_D128 = {
    "plain": [{}],
    "probe": [{}],
    "block_mult": [{}, {"num_stages": 2}, {"BLOCK_M": 64, "num_warps": 4}, {"mult_split": False, "num_stages": 2}],
    "tags_0": [{}],
    "tags_iid": [{}],
}
for shape_name in sys.argv[1:] or ["flux_1024", "flux_edit", "sd3_1024"]:
    shape = SHAPES[shape_name]
    q, k, v = random_qkv(shape, torch.bfloat16, "cuda", seed=0)
    cases = {}
    for feature, opts in (VARIANTS_D64 if shape.head_dim <= 64 else VARIANTS_D128).items():
        w = build_workload(shape, torch.bfloat16, feature, "cuda")
        for o in opts:
            label = feature + (" " + ",".join(f"{a}={b}" for a, b in o.items()) if o else "")
            kw = dict(w.iidkern_kwargs(), kernel_options=o or None)
            cases[label] = (lambda kw=kw: iidkern.attention(q, k, v, **kw), w.info.get("tile_sparsity"))
    rounds = {c: [] for c in cases}
    for _ in range(5):
        for c, (fn, _) in cases.items():
            rounds[c].append(graph_ms(fn))
    med = {c: sorted(t)[2] for c, t in rounds.items()}
    for c, (_, sp) in cases.items():
        spread = (max(rounds[c]) - min(rounds[c])) / med[c]
        extra = f"  skipped {sp:.1%}" if sp is not None else ""
        print(f"{shape_name:10s} {c:58s} {med[c]:.4f} ms  x{med[c] / med['plain']:.3f}  spread {spread:.1%}{extra}")
