"""Scratch (GPU): the persistent Hopper kernel (one program per SM walking work tiles) against
one program per work tile and cuDNN, plain calls, bf16; call-by-call interleaved ratios
(bench/timing.paired_ratios) and CUDA-graph times. Checks both against SDPA first."""
import statistics
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from iidkern.kernels import hopper_fwd
from bench.timing import paired_ratios
from graph_timing import graph_ms
from bench.workloads import DTYPES, SHAPES, random_qkv


def hopper(persistent, q, k, v, out, scale):
    def run(i=0):
        saved = hopper_fwd.PERSISTENT
        hopper_fwd.PERSISTENT = persistent
        try:
            hopper_fwd.hopper_attention(q, k, v, out, layout="bhnd", scale=scale)
        finally:
            hopper_fwd.PERSISTENT = saved
        return out
    return run


for name in (sys.argv[1].split(",") if len(sys.argv) > 1 else ["flux_1024", "flux_edit", "flux_512", "flux_256"]):
    shape = SHAPES[name]
    q, k, v = random_qkv(shape, DTYPES["bf16"], torch.device("cuda"), seed=0)
    scale = shape.head_dim ** -0.5
    out_p, out_n = torch.full_like(q, float("nan")), torch.full_like(q, float("nan"))
    pers, nonp = hopper(True, q, k, v, out_p, scale), hopper(False, q, k, v, out_n, scale)

    def cudnn(i=0):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    ref = cudnn().float()
    pers(), nonp()
    torch.cuda.synchronize()
    for label, o in (("persistent", out_p), ("per-tile", out_n)):
        err = ((o.float() - ref).norm() / ref.norm()).item()
        print(f"{name} {label}: rel err vs cuDNN {err:.2e}, NaN {torch.isnan(o).any().item()}", flush=True)
    rp = paired_ratios(pers, cudnn, 1, rounds=5, reps=40)
    rn = paired_ratios(nonp, cudnn, 1, rounds=5, reps=40)
    rpn = paired_ratios(pers, nonp, 1, rounds=5, reps=40)
    g_c, g_p, g_n = graph_ms(cudnn), graph_ms(pers), graph_ms(nonp)
    print(f"{name}: paired persistent/cuDNN {statistics.median(rp):.3f}, per-tile/cuDNN {statistics.median(rn):.3f}, "
          f"persistent/per-tile {statistics.median(rpn):.3f} {[round(x, 3) for x in rpn]}; graph ms cuDNN {g_c:.4f} "
          f"persistent {g_p:.4f} ({g_p / g_c:.3f}x) per-tile {g_n:.4f} ({g_n / g_c:.3f}x)", flush=True)
