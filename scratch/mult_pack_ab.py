"""Scratch (GPU): the block multiplier call paired over the plain call (NOTES.md 70). With
scratch/mult_packed.patch applied: M read from fragment-ordered ("packed") values, a diag
build (IIDKERN_MULT_PACKED=1; IIDKERN_MULT_PACK_DTYPE=bf16; IIDKERN_MULT_PACK_CACHE=1 packs
once, outside the timed calls), paired over the plain call. One process per variant."""
import os
import sys

import torch

import iidkern
from ab_timing import bench_inputs, paired_summary
from bench.workloads import build_workload
from iidkern.reference import attention_reference

dev = torch.device("cuda")
tag = " ".join(f"{k[8:]}={v}" for k, v in os.environ.items() if k.startswith("IIDKERN_MULT"))
for name in sys.argv[1].split(","):
    shape, dtype, inputs, n_sets = bench_inputs(name)
    mult = build_workload(shape, dtype, "block_mult", dev).multiplier
    q, k, v = inputs[0]
    ref = attention_reference(q, k, v, block_multiplier=mult, compute_dtype=torch.float32)
    ref = getattr(ref, "out", ref)
    got = iidkern.attention(q, k, v, block_multiplier=mult).float()
    err = (got - ref).abs().max().item()

    def plain(i):
        return iidkern.attention(*inputs[i])

    def call(i):
        return iidkern.attention(*inputs[i], block_multiplier=mult)
    print(f"{name:10s} [{tag}] {paired_summary(call, plain, n_sets)} err {err:.2e}", flush=True)
