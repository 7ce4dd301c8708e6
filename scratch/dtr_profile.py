"""Where HeadRouter's attention side spends its time at Flux 1024^2 (B=2, bf16): per variant, the
wall time per call with calls back to back (one sync at the end: host and GPU overlap as in a
model), and a torch.profiler table of the GPU kernels and their times over 5 calls. Not a test."""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import iidkern
from iidkern.edit.headrouter import HeadRouterConfig, HeadRouterPolicy
from iidkern.policy import AttentionSite, attend

n_text, n_img, heads, dim = 512, 4096, 24, 128
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, n_text + n_img, heads, dim, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
text, image = (0, n_text), (n_text, n_text + n_img)
variants = {
    "plain": None,
    "route only": HeadRouterConfig(dtr_image="off"),
    "dtr previous": HeadRouterConfig(route=False, dtr_map="previous"),
    "dtr same": HeadRouterConfig(route=False, dtr_map="same"),
    "route+dtr same": HeadRouterConfig(dtr_map="same"),
}
only = sys.argv[1:]
for name, cfg in variants.items():
    if only and name not in only:
        continue
    policy = HeadRouterPolicy(cfg) if cfg is not None else None
    step = [0]

    def call():
        if policy is None:
            return iidkern.attention(q, k, v, layout="bnhd")
        step[0] += 1
        site = AttentionSite(block=0, block_kind="double", text=text, image=image, step=step[0])
        return attend(q, k, v, site, policy, backend="triton")

    for _ in range(5):
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(30):
        call()
    host = (time.perf_counter() - t0) / 30
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 30
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            call()
        torch.cuda.synchronize()
    gpu = sum(e.device_time_total for e in prof.key_averages()) / 5 / 1000
    print(f"\n=== {name}: wall {wall * 1e3:.3f} ms/call (host issue {host * 1e3:.3f}), GPU kernels {gpu:.3f} ms/call")
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]
    for e in rows:
        print(f"  {e.device_time_total / 5 / 1000:8.3f} ms  x{e.count // 5:<3d} {e.key[:90]}")
