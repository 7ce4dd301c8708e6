"""Quick timing: iidkern vs SDPA (cuDNN / flash) at the three issue shapes; scratch, not the bench suite."""
import sys, torch, triton, time
import iidkern
from iidkern import Probe, TokenGroups as TG
from torch.nn.attention import sdpa_kernel, SDPBackend
import torch.nn.functional as F

def bench(fn, reps=100):
    return triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median")

rows = []
for name, h, nt, ni, d in [("flux1024", 24, 512, 4096, 128), ("fluxedit", 24, 512, 8192, 128), ("sd3", 24, 333, 4096, 64)]:
    n = nt + ni
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    t0 = time.time(); iidkern.attention(q, k, v, layout="bnhd"); torch.cuda.synchronize(); first = time.time() - t0
    t_ours = bench(lambda: iidkern.attention(q, k, v, layout="bnhd"))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    res = {}
    for bname, be in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]:
        try:
            with sdpa_kernel(be):
                res[bname] = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt))
        except Exception as e:
            res[bname] = float("nan")
    instr = torch.full((n,), -1, dtype=torch.int32, device="cuda"); instr[0:100], instr[100:250], instr[250:300] = 0, 1, 2
    probes = [Probe(TG.each(nt, n), TG.ids(instr, 3, span=(0, 300)), heads="keep"), Probe(TG.each(0, nt), TG.each(nt, n), heads="mean")]
    t_probe = bench(lambda: iidkern.attention(q, k, v, layout="bnhd", probes=probes))
    flops = 4 * h * n * n * d
    rows.append((name, t_ours, res["cudnn"], res["flash"], t_probe, first, flops / t_ours / 1e9))
print(f"torch {torch.__version__} triton {triton.__version__} {torch.cuda.get_device_name()}")
print("shape      iidkern  cudnn  flash  +probes  first_call_s  TFLOP/s")
for r in rows:
    print(f"{r[0]:10s} {r[1]:.3f}  {r[2]:.3f}  {r[3]:.3f}  {r[4]:.3f}  {r[5]:.1f}  {r[6]:.0f}")
