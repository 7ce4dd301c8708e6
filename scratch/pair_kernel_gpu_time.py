"""GPU kernel time per HeadRouter default call (route + same-call DTR), Flux 1024^2 B=2 bf16: the
weighted output's pair statistics by the kernels' pair pass against the PyTorch form (session 30).
torch.profiler, the sum of device kernel times over 20 calls of each; host time is not counted."""
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.argv = sys.argv[:1]
os.environ["ROUNDS"] = "0"  # dtr_same_cost: set up and warm up only
sys.path.insert(0, os.path.dirname(__file__))
import dtr_same_cost as cost  # noqa: E402

for name in ("route+dtr same", "route+dtr same, torch stats", "route+dtr same", "route+dtr same, torch stats"):
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            cost.call(name)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_ms = sum(e.self_device_time_total for e in events) / 1e3 / 20
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:6]
    print(f"{name:30s} GPU kernels {total_ms:.3f} ms per call; top: " +
          "; ".join(f"{e.key[:40]} {e.self_device_time_total / 1e3 / 20:.3f}" for e in top))
