"""Config sweep + per-extra overhead breakdown (scratch; results go to bench/NOTES.md)."""
import itertools, sys, time, torch, triton
import iidkern
from iidkern import Probe, TokenGroups as TG, BlockMultiplier, ValueProbe
from torch.nn.attention import sdpa_kernel, SDPBackend
import torch.nn.functional as F

def bench(fn):
    return triton.testing.do_bench(fn, warmup=20, rep=80, return_mode="median")

SHAPES = [("flux1024", 24, 512, 4096, 128), ("fluxedit", 24, 512, 8192, 128), ("sd3", 24, 333, 4096, 64)]
mode = sys.argv[1] if len(sys.argv) > 1 else "all"
print(f"torch {torch.__version__} triton {triton.__version__} {torch.cuda.get_device_name()}", flush=True)
for name, h, nt, ni, d in SHAPES:
    n = nt + ni
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        t_cudnn = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt))
    base = bench(lambda: iidkern.attention(q, k, v, layout="bnhd"))
    print(f"\n== {name}: cudnn {t_cudnn:.3f} ms, iidkern default {base:.3f} ms ({t_cudnn/base*100:.0f}% of cudnn speed)", flush=True)
    if mode in ("all", "sweep"):
        best = []
        for bm, bn, w, s in itertools.product([64, 128], [64, 128], [4, 8], [2, 3, 4]):
            opts = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
            try:
                t = bench(lambda: iidkern.attention(q, k, v, layout="bnhd", kernel_options=opts))
            except Exception as e:
                continue
            best.append((t, opts))
        best.sort(key=lambda x: x[0])
        for t, o in best[:4]:
            print(f"   {t:.3f} ms  {o}", flush=True)
    if mode in ("all", "extras"):
        instr = torch.full((n,), -1, dtype=torch.int32, device="cuda"); instr[0:100], instr[100:250], instr[250:300] = 0, 1, 2
        iid = Probe(TG.each(nt, n), TG.ids(instr, 3, span=(0, 300)), heads="keep")
        txt_img = Probe(TG.each(0, nt), TG.each(nt, n), heads="mean")
        seg = torch.arange(n, device="cuda") // (n // 2 + 1)
        half = iidkern.tag_mask((1 << seg).expand(1, n).contiguous(), (1 << seg).expand(1, n).contiguous())
        qb = torch.cat([q, q]); kb = torch.cat([k, k]); vb = torch.cat([v, v])
        cases = {
            "iid_probe": dict(probes=[iid]),
            "txt_img_probe": dict(probes=[txt_img]),
            "both_probes": dict(probes=[iid, txt_img]),
            "value_probe": dict(probes=[ValueProbe(torch.randn(1, n, 4, device="cuda"), TG.each(nt, n))]),
            "tags_0pct": dict(tags=iidkern.tag_mask(torch.ones(1, n, dtype=torch.int64, device="cuda"), torch.ones(1, n, dtype=torch.int64, device="cuda"))),
            "tags_50pct": dict(tags=half),
            "head_w": dict(head_weights=torch.rand(h, device="cuda")),
            "mult": dict(block_multiplier=BlockMultiplier(torch.rand(1, ni, nt, device="cuda"), nt, 0)),
        }
        for cname, kw in cases.items():
            t = bench(lambda: iidkern.attention(q, k, v, layout="bnhd", **kw))
            extra = f" sparsity={kw['tags'].sparsity(128, 64):.2f}" if "tags" in kw else ""
            print(f"   {cname:14s} {t:.3f} ms  x{t/base:.3f}{extra}", flush=True)
        tb = bench(lambda: iidkern.attention(qb, kb, vb, layout="bnhd"))
        tp = bench(lambda: iidkern.attention(qb, kb, vb, layout="bnhd", pair_stats=[(0, 1)]))
        print(f"   pair_stats(B=2) {tp:.3f} ms  x{tp/tb:.3f}", flush=True)
