"""Scratch (GPU): runner step time with and without the plain-call replay, interleaved in one
process (the separate-process numbers move by +-1 ms). Usage: python scratch/runner_replay_ab.py [res]"""
import importlib
import statistics
import sys

import torch

from iidkern.mmdit.benchmark import time_forward
from iidkern.mmdit.flux import FluxConfig, FluxTransformer, image_ids

api = importlib.import_module("iidkern.attention")
res = int(sys.argv[1]) if len(sys.argv) > 1 else 512
model = FluxTransformer.random(FluxConfig.dev(num_double=2, num_single=2), device="cuda", dtype=torch.bfloat16)
side = res // 16
g = torch.Generator("cpu").manual_seed(0)
inputs = (torch.randn(1, side * side, 64, generator=g).cuda(), torch.randn(1, 512, 4096, generator=g).cuda(),
          torch.randn(1, 768, generator=g).cuda(), image_ids(side, side, device="cuda"))
rows = {"sdpa": [], "replay off": [], "replay on": []}
for round_ in range(5):
    rows["sdpa"].append(time_forward(model, inputs, backend="sdpa", iters=20))
    for name, on in (("replay off", False), ("replay on", True)):
        api._REPLAY = on
        rows[name].append(time_forward(model, inputs, backend="auto", iters=20))
print(f"runner {res}^2, replays kept: {len(api._REPLAYS)}")
for name, ts in rows.items():
    print(f"  {name:11s} median {statistics.median(ts):7.3f} ms  rounds {' '.join(f'{t:.2f}' for t in ts)}")
