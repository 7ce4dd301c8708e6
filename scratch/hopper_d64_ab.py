"""Scratch (GPU): the Hopper kernel at head_dim 64 (SD3) against the Triton kernel that serves
D=64 now, plain and with each extra (tags 0% / 50%, both probes, block multiplier), and cuDNN;
NBUF 3 vs 4 ring slots for the plain call (D=64 tiles are half the bytes). Interleaved rounds,
then CUDA-graph ratios. Replay off (IIDKERN_REPLAY=0), so every variant takes the checked path."""
import os
import sys

os.environ["IIDKERN_REPLAY"] = "0"
import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import iidkern  # noqa: E402
from iidkern.kernels import hopper_fwd  # noqa: E402
from ab_timing import interleaved_ratios  # noqa: E402
from graph_timing import graph_ms  # noqa: E402
from bench.workloads import DTYPES, SHAPES, build_workload, random_qkv  # noqa: E402

hopper_fwd.HEAD_DIMS = (64, 128)  # let usable() take D=64 at every length for this run
TRITON = {"hopper": False}


def with_nbuf(n, fn):
    def run():
        saved = hopper_fwd.NUM_BUFFERS
        hopper_fwd.NUM_BUFFERS = n
        try:
            return fn()
        finally:
            hopper_fwd.NUM_BUFFERS = saved
    return run


shapes = sys.argv[1].split(",") if len(sys.argv) > 1 else ["sd3_1024", "sd3_2048"]
for name in shapes:
    shape = SHAPES[name]
    q, k, v = random_qkv(shape, DTYPES["bf16"], torch.device("cuda"), seed=0)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    fns = {"triton": lambda: iidkern.attention(q, k, v, kernel_options=TRITON), "cudnn": cudnn,
           "hopper": lambda: iidkern.attention(q, k, v),
           "hopper_nbuf4": with_nbuf(4, lambda: iidkern.attention(q, k, v))}
    for feature in ("tags_0", "tags_50", "probe", "block_mult"):
        kw = build_workload(shape, DTYPES["bf16"], feature, torch.device("cuda")).iidkern_kwargs()
        fns[f"triton+{feature}"] = (lambda kw=kw: iidkern.attention(q, k, v, kernel_options=TRITON, **kw))
        fns[f"hopper+{feature}"] = (lambda kw=kw: iidkern.attention(q, k, v, **kw))
        a = iidkern.attention(q, k, v, kernel_options={"poison": True}, **kw)
        b = iidkern.attention(q, k, v, kernel_options=TRITON, **kw)
        a, b = (x if isinstance(x, torch.Tensor) else x.out for x in (a, b))
        print(f"{name} {feature}: rel diff hopper vs triton {((a.float() - b.float()).norm() / b.float().norm()).item():.2e}",
              flush=True)
    interleaved_ratios(fns, "triton", rounds=5, label=name)
    base = graph_ms(fns["triton"])
    for label in list(fns)[1:]:
        print(f"{name:9s} graph {label:20s} {graph_ms(fns[label]) / base:.3f}x triton ({base:.4f} ms)", flush=True)
