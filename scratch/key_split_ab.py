"""Scratch (GPU): the Hopper kernel with and without the key split, beside cuDNN, at short
sequences (CUDA-graph time: GPU work only). Rounds interleaved; medians over rounds."""
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import iidkern


def graph_ms(fn, calls=20, reps=30):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / calls)
    return statistics.median(ts)


print(f"{'shape':22s} {'cuDNN':>8s} {'no split':>9s} {'split':>8s} {'default':>8s}   (ms, graph)")
for name, n, b in (("flux_256", 768, 1), ("flux_512", 1536, 1), ("flux_768", 2816, 1), ("flux_1024", 4608, 1),
                   ("flux_512 B=2", 1536, 2)):
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v = (torch.randn(b, 24, n, 128, device="cuda", dtype=dtype) for _ in range(3))
        fns = {"cudnn": lambda: F.scaled_dot_product_attention(q, k, v),
               "off": lambda: iidkern.attention(q, k, v, kernel_options={"key_split": False}),
               "on": lambda: iidkern.attention(q, k, v, kernel_options={"key_split": True}),
               "default": lambda: iidkern.attention(q, k, v)}
        ref = fns["cudnn"]()
        err = max((fns[x]() - ref).abs().max().item() for x in ("off", "on"))
        rows = {x: [] for x in fns}
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            for _ in range(3):
                for x, f in fns.items():
                    rows[x].append(graph_ms(f))
        med = {x: statistics.median(t) for x, t in rows.items()}
        print(f"{name + ' ' + str(dtype)[6:]:22s} {med['cudnn']:8.4f} {med['off']:9.4f} {med['on']:8.4f} "
              f"{med['default']:8.4f}   split/cuDNN {med['on'] / med['cudnn']:.3f}  no-split/cuDNN "
              f"{med['off'] / med['cudnn']:.3f}  max|diff| {err:.1e}")
