"""Scratch: does Triton's automatic warp specialization (tl.range(warp_specialize=True)) help the
plain main loop on this GPU? Times kernel_options variants against cuDNN, checks each result."""
import torch, triton, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
import iidkern

def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

variants = {
    "default": {},
    "ws 128x64 w8 s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, warp_specialize=True),
    "ws 128x64 w4 s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3, warp_specialize=True),
    "ws 128x128 w8 s2": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, warp_specialize=True),
    "ws 128x128 w4 s2": dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2, warp_specialize=True),
    "ws 64x64 w4 s3": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, warp_specialize=True),
    "128x128 w8 s2": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
}
print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
for name, h, n, d in [("flux1024", 24, 4608, 128), ("fluxedit", 24, 8704, 128), ("sd3", 24, 4429, 64)]:
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ref = F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
        t_cudnn = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt))
    print(f"{name}: cudnn {t_cudnn:.3f} ms")
    for vname, opts in variants.items():
        try:
            out = iidkern.attention(q, k, v, layout="bnhd", kernel_options=opts)
            err = (out.float() - ref.float()).abs().max().item()
            t = bench(lambda: iidkern.attention(q, k, v, layout="bnhd", kernel_options=opts))
            print(f"  {vname:18s} {t:.3f} ms  x{t / t_cudnn:.2f} cudnn  err {err:.1e}")
        except Exception as e:
            print(f"  {vname:18s} failed: {type(e).__name__}: {str(e)[:200]}")
