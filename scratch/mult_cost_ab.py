"""Scratch (GPU): where the block multiplier's cost on the Hopper kernel comes from. Paired
ratios over the plain call at Flux 1024² for sub-blocks of 1, 4 and 8 key tiles (all image
rows), and of 4 key tiles over 128 query rows only (most programs multiply nothing)."""
import statistics

import torch

import iidkern
from iidkern import BlockMultiplier
from bench.timing import paired_ratios, paired_graph_ratio
from bench.workloads import DTYPES, SHAPES, random_qkv

shape = SHAPES["flux_1024"]
dev = torch.device("cuda")
q, k, v = random_qkv(shape, DTYPES["bf16"], dev, seed=0)
g = torch.Generator(device=dev).manual_seed(1)
n = q.shape[2]


def mult(q0, mq, k0, mk):
    return BlockMultiplier(2 * torch.rand(1, mq, mk, generator=g, device=dev), query_start=q0, key_start=k0)


cases = {
    "4 key tiles, all image rows (bench)": mult(512, 4096, 0, 512),
    "1 key tile, all image rows": mult(512, 4096, 0, 128),
    "8 key tiles, all image rows": mult(512, 4096, 0, 1024),
    "4 key tiles at the end": mult(512, 4096, n - 512, 512),
    "4 key tiles, 128 query rows": mult(512, 128, 0, 512),
    "all rows, all keys (36 tiles)": mult(0, n, 0, n),
}
base = lambda i=0: iidkern.attention(q, k, v)  # noqa: E731
for label, m in cases.items():
    fn = lambda i=0, m=m: iidkern.attention(q, k, v, block_multiplier=m)  # noqa: E731
    r = paired_ratios(fn, base, 1, rounds=3, reps=40)
    gr = paired_graph_ratio(fn, base, 1, reps=30)
    print(f"{label:38s} {statistics.median(r):.3f}x plain, graph {gr:.3f}x", flush=True)
