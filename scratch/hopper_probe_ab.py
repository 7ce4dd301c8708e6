"""Scratch (GPU): probes on the Hopper kernel (key-group probe in its main pass, the text x
image map in the probe pass after it) against the plain call of the same kernel and against
the Triton kernel's probe call, interleaved; CUDA-graph ratios beside (NOTES.md 32)."""
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import iidkern
from ab_timing import interleaved_ratios
from graph_timing import graph_ms
from bench.workloads import DTYPES, SHAPES, build_workload, random_qkv

shapes = sys.argv[1].split(",") if len(sys.argv) > 1 else ["flux_1024", "flux_edit", "flux_2048", "flux_512"]
TRITON = {"hopper": False}
for name in shapes:
    shape = SHAPES[name]
    q, k, v = random_qkv(shape, DTYPES["bf16"], torch.device("cuda"), seed=0)
    w = build_workload(shape, DTYPES["bf16"], "probe", torch.device("cuda"))
    iid, text_image = w.probes
    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    fns = {
        "hopper": lambda: iidkern.attention(q, k, v),
        "cudnn": cudnn,
        "hopper+iid": lambda: iidkern.attention(q, k, v, probes=[iid]),
        "hopper+map": lambda: iidkern.attention(q, k, v, probes=[text_image]),
        "hopper+both": lambda: iidkern.attention(q, k, v, probes=[iid, text_image]),
        "triton": lambda: iidkern.attention(q, k, v, kernel_options=TRITON),
        "triton+both": lambda: iidkern.attention(q, k, v, probes=[iid, text_image], kernel_options=TRITON),
    }
    interleaved_ratios(fns, "hopper", rounds=5, label=name)
    base = graph_ms(fns["hopper"])
    for label in ("cudnn", "hopper+iid", "hopper+map", "hopper+both", "triton", "triton+both"):
        print(f"{name:9s} graph {label:12s} {graph_ms(fns[label]) / base:.3f}x hopper (hopper {base:.4f} ms)", flush=True)
