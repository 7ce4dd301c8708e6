"""Scratch (GPU): the fused key-group probe in an [image; text] layout, against the oracle.

The check behind NOTES.md 25: on the H100 with triton 3.6, a key-group probe whose keys
end in the ragged last key tile of an untagged call once gave an illegal memory access (or
NaN sums) at SD3's layout, bf16, D=64, when that tile ran outside the key-tile loops. The
kernel now runs it in a one-tile loop; this printed "nan 0" and errors ~4e-10 for bf16 and
fp16, D=64 and 128, ragged and whole last tiles (2026-11-23). One configuration per process
(an illegal access poisons the CUDA context):

    python scratch/debug_kg.py bf16 64 text_last 4096 "{}"

Prints NaN counts and the largest error against float32.
"""
import sys

import torch

import iidkern
from iidkern import Probe, TokenGroups as TG
from iidkern.reference import attention_reference

dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[sys.argv[1]]
d, order, n_img, opts = int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), eval(sys.argv[5])
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
