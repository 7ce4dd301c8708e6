"""Scratch (GPU): SD3 1024² block multiplier with its values' rows padded to a 16-byte stride
(a [B, 4096, 336] buffer viewed as [B, 4096, 333]) against the contiguous values (row stride
333 floats: no vector loads), paired over the plain call (NOTES.md 69)."""
import torch

import iidkern
from iidkern import BlockMultiplier
from ab_timing import bench_inputs, paired_summary
from bench.workloads import build_workload

dev = torch.device("cuda")
shape, dtype, inputs, n_sets = bench_inputs("sd3_1024")
mult = build_workload(shape, dtype, "block_mult", dev).multiplier
values = mult.values
b, mq, mk = values.shape
padded = torch.zeros(b, mq, (mk + 3) // 4 * 4, device=dev)
padded[..., :mk] = values
padded16 = torch.zeros(b, mq, (mk + 7) // 8 * 8, device=dev, dtype=torch.bfloat16)
padded16[..., :mk] = values
cases = {"contiguous fp32": mult,
         "padded fp32": BlockMultiplier(padded[..., :mk], mult.query_start, mult.key_start),
         "contiguous bf16": BlockMultiplier(values.bfloat16(), mult.query_start, mult.key_start),
         "padded bf16": BlockMultiplier(padded16[..., :mk], mult.query_start, mult.key_start)}


def plain(i):
    return iidkern.attention(*inputs[i])


ref = iidkern.attention(*inputs[0], block_multiplier=mult).float()
for label, m in cases.items():
    def call(i, m=m):
        return iidkern.attention(*inputs[i], block_multiplier=m)
    err = (call(0).float() - ref).abs().max().item()
    print(f"sd3_1024 mult {label:16s} {paired_summary(call, plain, n_sets)} max diff {err:.1e}", flush=True)
