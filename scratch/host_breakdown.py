"""Scratch (GPU): where the host time of a plain Hopper-path call goes (768 tokens, bf16).

Each piece is timed alone over many calls (no sync inside the loop), then cProfile of the
whole call. Compared with SDPA (cuDNN) host time per call on the same tensors."""
import cProfile
import pstats
import time

import torch
import torch.nn.functional as F

import iidkern
from iidkern.kernels import hopper_fwd, launch


def per_call_us(fn, n=3000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return 1e6 * (t1 - t0) / n


q, k, v = (torch.randn(1, 24, 768, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
out = torch.empty_like(q)
rows = []
rows.append(("sdpa cudnn", per_call_us(lambda: F.scaled_dot_product_attention(q, k, v))))
rows.append(("iidkern.attention (hopper)", per_call_us(lambda: iidkern.attention(q, k, v))))
rows.append(("launch.triton_attention", per_call_us(lambda: launch.triton_attention(
    q, k, v, layout="bhnd", scale=0.088, tags=None, head_weights=None, probes=(), block_multiplier=None,
    pair_stats=None, need_lse=False, count_tiles=False, kernel_options=None))))
rows.append(("hopper_fwd.hopper_attention", per_call_us(lambda: hopper_fwd.hopper_attention(
    q, k, v, out, layout="bhnd", scale=0.088))))
rows.append(("3 descriptors", per_call_us(lambda: (hopper_fwd._descriptor(q, "bhnd", 64),
                                                    hopper_fwd._descriptor(k, "bhnd", 128),
                                                    hopper_fwd._descriptor(v, "bhnd", 128)))))
rows.append(("torch.empty like q", per_call_us(lambda: torch.empty(q.shape, dtype=q.dtype, device=q.device))))
rows.append(("usable()", per_call_us(lambda: hopper_fwd.usable(q, k, v, "bhnd"))))
rows.append(("_validate_qkv", per_call_us(lambda: __import__("iidkern.validate").validate.check_qkv(q, k, v, "bhnd"))))
rows.append(("default_config", per_call_us(lambda: launch.default_config(128, torch.bfloat16))))

# The launcher pieces: key building and the compiled kernel's own launch.
L = hopper_fwd._ATTN_HOPPER
descs = (hopper_fwd._descriptor(q, "bhnd", 64), hopper_fwd._descriptor(k, "bhnd", 128),
         hopper_fwd._descriptor(v, "bhnd", 128))
args = (*descs, out, *out.stride()[:3], out, out, 0, 0, 0, out, 0, 0, 0, 0, 0, 1, out, 24, 768, 768, 0.127)
grid = (6, 24)
(compiled, constexprs), = [e for kk, e in L._cache.items()][:1]
rows.append(("compiled[grid](...)", per_call_us(lambda: compiled[(6, 24, 1)](*args, *constexprs))))
rows.append(("Launcher key w/o descriptors", per_call_us(lambda: (
    args[L._first_tensor].get_device(), L._other_pos(args),
    tuple([(t.dtype, t.data_ptr() & 15 == 0) for t in L._tensor_pos(args)])))))
from iidkern.kernels import fast_launch
rows.append(("3 descriptor keys", per_call_us(lambda: [fast_launch._descriptor_key(d) for d in descs])))
for name, us in rows:
    print(f"{name:32s} {us:7.1f} us/call")

pr = cProfile.Profile()
pr.enable()
for _ in range(2000):
    iidkern.attention(q, k, v)
pr.disable()
torch.cuda.synchronize()
pstats.Stats(pr).sort_stats("tottime").print_stats(25)
