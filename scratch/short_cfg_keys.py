"""Scratch (GPU): candidate tiles for short plain D=128 calls over the key counts, batches and
head counts that route to SHORT_KEYS_CONFIG (< 1024 keys), and around it, against cuDNN: paired
CUDA-graph ratios (bench.timing.paired_graph_ratio), bf16 (NOTES.md 59)."""
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import iidkern
from bench.timing import num_input_sets, paired_graph_ratio

CONFIGS = {
    "default 64x64 s3": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    "64x32 s3": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
    "64x32 s3 r168": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3, maxnreg=168),
    "64x32 s4 r168": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=4, maxnreg=168),
    "64x32 s2 r168": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2, maxnreg=168),
    "64x32 s3 r128": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3, maxnreg=128),
    "hopper": dict(hopper=True),
}
# First run (NOTES.md 59): the bench's and NOTES 45's shapes; "check": shapes that test the rule it suggested.
SHAPES = [(1, 24, 768), (1, 24, 512), (1, 24, 300), (1, 24, 896), (2, 24, 768), (4, 24, 768), (1, 8, 768),
          (1, 24, 1024), (1, 24, 1152), (1, 24, 1536)]
if "check" in sys.argv[1:]:
    CONFIGS = {k: CONFIGS[k] for k in ("default 64x64 s3", "64x32 s3 r168", "hopper")}
    CONFIGS["as routed"] = {}
    SHAPES = [(1, 16, 1024), (2, 12, 768), (1, 24, 640), (1, 32, 768), (3, 8, 1024), (1, 24, 960), (2, 16, 512),
              (1, 20, 1024), (1, 48, 512), (1, 24, 832)]
for b, h, n in SHAPES:
    size = b * h * n * 128 * 2 * 3
    n_sets = num_input_sets(size)
    inputs = [tuple(torch.randn(b, h, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
              for _ in range(n_sets)]

    def cudnn(i):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(*inputs[i])
    cudnn(0)
    out = {}
    for label, cfg in CONFIGS.items():
        def call(i, cfg=cfg):
            return iidkern.attention(*inputs[i], kernel_options=cfg)
        try:
            call(0)
            out[label] = [paired_graph_ratio(call, cudnn, n_sets) for _ in range(2)]
        except Exception as e:  # noqa: BLE001 - a config that does not compile or fit
            out[label] = f"{type(e).__name__}"
    print(f"B={b} H={h} N={n}: " + ", ".join(
        f"{k} {v if isinstance(v, str) else '/'.join(f'{x:.3f}' for x in v)}" for k, v in out.items()), flush=True)
