"""Scratch (GPU): SD3 1024² probes on the Hopper kernel with the scratch-light tail split
(2 pieces, the default for head dim 64 below LONG_MIN_KEYS) against the model's 5 pieces
(forced), paired over the plain call; and each call's peak memory over the plain call's
(NOTES.md 68)."""
import torch

import iidkern
from ab_timing import bench_inputs, paired_summary
from bench.workloads import build_workload

dev = torch.device("cuda")
shape, dtype, inputs, n_sets = bench_inputs("sd3_1024")
probes = build_workload(shape, dtype, "probe", dev).probes
five = {"tail_split_tiles": 48, "tail_split_pieces": 5}


def plain(i):
    return iidkern.attention(*inputs[i])


def peak(fn) -> int:
    fn(0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(0)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


cases = {"iid light": dict(probes=probes[:1]), "iid 5 pieces": dict(probes=probes[:1], kernel_options=five),
         "both light": dict(probes=probes), "both 5 pieces": dict(probes=probes, kernel_options=five)}
plain_peak = peak(plain)
for label, kw in cases.items():
    def call(i, kw=kw):
        return iidkern.attention(*inputs[i], **kw)
    extra = (peak(call) - plain_peak) / 2 ** 20
    print(f"sd3_1024 {label:13s} {paired_summary(call, plain, n_sets)} peak {extra:+.1f} MiB over plain", flush=True)
