"""Scratch: fused key-group probe variants (range split or per-tile test, tf32 or fp16 sums)
and text x image probe tiles, timed interleaved (CUDA-graph replays, median of rounds)."""
import torch
import triton

import iidkern
from iidkern import Probe, TokenGroups as TG
from iidkern.reference import attention_reference
from graph_timing import graph_ms  # scratch/graph_timing.py (a script's folder is on sys.path)


print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
for name, h, nt, ni, d in [("flux1024", 24, 512, 4096, 128), ("fluxedit", 24, 512, 8192, 128), ("sd3", 24, 333, 4096, 64)]:
    n = nt + ni
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    instr = [(0, 128), (128, 256), (256, 384)] if nt >= 384 else [(0, 100), (100, 200), (200, 300)]
    iid = Probe(TG.each(nt, n), TG.segments(instr, n, device="cuda"), heads="keep")
    txt = Probe(TG.each(0, nt), TG.each(nt, n), heads="mean")
    cases = {
        "plain": {},
        "iid split tf32": dict(probes=(iid,)),
        "iid split fp16": dict(probes=(iid,), kernel_options=dict(kg_half_dot=True)),
        "iid test tf32": dict(probes=(iid,), kernel_options=dict(kg_split=False)),
        "iid test fp16": dict(probes=(iid,), kernel_options=dict(kg_split=False, kg_half_dot=True)),
        "iid 2nd pass": dict(probes=(iid,), kernel_options=dict(fuse_key_groups=False)),
        "txt 128x128 w8 s2": dict(probes=(txt,)),
        "txt 128x128 w8 s3": dict(probes=(txt,), kernel_options=dict(PROBE_NUM_STAGES=3)),
        "txt 64x64 w4 s3": dict(probes=(txt,), kernel_options=dict(PROBE_BLOCK_M=64, PROBE_BLOCK_N=64, PROBE_NUM_WARPS=4,
                                                                    PROBE_NUM_STAGES=3)),
        "both split fp16": dict(probes=(iid, txt), kernel_options=dict(kg_half_dot=True)),
        "both test fp16": dict(probes=(iid, txt), kernel_options=dict(kg_split=False, kg_half_dot=True)),
    }
    rounds = {c: [] for c in cases}
    for _ in range(5):
        for c, kw in cases.items():
            rounds[c].append(graph_ms(lambda: iidkern.attention(q, k, v, layout="bnhd", **kw)))
    med = {c: sorted(t)[2] for c, t in rounds.items()}
    ref = attention_reference(q, k, v, layout="bnhd", probes=[iid], compute_dtype=torch.float64).probes[0]
    errs = {}
    for c in ("iid split tf32", "iid split fp16", "iid 2nd pass"):
        got = iidkern.attention(q, k, v, layout="bnhd", **cases[c]).probes[0]
        errs[c] = ((got.double() - ref).norm() / ref.norm()).item()
    for c in cases:
        spread = (max(rounds[c]) - min(rounds[c])) / med[c]
        e = f"  rel.err {errs[c]:.1e}" if c in errs else ""
        print(f"{name:9s} {c:20s} {med[c]:.4f} ms  x{med[c] / med['plain']:.3f}  spread {spread:.1%}{e}")
