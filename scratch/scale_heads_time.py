"""GPU time of HeadRouter's head scaling of the edit row, the shipped copy (empty + copy + mul into
it) against the former clone + in-place product, Flux 1024^2 B=2 bf16 (torch.profiler GPU time). Not a test."""
import torch
from torch.profiler import ProfilerActivity, profile

from iidkern.edit.headrouter import scale_heads


def old(out, rows, weights):
    new = out.clone()
    w = weights.to(out.dtype)[:, None, :, None]
    for p, r in enumerate(rows):
        new[r].mul_(w[p])
    return new


out = torch.randn(2, 4608, 24, 128, device="cuda").to(torch.bfloat16)
w = 1 + torch.rand(1, 24, device="cuda")
assert torch.equal(old(out, (1,), w), scale_heads(out, (1,), w, "bnhd"))
for name, fn in (("clone + mul_", lambda: old(out, (1,), w)), ("empty + copy/mul", lambda: scale_heads(out, (1,), w, "bnhd"))):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
    gpu_us = sum(e.self_device_time_total for e in prof.key_averages()) / 50
    print(f"{name}: {gpu_us:.1f} us GPU per call")
