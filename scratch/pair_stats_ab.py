"""Scratch (GPU): where the pair-statistics call's time goes at Flux 1024² B=2, and which
launch shape of the pass reads the two outputs fastest (graph replays, median). The pass
kernel walks token tiles pid, pid + n_progs, ...: with n_progs = the tile count it is one
tile a program (the pass before NOTES.md 46), with fewer a looping grid (adopted there)."""
import torch
import triton

import iidkern
from graph_timing import graph_ms
from iidkern.kernels.pair_stats import pair_stats_kernel
from bench.workloads import DTYPES, SHAPES, random_qkv


shape = SHAPES["flux_1024_b2"]
q, k, v = random_qkv(shape, DTYPES["bf16"], torch.device("cuda"), seed=0)
pairs = torch.tensor([[0, 1]])
out = iidkern.attention(q, k, v)
B, H, N, D = out.shape
ref = iidkern.attention(q, k, v, pair_stats=pairs).pair_stats
base = graph_ms(lambda: iidkern.attention(q, k, v))
full = graph_ms(lambda: iidkern.attention(q, k, v, pair_stats=pairs))
print(f"plain {base:.4f} ms, with pair stats {full:.4f} ms ({full / base:.3f}x, +{1000 * (full - base):.1f} us)")


def looped(np_, bt, nw):
    part = torch.empty((H, np_, 3), device="cuda", dtype=torch.float32)

    def run():
        pair_stats_kernel[(np_, H)](out, part, 0, 1, *out.stride()[:3], H, N, D, np_, BLOCK_T=bt, BLOCK_D=D,
                                    num_warps=nw)
        return part.sum(1)
    return run


def current(bt, nw):  # one token tile a program
    return looped(triton.cdiv(N, bt), bt, nw)


def after_attn(fn):
    def run():
        iidkern.attention(q, k, v)
        fn()
    return run


variants = {f"cur bt{bt} w{nw}": current(bt, nw) for bt in (32, 64, 128) for nw in (4, 8)}
variants.update({f"loop p{p} bt{bt} w{nw}": looped(p, bt, nw) for p in (6, 11, 22) for bt in (16, 32) for nw in (4, 8)})
copy_ms = graph_ms(lambda: out.clone())
print(f"clone of out ({out.numel() * 2 / 1e6:.1f} MB read+write): {copy_ms * 1000:.1f} us")
for name, fn in variants.items():
    s = fn()
    err = (s[:, 0] - ref.dot[0]).abs().max().item() / ref.dot[0].abs().max().item()
    alone = graph_ms(fn)
    both = graph_ms(after_attn(fn))
    print(f"{name:20s} alone {alone * 1000:6.1f} us  after attention +{1000 * (both - base):6.1f} us  rel err {err:.1e}")
