"""The fuzz's faulting call (device log .device/3/calls1.log, last line), over random fills."""
import json, os, sys
import torch
import iidkern
from iidkern import Probe, TokenGroups as TG

sys.path.insert(0, "tests")
from oracle import oracle

DEV = os.environ.get("DEV", "cuda")
for seed in range(int(sys.argv[1]) if len(sys.argv) > 1 else 6):
    g = torch.Generator().manual_seed(seed)
    b, h, nq, nk, d = 3, 2, int(os.environ.get("NQ", 5)), 289, int(os.environ.get("D", 40))
    opts = {"poison": True, **json.loads(os.environ.get("OPTS", "{}"))}
    use_tags = os.environ.get("TAGS", "1") == "1"
    buf = torch.randn(b, max(nq, nk), 3, h, d, generator=g).to(DEV, torch.bfloat16)
    q, k, v = (t.transpose(1, 2) for t in (buf[:, :nq, 0], buf[:, :nk, 1], buf[:, :nk, 2]))
    qt = torch.randint(0, 8, (nq,), generator=g)
    kt = torch.randint(0, 8, (nk,), generator=g)
    kid = torch.randint(-1, 5, (nk,), generator=g).to(torch.int16)
    kid[0], kid[-3] = 4, 0
    kid[-2:] = -1
    qid = torch.randint(0, 4, (3, nq), generator=g, dtype=torch.int32)
    qid[:, 0] = 3
    k1 = torch.full((nk,), -1, dtype=torch.int32)
    k1[33], k1[225] = 0, 0
    probes = [Probe(TG.ids(torch.zeros(nq, dtype=torch.int32)), TG.each(5, 6)),
              Probe(TG.each(0, 1), TG.ids(kid)),
              Probe(TG.ids(qid), TG.ids(k1), heads=torch.rand(3, 2, generator=g).to(DEV))]
    tags = (qt.to(DEV), kt.to(DEV)) if use_tags else None
    res = iidkern.attention(q, k, v, tags=tags, probes=probes, kernel_options=opts)
    torch.cuda.synchronize() if DEV == "cuda" else None
    want = oracle(q, k, v, tags=(qt, kt) if use_tags else None, probes=probes)
    errs = [((res.out.double().cpu() - want.out).norm() / want.out.norm()).item()]
    errs += [((gp.double().cpu() - wp).norm() / wp.norm().clamp_min(1e-30)).item() for gp, wp in zip(res.probes, want.probes)]
    print(seed, "ok", " ".join(f"{e:.1e}" for e in errs), flush=True)
