"""Scratch (GPU): SD3 1024² (D=64, Triton kernel) block multiplier under launch options not
tried before (NOTES.md 16, 29 tried the 168 cap, BLOCK_N=32, 2 stages, the split alone), and
with bf16 values. Paired ratios over the plain call (bench.timing), the bench's workload."""
import statistics

import torch

import iidkern
from bench.timing import paired_graph_ratio, paired_ratios
from bench.workloads import Shape, build_workload, random_qkv
from iidkern.specs import BlockMultiplier

dev, dtype = torch.device("cuda"), torch.bfloat16
shape = Shape("sd3_1024", 1, heads=24, text=333, image=4096, head_dim=64, text_first=False)
sets = [random_qkv(shape, dtype, dev, seed=s)[:3] for s in range(2)]
w = build_workload(shape, dtype, "block_mult", dev)
m = w.multiplier
m16 = BlockMultiplier(m.values.to(torch.bfloat16), query_start=m.query_start, key_start=m.key_start)


def plain(i):
    return iidkern.attention(*sets[i])


ref = iidkern.attention(*sets[0], backend="reference", block_multiplier=m).float()
variants = [("default", m, None), ("bf16 values", m16, None), ("split + cap 168", m, {"mult_split": True, "maxnreg": 168}),
            ("4 stages", m, {"num_stages": 4}), ("128x64 w8", m, {"BLOCK_M": 128, "num_warps": 8}),
            ("64x64 w8", m, {"num_warps": 8}), ("cap 200", m, {"maxnreg": 200}), ("default", m, None)]
for name, mult, opts in variants:
    def call(i, mult=mult, opts=opts):
        return iidkern.attention(*sets[i], block_multiplier=mult, kernel_options=opts)
    try:
        err = ((call(0).float() - ref).abs().max() / ref.abs().max()).item()
        r = paired_ratios(call, plain, 2, rounds=3, reps=40)
        g = paired_graph_ratio(call, plain, 2)
        print(f"{name:16s} {statistics.median(r):.4f}x ({min(r):.3f}-{max(r):.3f}) graph {g:.4f}x err {err:.1e}", flush=True)
    except Exception as e:  # noqa: BLE001 - a config that does not compile is a result too
        print(f"{name:16s} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
for _ in range(3):
    t[0].record(); [m.values.to(torch.bfloat16) for _ in range(50)]; t[1].record(); torch.cuda.synchronize()
print(f"fp32 -> bf16 conversion of the values: {t[0].elapsed_time(t[1]) / 50 * 1000:.1f} us per call")
