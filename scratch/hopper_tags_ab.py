"""Scratch (GPU): tags on the Hopper kernel (2026-11-27) against the Hopper plain, the Triton
kernel's tag call and the previous Hopper kernel's plain call (the code before tags: does the
refactor cost plain calls anything?). That copy is not kept: recreate it with
``git show 12a4659:kernels/hopper_fwd.py > scratch/hopper_fwd_prev.py`` to rerun this. Interleaved rounds of
launched calls (host paths alike: each variant calls hopper_attention directly where it can),
then CUDA-graph ratios."""
import importlib.util
import sys

import torch

import iidkern
from iidkern.kernels import hopper_fwd
from ab_timing import interleaved_ratios
from graph_timing import graph_ms
from bench.workloads import DTYPES, SHAPES, build_workload, random_qkv

spec = importlib.util.spec_from_file_location("iidkern.kernels.hopper_fwd_prev", "scratch/hopper_fwd_prev.py")
prev = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = prev
spec.loader.exec_module(prev)

shapes = sys.argv[1].split(",") if len(sys.argv) > 1 else ["flux_1024", "flux_edit"]
TRITON = {"hopper": False}
for name in shapes:
    shape = SHAPES[name]
    q, k, v = random_qkv(shape, DTYPES["bf16"], torch.device("cuda"), seed=0)
    scale = shape.head_dim ** -0.5
    out = torch.empty_like(q)
    fns = {
        "plain_new": lambda: hopper_fwd.hopper_attention(q, k, v, out, layout="bhnd", scale=scale),
        "plain_prev": lambda: prev.hopper_attention(q, k, v, out, layout="bhnd", scale=scale),
    }
    for feature in ("tags_0", "tags_50", "tags_iid"):
        w = build_workload(shape, DTYPES["bf16"], feature, torch.device("cuda"))
        tm = w.tag_mask
        fns[f"hopper+{feature}"] = (lambda tm=tm: hopper_fwd.hopper_attention(q, k, v, out, layout="bhnd",
                                                                               scale=scale, tags=tm))
        fns[f"triton+{feature}"] = (lambda tm=tm: iidkern.attention(q, k, v, tags=tm, kernel_options=TRITON))
        # exactness on these inputs, against the Triton kernel's call
        a = iidkern.attention(q, k, v, tags=tm, kernel_options={"poison": True})
        b = iidkern.attention(q, k, v, tags=tm, kernel_options=TRITON)
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        print(f"{name} {feature}: sparsity {tm.sparsity(128, 128):.3f}, rel diff vs triton {err:.2e}", flush=True)
    interleaved_ratios(fns, "plain_new", rounds=7, label=name)
    base = graph_ms(fns["plain_new"])
    for label in list(fns)[1:]:
        print(f"{name:9s} graph {label:17s} {graph_ms(fns[label]) / base:.3f}x plain_new ({base:.4f} ms)", flush=True)
