"""GPU fuzz: random shapes, dtypes, layouts and extras through iidkern.attention (Triton and
Gluon kernels, as routed) against the float64 reference on the same GPU.

Run on the device: python3 scratch/gpu_fuzz.py [seconds] [first_seed]
"""
import os
import sys
import time

import torch

import iidkern
from iidkern import BlockMultiplier, Probe, TokenGroups as TG, ValueProbe
from iidkern.reference import attention_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
MAXN = int(os.environ.get("MAXN", 2600))  # CPU (interpreter) sanity runs: MAXN=150
OUT_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
PROBE_TOL = 3e-3


def rel(a, b):
    a, b = a.double(), b.double()
    if torch.isnan(a).any():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def case(seed):
    g = torch.Generator().manual_seed(seed)

    def ri(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    def rf():
        return float(torch.rand(1, generator=g))

    dtype = [torch.bfloat16, torch.float16, torch.float32][ri(0, 2) if rf() < 0.4 else ri(0, 1)]
    layout = ["bhnd", "bnhd"][ri(0, 1)]
    d = [128, 128, 128, 64, 96, 32, 80][ri(0, 6)]
    b, h = ri(1, 3), ri(1, 6)
    nq = ri(1, MAXN) if rf() < 0.8 else ri(1, min(200, MAXN))
    nk = nq if rf() < 0.5 else ri(1, MAXN)
    shape = lambda n: (b, h, n, d) if layout == "bhnd" else (b, n, h, d)  # noqa: E731
    q = torch.randn(shape(nq), generator=g).to(dtype).to(DEV)
    k = torch.randn(shape(nk), generator=g).to(dtype).to(DEV)
    v = torch.randn(shape(nk), generator=g).to(dtype).to(DEV)
    kw, desc = {}, [f"seed={seed} {dtype} {layout} B={b} H={h} Nq={nq} Nk={nk} D={d}"]
    if rf() < 0.4:
        tag_dtype = [torch.int32, torch.int64][ri(0, 1)]
        nb = ri(1, 4)
        qt = (torch.rand(b, nq, nb, generator=g) < 0.6).long() @ (1 << torch.arange(nb))
        kt = (torch.rand(b, nk, nb, generator=g) < 0.6).long() @ (1 << torch.arange(nb))
        if rf() < 0.3:  # block structure: whole runs of one segment
            qt = (1 << (torch.arange(nq) * nb // nq)).expand(b, nq)
            kt = (1 << (torch.arange(nk) * nb // nk)).expand(b, nk)
        qt, kt = qt.to(tag_dtype).to(DEV).contiguous(), kt.to(tag_dtype).to(DEV).contiguous()
        kw["tags"] = iidkern.tag_mask(qt, kt) if rf() < 0.5 else (qt, kt)
        desc.append("tags")
    if rf() < 0.3:
        kw["head_weights"] = (1 + torch.rand(b, h, generator=g)).to(DEV)
        desc.append("hw")
    probes = []
    if rf() < 0.4 and nk >= 2:
        n_groups = ri(1, min(8, nk))
        cuts = sorted(set(int(x) for x in torch.randint(1, nk, (n_groups - 1,), generator=g))) if n_groups > 1 else []
        lo = ri(0, nk - 1)
        edges = [lo] + [c for c in cuts if c > lo] + [nk]
        ranges = [(a, c) for a, c in zip(edges, edges[1:]) if c > a][:32]
        q0 = ri(0, nq - 1)
        probes.append(Probe(TG.each(q0, nq), TG.segments(ranges, nk, device=DEV), heads="keep", normalize="keys"))
        desc.append(f"kg{len(ranges)}")
    if rf() < 0.3:
        q1 = ri(1, nq)
        probes.append(Probe(TG.each(0, q1), TG.each(ri(0, nk - 1), nk), heads="mean"))
        desc.append("map")
    if rf() < 0.1:
        probes.append(ValueProbe(torch.randn(b, nk, ri(1, 4), generator=g).to(DEV),
                                 TG.segments([(0, max(1, nq // 2))], nq, device=DEV)))
        desc.append("vp")
    if probes:
        kw["probes"] = probes
    if rf() < 0.25:
        mq, mk = ri(1, nq), ri(1, nk)
        qs, ks = ri(0, nq - mq), ri(0, nk - mk)
        vals = 2 * torch.rand((b, mq, mk) if rf() < 0.7 else (b, h, mq, mk), generator=g)
        kw["block_multiplier"] = BlockMultiplier(vals.to(DEV), qs, ks)
        desc.append("mult")
    if b >= 2 and rf() < 0.25:
        kw["pair_stats"] = [(0, 1)]
        desc.append("pairs")
    lse = rf() < 0.4
    return q, k, v, layout, kw, lse, " ".join(desc)


def check(seed):
    q, k, v, layout, kw, lse, desc = case(seed)
    res = iidkern.attention(q, k, v, layout=layout, return_lse=True, backend="triton", kernel_options={"poison": True}, **kw)
    ref_kw = dict(kw)
    tags = kw.get("tags")
    if tags is not None and not isinstance(tags, tuple):
        ref_kw["tags"] = (tags.q_tags, tags.k_tags)
    if "pair_stats" in ref_kw:
        ref_kw["pair_stats"] = torch.tensor(ref_kw["pair_stats"])
    ref = attention_reference(q, k, v, layout=layout, compute_dtype=torch.float64, **ref_kw)
    errs = [("out", rel(res.out, ref.out), OUT_TOL[q.dtype])]
    fin = torch.isfinite(ref.lse)
    same_inf = torch.equal(torch.isinf(res.lse), torch.isinf(ref.lse))
    lse_err = (res.lse[fin].double() - ref.lse[fin]).abs().max().item() if fin.any() else 0.0
    errs.append(("lse", 0.0 if same_inf else float("inf"), 1.0))
    errs.append(("lse_abs", lse_err, 2e-3 * max(1.0, ref.lse[fin].abs().max().item() if fin.any() else 1.0)))
    for i, (a, r) in enumerate(zip(res.probes, ref.probes)):
        errs.append((f"probe{i}", rel(a, r) if r.norm() > 0 else a.abs().max().item(), PROBE_TOL))
    if res.pair_stats is not None:
        o = res.out.double() if layout == "bhnd" else res.out.double().transpose(1, 2)  # taken on the returned out
        want = (o[0] * o[1]).sum((1, 2))
        errs.append(("pair_dot", rel(res.pair_stats.dot[0], want), 1e-5))
        errs.append(("pair_norm0", rel(res.pair_stats.norm0_sq[0], (o[0] * o[0]).sum((1, 2))), 1e-5))
    bad = [(n, e, t) for n, e, t in errs if not e < t]
    return desc, bad


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 120
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    end, n, fails = time.time() + seconds, 0, 0
    while time.time() < end:
        try:
            desc, bad = check(seed)
        except Exception as e:  # noqa: BLE001 (report every kind of failure)
            desc, bad = f"seed={seed}", [("exception", repr(e)[:300], None)]
        n += 1
        if bad:
            fails += 1
            print("FAIL", desc, bad, flush=True)
        seed += 1
    print(f"gpu fuzz: {n} cases, {fails} failed (last seed {seed - 1})", flush=True)


if __name__ == "__main__":
    main()
