"""Replay the fuzz's faulting call shapes (device log .device/3/calls1.log) one variant per process."""
import os, sys, subprocess
import torch

VARIANT = os.environ.get("VARIANT")


def run(variant):
    import iidkern
    from iidkern import BlockMultiplier, Probe, TokenGroups as TG, ValueProbe
    sys.path.insert(0, "tests")
    from oracle import oracle
    g = torch.Generator().manual_seed(130)
    b, h, nq, nk, d = 3, 2, 5, 289, 40
    buf = torch.randn(b, max(nq, nk), 3, h, d, generator=g).to("cuda", torch.bfloat16)
    q, k, v = (t.transpose(1, 2) for t in (buf[:, :nq, 0], buf[:, :nk, 1], buf[:, :nk, 2]))
    qt = torch.randint(0, 8, (nq,), generator=g)
    kt = torch.randint(0, 8, (nk,), generator=g)
    ids_q = torch.zeros(3, 5, dtype=torch.int32)
    probes = []
    if "P" in variant:
        probes += [Probe(TG.ids(ids_q.cuda(), 1, span=(0, 5)), TG.each(5, 6)), Probe(TG.each(0, 1), TG.each(5, 6), heads="keep")]
    if "V" in variant:
        probes += [ValueProbe(torch.randn(nk, 1, generator=g).half().cuda(), TG.each(0, 1))]
    mult = BlockMultiplier(torch.rand(3, 2, 1, 1, generator=g).cuda()) if "M" in variant else None
    tags = (qt.cuda(), kt.cuda()) if "T" in variant else None
    res = iidkern.attention(q, k, v, tags=tags, probes=probes, block_multiplier=mult, return_lse=True,
                            kernel_options={"poison": True})
    torch.cuda.synchronize()
    want = oracle(q, k, v, tags=(qt, kt) if tags else None, probes=probes, block_multiplier=mult)
    errs = [((res.out.double().cpu() - want.out).norm() / want.out.norm()).item()]
    for gp, wp in zip(res.probes, want.probes):
        errs.append(((gp.double().cpu() - wp).norm() / wp.norm().clamp_min(1e-30)).item())
    print("ok", " ".join(f"{e:.1e}" for e in errs))


if VARIANT:
    run(VARIANT)
else:
    for prec in ["tf32", "tf32x3"]:
        for variant in ["PVMT", "V", "PT", "T"]:
            env = dict(os.environ, VARIANT=variant, IIDKERN_PRODUCT_PRECISION=prec, CUDA_LAUNCH_BLOCKING="1")
            r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=120)
            last = (r.stdout.strip().splitlines() or [""])[-1]
            err = [l for l in r.stderr.splitlines() if "Error" in l][-1:] 
            print(f"{prec:7s} {variant:5s} rc={r.returncode} {last} {err[0][:150] if err and r.returncode else ''}", flush=True)
