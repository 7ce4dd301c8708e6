"""Scratch: extras cost over plain (x own plain) at Flux 1024^2 / SD3 1024^2, and probe tile variants."""
import torch, triton
import iidkern
from iidkern import Probe, TokenGroups as TG, BlockMultiplier

def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=300, return_mode="median")

print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
for name, h, nt, ni, d in [("flux1024", 24, 512, 4096, 128), ("sd3", 24, 333, 4096, 64)]:
    n = nt + ni
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    call = lambda **kw: iidkern.attention(q, k, v, layout="bnhd", **kw)
    t_plain = bench(call)
    instr = [(0, 128), (128, 256), (256, 384)]
    iid = Probe(TG.each(nt, n), TG.segments(instr, n, device="cuda"), heads="keep")
    txt = Probe(TG.each(0, nt), TG.each(nt, n), heads="mean")
    mult = BlockMultiplier(torch.rand(1, ni, nt, device="cuda") * 2, query_start=nt, key_start=0)
    mult16 = BlockMultiplier(mult.values.bfloat16(), query_start=nt, key_start=0)
    rows = [("plain", {}), ("mult fp32", dict(block_multiplier=mult)), ("mult bf16", dict(block_multiplier=mult16)),
            ("lse only", dict(return_lse=True)),
            ("iid probe", dict(probes=(iid,))), ("txt probe", dict(probes=(txt,))), ("both probes", dict(probes=(iid, txt)))]
    for pv in [dict(PROBE_BLOCK_M=128, PROBE_BLOCK_N=128, PROBE_NUM_WARPS=8, PROBE_NUM_STAGES=3),
               dict(PROBE_BLOCK_M=64, PROBE_BLOCK_N=64, PROBE_NUM_WARPS=4, PROBE_NUM_STAGES=3),
               dict(PROBE_BLOCK_M=128, PROBE_BLOCK_N=64, PROBE_NUM_WARPS=8, PROBE_NUM_STAGES=3),
               dict(PROBE_BLOCK_M=64, PROBE_BLOCK_N=128, PROBE_NUM_WARPS=4, PROBE_NUM_STAGES=3)]:
        tag = "txt probe %dx%d w%d s%d" % (pv["PROBE_BLOCK_M"], pv["PROBE_BLOCK_N"], pv["PROBE_NUM_WARPS"], pv["PROBE_NUM_STAGES"])
        rows.append((tag, dict(probes=(txt,), kernel_options=pv)))
    rows.append(("iid probe 128x64 w8", dict(probes=(iid,), kernel_options=dict(PROBE_BLOCK_M=128, PROBE_BLOCK_N=64, PROBE_NUM_WARPS=8))))
    rows.append(("iid probe 64x128 w4", dict(probes=(iid,), kernel_options=dict(PROBE_BLOCK_M=64, PROBE_BLOCK_N=128, PROBE_NUM_WARPS=4))))
    print(f"{name}: plain {t_plain:.3f} ms")
    for rname, kw in rows:
        try:
            t = bench(lambda: call(**kw))
            print(f"  {rname:28s} {t:.3f} ms  x{t / t_plain:.3f} plain")
        except Exception as e:
            print(f"  {rname:28s} failed: {type(e).__name__}: {str(e)[:160]}")
