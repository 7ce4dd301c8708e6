"""Scratch (GPU): the fused key-group probe in an [image; text] layout, against the oracle.

Reproduces the compiled-kernel failure behind ``launch.fusable_key_span``: on the H100
with triton 3.6, fusing a key-group probe whose keys end in the ragged last key tile of an
untagged call gave an illegal memory access (or NaN sums) at SD3's layout, bf16, D=64.
Run one configuration per process (an illegal access poisons the CUDA context):

    python scratch/debug_kg.py bf16 64 text_last 4096 "{}" force

``force`` lifts the guard (the tail tile then updates the key groups); without it the
probe takes the probe pass. Prints NaN counts and the largest error against float32.
Inspecting the compiled IR (triton 3.6, `ttgir`) showed the tail's update converting
the [BLOCK_M, 16] sums between the 16-wide and the 64-wide wgmma layouts, which the
loops do not do: the suspect. The kernel now runs that tile in a one-tile loop when side
accumulators are present (no such conversions left in the IR); if this prints no NaN and
a small error with ``force``, ``launch.fusable_key_span`` can go.
"""
import sys

import torch

import iidkern
from iidkern import Probe, TokenGroups as TG
from iidkern.kernels import launch
from iidkern.reference import attention_reference

dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[sys.argv[1]]
d, order, n_img, opts = int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), eval(sys.argv[5])
if len(sys.argv) > 6 and sys.argv[6] == "force":
    launch.fusable_key_span = lambda *args: True
nt, h = 333, 4
n = nt + n_img
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(1, h, n, d, generator=g, device="cuda").to(dtype) for _ in range(3))
t0 = 0 if order == "text_first" else n_img
img0 = nt if order == "text_first" else 0
ids = torch.full((n,), -1, dtype=torch.int32)
ids[t0:t0 + 111], ids[t0 + 111:t0 + 222], ids[t0 + 222:t0 + nt] = 0, 1, 2
probe = Probe(TG.each(img0, img0 + n_img), TG.ids(ids.cuda(), 3, span=(t0, t0 + nt)), heads="keep", normalize="keys")
res = iidkern.attention(q, k, v, probes=[probe], kernel_options={"poison": True, **opts})
torch.cuda.synchronize()
ref = attention_reference(q, k, v, probes=[probe], compute_dtype=torch.float32)
p = res.probes[0]
bad = torch.isnan(p)
print(sys.argv[1:], "nan", int(bad.sum()), "err", float((p - ref.probes[0]).abs().nan_to_num(9.0).max()),
      "out err", float((res.out.float() - ref.out).abs().max()))
