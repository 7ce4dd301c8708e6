"""Scratch (GPU): is call-by-call interleaving unbiased? Flux 1024² bf16: iidkern and cuDNN
each alone (back to back), interleaved with each other, and each interleaved with itself
(ratio must be 1); per-call medians in ms. Also iidkern after a cuDNN call vs after itself."""
import statistics

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import iidkern
from bench.timing import event_times_ms, paired_ratios
from bench.workloads import DTYPES, SHAPES, random_qkv

shape = SHAPES["flux_1024"]
sets = [random_qkv(shape, DTYPES["bf16"], torch.device("cuda"), seed=s) for s in range(2)]


def ours(i):
    return iidkern.attention(*sets[i])


def cudnn(i):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(*sets[i])


def cudnn_bare(i):  # backend chosen once outside: no context manager per call
    return torch.nn.functional.scaled_dot_product_attention(*sets[i])


for f in (ours, cudnn):
    for i in range(20):
        f(i % 2)
for rep in range(2):
    a = statistics.median(event_times_ms(ours, 2, 200, 10))
    b = statistics.median(event_times_ms(cudnn, 2, 200, 10))
    print(f"alone: iidkern {a:.4f} ms, cudnn {b:.4f} ms, ratio {a / b:.3f}", flush=True)
    for name, f, g in (("iidkern/cudnn", ours, cudnn), ("iidkern/iidkern", ours, ours), ("cudnn/cudnn", cudnn, cudnn)):
        r = paired_ratios(f, g, 2, rounds=5, reps=60)
        print(f"interleaved {name:16s} median {statistics.median(r):.3f} rounds {[round(x, 3) for x in r]}", flush=True)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        r = paired_ratios(ours, cudnn_bare, 2, rounds=5, reps=60)
    print(f"interleaved iidkern/cudnn (context outside) median {statistics.median(r):.3f}", flush=True)
