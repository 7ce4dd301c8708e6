"""Scratch (GPU): the Hopper Gluon path of iidkern.attention against cuDNN and the Triton
kernel (kernel_options hopper=False), interleaved, at the D=128 sweep shapes; head weights,
LSE and pair statistics against the plain call of the same path (NOTES.md 31)."""
import sys
import torch
import iidkern
from ab_timing import interleaved_ratios
from torch.nn.attention import SDPBackend, sdpa_kernel
from bench.workloads import SHAPES, DTYPES, random_qkv

F = torch.nn.functional
shapes = sys.argv[1].split(",") if len(sys.argv) > 1 else ["flux_256", "flux_512", "flux_1024", "flux_edit", "flux_2048", "flux_1024_b2"]
for dt in ("bf16", "fp16"):
    for name in shapes:
        shape = SHAPES[name]
        q, k, v = random_qkv(shape, DTYPES[dt], torch.device("cuda"), seed=0)
        hw = torch.rand(shape.batch, shape.heads, device="cuda") + 0.5

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)
        fns = {"cudnn": cudnn, "hopper": lambda: iidkern.attention(q, k, v),
               "triton": lambda: iidkern.attention(q, k, v, kernel_options={"hopper": False})}
        if name in ("flux_1024", "flux_1024_b2") and dt == "bf16":
            fns["hopper+hw"] = lambda: iidkern.attention(q, k, v, head_weights=hw)
            fns["hopper+lse"] = lambda: iidkern.attention(q, k, v, return_lse=True)
            if shape.batch == 2:
                fns["hopper+pairs"] = lambda: iidkern.attention(q, k, v, pair_stats=[(0, 1)])
        interleaved_ratios(fns, "cudnn", rounds=5, label=f"{name}/{dt}")
