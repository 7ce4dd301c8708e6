"""Random-combination fuzz of iidkern.attention extras: triton (interpreter) vs reference vs float64 oracle.

Run:  cd /work/main && TRITON_INTERPRET=1 .venv/bin/python scratch/fuzz_extras.py [seconds] [first_seed]
"""
import math
import random
import sys
import time
import traceback

import torch

import iidkern
import iidkern.attention  # noqa: F401
from iidkern import BlockMultiplier, Probe, TokenGroups as TG, ValueProbe

api = sys.modules["iidkern.attention"]

OUT_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}
PROBE_TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 2e-2}
LAST_DESC = ""
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# --------------------------------------------------------------------------- oracle (float64)
def to_bhnd(t, layout):
    return t if layout == "bhnd" else t.transpose(1, 2)


def oracle(q, k, v, layout, scale, tags, hw, mult):
    qd, kd, vd = (to_bhnd(t, layout).double() for t in (q, k, v))
    b, h, nq, d = qd.shape
    nk = kd.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    s = qd @ kd.transpose(-1, -2) * scale
    allowed = None
    if tags is not None:
        qt, kt = (t.long().expand(b, t.shape[-1]) if t.dim() == 1 else t.long() for t in tags)
        allowed = (qt[:, :, None] & kt[:, None, :]) != 0
        s = s.masked_fill(~allowed[:, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)[..., None])
    pw = p
    if mult is not None:
        m = mult.values.double()
        m = m[:, None] if m.dim() == 3 else m
        full = torch.ones(b, m.shape[1], nq, nk, dtype=torch.float64)
        full[:, :, mult.query_start:mult.query_start + m.shape[-2], mult.key_start:mult.key_start + m.shape[-1]] = m
        pw = p * full
    out = pw @ vd
    if hw is not None:
        w = hw.double()
        w = w[None, :, None] if w.dim() == 1 else (w[:, :, None] if w.dim() == 2 else w)
        out = out * w[..., None]
    return out, lse, p


def onehot(groups, b, n):
    if groups.kind == "each":
        ids = torch.full((n,), -1, dtype=torch.long)
        ids[groups.start:groups.stop] = torch.arange(groups.count)
    else:
        ids = groups.group_ids.long()
    ids = ids.expand(b, n) if ids.dim() == 1 else ids
    return (ids[..., None] == torch.arange(groups.count)).double()  # [B, N, G]


def reduce_h(x, heads):
    if isinstance(heads, str):
        if heads == "keep":
            return x
        return x.mean(1, keepdim=True) if heads == "mean" else x.sum(1, keepdim=True)
    w = heads.double()
    w = w.expand(x.shape[0], x.shape[1]) if w.dim() == 1 else w
    return (x * w[:, :, None, None]).sum(1, keepdim=True)


def oracle_probe(p, probe, b, nq, nk):
    oq = onehot(probe.queries, b, nq)
    if isinstance(probe, Probe):
        ok = onehot(probe.keys, b, nk)
    else:
        x = probe.x.double()
        ok = x.expand(b, *x.shape) if x.dim() == 2 else x
    r = reduce_h(torch.einsum("bqg,bhqk,bkc->bhgc", oq, p, ok), probe.heads)
    if probe.normalize in ("queries", "both"):
        r = r / oq.sum(1).clamp_min(1)[:, None, :, None]
    if probe.normalize in ("keys", "both"):
        r = r / ok.sum(1).clamp_min(1)[:, None, None, :]
    return r


# --------------------------------------------------------------------------- comparisons
class Mismatch(AssertionError):
    pass


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_close(name, got, want, tol, floor=0.0):
    if tuple(got.shape) != tuple(want.shape):
        raise Mismatch(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    g = got.double()
    if torch.isnan(g).any():
        raise Mismatch(f"{name}: {int(torch.isnan(g).sum())} NaN of {g.numel()} (unwritten?) first at "
                       f"{torch.nonzero(torch.isnan(g))[0].tolist()}")
    w = want.double()
    if w.abs().max() == 0:
        if g.abs().max() > 0:
            raise Mismatch(f"{name}: want all zero, got max |x|={g.abs().max().item():.3e}")
        return
    e = ((g - w).norm() / max(w.norm().item(), floor * math.sqrt(w.numel()))).item()
    # elementwise too: max abs error relative to the max magnitude
    ea = ((g - w).abs().max() / max(w.abs().max().item(), floor)).item()
    if e > tol or ea > 4 * tol:
        idx = torch.argmax((g - w).abs()).item()
        idx = list(torch.unravel_index(torch.tensor(idx), g.shape))
        idx = [int(i) for i in idx]
        raise Mismatch(f"{name}: rel-norm err {e:.3e}, max-abs/max {ea:.3e} (tol {tol:.1e}); worst at {idx}: "
                       f"got {g[tuple(idx)].item():.6g} want {w[tuple(idx)].item():.6g}")


def check_lse(name, got, want, tol):
    if tuple(got.shape) != tuple(want.shape):
        raise Mismatch(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    if torch.isnan(got).any():
        raise Mismatch(f"{name}: NaN in LSE")
    gi, wi = torch.isinf(got), torch.isinf(want)
    if not torch.equal(gi, wi):
        raise Mismatch(f"{name}: -inf pattern differs ({int(gi.sum())} vs {int(wi.sum())})")
    fin = ~wi
    if fin.any():
        err = (got[fin].double() - want[fin].double()).abs().max().item()
        if err > tol * max(1.0, want[fin].abs().max().item()):
            raise Mismatch(f"{name}: max abs err {err:.3e}")


# --------------------------------------------------------------------------- random inputs
def make_tensor(rng, shape_bhnd, layout, dtype, view_kind):
    """A tensor of logical bhnd shape in the given layout, possibly a non-contiguous view."""
    b, h, n, d = shape_bhnd
    g = torch.Generator().manual_seed(rng.randrange(2**31))

    def rnd(*s):
        return (torch.randn(*s, generator=g) * rng.choice([0.5, 1.0, 2.0])).to(dtype)

    if view_kind == "contig":
        t = rnd(b, h, n, d)
        return t if layout == "bhnd" else t.transpose(1, 2).contiguous()
    if view_kind == "dpad":  # last-dim slice of a wider tensor
        t = rnd(b, h, n, d + 8)[..., 3:3 + d] if layout == "bhnd" else rnd(b, n, h, d + 8)[..., 3:3 + d]
        return t
    if view_kind == "nslice":  # token slice
        return rnd(b, h, n + 7, d)[:, :, 5:5 + n] if layout == "bhnd" else rnd(b, n + 7, h, d)[:, 5:5 + n]
    if view_kind == "transposed":  # the other layout's memory order
        return rnd(b, n, h, d).transpose(1, 2) if layout == "bhnd" else rnd(b, h, n, d).transpose(1, 2)
    if view_kind == "bexpand":  # batch broadcast (stride 0)
        t = rnd(1, h, n, d) if layout == "bhnd" else rnd(1, n, h, d)
        return t.expand(b, *t.shape[1:])
    raise ValueError(view_kind)


def make_qkv(rng, b, h, nq, nk, d, layout, dtype):
    kind = rng.choice(["contig", "contig", "packed", "dpad", "nslice", "transposed", "bexpand", "mixed"])
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    if kind == "packed" and nq == nk:
        if rng.random() < 0.5:  # [B, N, 3, H, D] (diffusers packed qkv)
            t = torch.randn(b, nq, 3, h, d, generator=g).to(dtype)
            parts = [t[:, :, i] for i in range(3)]
            parts = parts if layout == "bnhd" else [x.transpose(1, 2) for x in parts]
        else:  # [B, H, N, 3D]
            t = torch.randn(b, h, nq, 3 * d, generator=g).to(dtype)
            parts = [t[..., i * d:(i + 1) * d] for i in range(3)]
            parts = parts if layout == "bhnd" else [x.transpose(1, 2) for x in parts]
        return (*parts, "packed")
    kinds = [rng.choice(["contig", "dpad", "nslice", "transposed", "bexpand"]) for _ in range(3)] \
        if kind in ("mixed", "packed") else [kind] * 3
    q = make_tensor(rng, (b, h, nq, d), layout, dtype, kinds[0])
    k = make_tensor(rng, (b, h, nk, d), layout, dtype, kinds[1])
    v = make_tensor(rng, (b, h, nk, d), layout, dtype, kinds[2])
    return q, k, v, "/".join(kinds)


def make_tags_1(rng, b, n, nbits, dtype, batched):
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    density = rng.choice([0.1, 0.3, 0.6, 0.95])
    shape = (b, n) if batched else (n,)
    bits = torch.rand(*shape, nbits, generator=g) < density
    w = torch.tensor([1 << i for i in range(nbits)], dtype=torch.int64)
    t = (bits.long() * w).sum(-1)
    # some all-allowed and some empty tokens, and maybe a contiguous block of either
    r = rng.random()
    if r < 0.2:
        lo = rng.randrange(n)
        t[..., lo:lo + rng.randrange(1, n + 1)] = 0
    elif r < 0.4:
        lo = rng.randrange(n)
        t[..., lo:lo + rng.randrange(1, n + 1)] = -1
    elif r < 0.5:
        t[...] = -1
    elif r < 0.55:
        t[...] = 0
    return t.to(dtype)


def make_groups(rng, n, b, allow_many=True, want_ids_count=None):
    kind = rng.choice(["each", "ids", "ids", "single", "segments"]) if want_ids_count is None else "ids"
    if kind == "each":
        a = rng.randrange(n)
        return TG.each(a, rng.randrange(a + 1, n + 1)), "each"
    if kind == "single":
        a = rng.randrange(n)
        return TG.single(a, rng.randrange(a + 1, n + 1), n), "single"
    if kind == "segments":
        cuts = sorted(rng.sample(range(n + 1), min(n + 1, 2 * rng.randint(1, 4))))
        ranges = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2) if cuts[i] < cuts[i + 1]]
        if not ranges:
            ranges = [(0, n)]
        return TG.segments(ranges, n), f"segments{len(ranges)}"
    # ids
    if want_ids_count is not None:
        count = want_ids_count
    else:
        count = rng.choice([1, 2, 3, 5, 16, 17, 32, 33, 40]) if allow_many else rng.choice([1, 2, 3, 5, 16, 32])
    batched = rng.random() < 0.4
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    shape = (b, n) if batched else (n,)
    lo = rng.randrange(n)
    hi = rng.randrange(lo + 1, n + 1)
    ids = torch.full(shape, -1, dtype=torch.int64)
    ids[..., lo:hi] = torch.randint(-1, count, shape[:-1] + (hi - lo,), generator=g)
    ids[..., lo] = count - 1  # the top id occurs
    dt = rng.choice([torch.int32, torch.int64, torch.int16])
    ids = ids.to(dt)
    if rng.random() < 0.2:
        ids = torch.stack([ids, ids], -1)[..., 1]
    if rng.random() < 0.5:
        tg = TG.ids(ids)  # default count/span (read on host)
        return tg, f"ids{tg.count}{'B' if batched else ''}"
    return TG.ids(ids, count, span=(lo, hi)), f"ids{count}{'B' if batched else ''}+span"


def make_heads(rng, b, h):
    r = rng.random()
    if r < 0.25:
        return "mean", "mean"
    if r < 0.5:
        return "sum", "sum"
    if r < 0.75:
        return "keep", "keep"
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    shape = (h,) if rng.random() < 0.5 else (b, h)
    return torch.rand(*shape, generator=g).to(rng.choice([torch.float32, torch.float16])), f"w{list(shape)}"


def gen_case(rng):
    c = {}
    c["b"] = rng.randint(1, 3)
    c["h"] = rng.randint(1, 4)
    c["nq"] = rng.choice([1, 5, 15, 16, 17, 31, 32, 33, 47, 64, 70, 80, rng.randint(1, 80)])
    c["nk"] = c["nq"] if rng.random() < 0.4 else rng.choice([1, 3, 16, 17, 33, 48, 65, 80, rng.randint(1, 80)])
    c["d"] = rng.choice([8, 16, 24, 32, 40, 64])
    c["layout"] = rng.choice(["bhnd", "bnhd"])
    c["dtype"] = rng.choice(DTYPES)
    c["scale"] = None if rng.random() < 0.5 else rng.choice([0.05, 0.3, 1.0, 2.0, 1])
    return c


def build(rng, c):
    b, h, nq, nk, d = c["b"], c["h"], c["nq"], c["nk"], c["d"]
    q, k, v, view = make_qkv(rng, b, h, nq, nk, d, c["layout"], c["dtype"])
    desc = [f"B{b} H{h} Nq{q.shape[2] if c['layout']=='bhnd' else q.shape[1]} Nk{nk} D{d} {c['layout']} "
            f"{str(c['dtype'])[6:]} view={view} scale={c['scale']}"]
    kw = dict(layout=c["layout"], scale=c["scale"])
    nq = q.shape[2] if c["layout"] == "bhnd" else q.shape[1]
    c["nq"] = nq
    # tags
    if rng.random() < 0.5:
        nbits = rng.choice([2, 4, 8])
        qt = make_tags_1(rng, b, nq, nbits, rng.choice([torch.int32, torch.int64]), rng.random() < 0.6)
        kt = make_tags_1(rng, b, nk, nbits, rng.choice([torch.int32, torch.int64]), rng.random() < 0.6)
        if rng.random() < 0.2:  # strided views of the same values
            qt = torch.stack([qt, torch.zeros_like(qt)], -1)[..., 0]
        if rng.random() < 0.2 and kt.dim() == 2:
            kt = kt.t().contiguous().t()
        if rng.random() < 0.2:
            kw["tags"] = iidkern.tag_mask(qt, kt)
        else:
            kw["tags"] = (qt, kt)
        desc.append(f"tags q{list(qt.shape)}{str(qt.dtype)[6:]} k{list(kt.shape)}{str(kt.dtype)[6:]}")
    # head weights
    if rng.random() < 0.35:
        shape = rng.choice([(h,), (b, h), (b, h, nq)])
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        w = (torch.rand(*shape, generator=g) * 2 - 0.5).to(rng.choice([torch.float32, torch.float16,
                                                                         torch.bfloat16, torch.float64]))
        if len(shape) == 3 and rng.random() < 0.3:
            w = torch.rand(b, nq, h, generator=g).transpose(1, 2)  # strided
        kw["head_weights"] = w
        desc.append(f"hw{list(w.shape)}{str(w.dtype)[6:]}")
    # probes
    probes = []
    pd = []
    if rng.random() < 0.6:
        for _ in range(rng.randint(1, 4)):
            heads, hd = make_heads(rng, b, h)
            if rng.random() < 0.7:
                want = None
                r = rng.random()
                if r < 0.3:
                    want = rng.choice([1, 3, 32])  # fused
                elif r < 0.45:
                    want = rng.choice([33, 40])  # probe pass
                qg, qd = make_groups(rng, nq, b)
                kg, kd = make_groups(rng, nk, b, want_ids_count=want)
                norm = rng.choice([None, "queries", "keys", "both"])
                probes.append(Probe(qg, kg, heads=heads, normalize=norm))
                pd.append(f"Probe({qd} x {kd}, {hd}, {norm})")
            else:
                cch = rng.randint(1, 16)
                g = torch.Generator().manual_seed(rng.randrange(2**31))
                xs = (b, nk, cch) if rng.random() < 0.6 else (nk, cch)
                x = torch.randn(*xs, generator=g).to(rng.choice([torch.float32, torch.float16]))
                qg, qd = make_groups(rng, nq, b)
                norm = rng.choice([None, "queries"])
                probes.append(ValueProbe(x, qg, heads=heads, normalize=norm))
                pd.append(f"ValueProbe(x{list(xs)}, {qd}, {hd}, {norm})")
        kw["probes"] = probes
        desc.append("probes=[" + "; ".join(pd) + "]")
    # block multiplier
    if rng.random() < 0.35:
        mq = rng.randint(0 if rng.random() < 0.05 else 1, nq)
        mk = rng.randint(1, nk)
        q0 = rng.randint(0, nq - mq)
        k0 = rng.randint(0, nk - mk)
        shape = (b, mq, mk) if rng.random() < 0.5 else (b, h, mq, mk)
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        vals = (torch.rand(*shape, generator=g) * 3).to(rng.choice([torch.float32, torch.float16, torch.bfloat16]))
        if rng.random() < 0.2:
            vals = vals.transpose(-1, -2).contiguous().transpose(-1, -2)
        kw["block_multiplier"] = BlockMultiplier(vals, query_start=q0, key_start=k0)
        desc.append(f"mult{list(shape)}{str(vals.dtype)[6:]}@({q0},{k0})")
    # pair stats
    if rng.random() < 0.25:
        pairs = [(rng.randrange(b), rng.randrange(b)) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.5:
            pairs = torch.tensor(pairs, dtype=rng.choice([torch.int32, torch.int64]))
        kw["pair_stats"] = pairs
        desc.append(f"pairs={pairs if isinstance(pairs, list) else pairs.tolist()}")
    if rng.random() < 0.5:
        kw["return_lse"] = True
        desc.append("lse")
    if rng.random() < 0.15:
        kw["count_tiles"] = True
        desc.append("count_tiles")
    opts = {"poison": True}
    if rng.random() < 0.5:
        opts["BLOCK_M"] = rng.choice([16, 32])
        opts["BLOCK_N"] = rng.choice([16, 32])
    for key in ("fuse_key_groups", "kg_split", "mult_split", "kg_half_dot"):
        if rng.random() < 0.15:
            opts[key] = rng.random() < 0.5
    if rng.random() < 0.1:
        opts["PROBE_BLOCK_M"] = rng.choice([16, 32])
        opts["PROBE_BLOCK_N"] = rng.choice([16, 32])
    kw["kernel_options"] = opts
    desc.append(f"opts={opts}")
    global LAST_DESC
    LAST_DESC = " | ".join(desc)
    return q, k, v, kw, LAST_DESC


def run_case(rng, c):
    q, k, v, kw, desc = build(rng, c)
    dtype = c["dtype"]
    b, h, nq, nk = c["b"], c["h"], c["nq"], c["nk"]
    res = iidkern.attention(q, k, v, backend="triton", **kw)
    rkw = {key: val for key, val in kw.items() if key not in ("kernel_options", "count_tiles")}
    ref = iidkern.attention(q, k, v, backend="reference", **rkw)
    if not isinstance(ref, iidkern.AttentionResult):
        ref = iidkern.AttentionResult(out=ref)
    extras = any(key in kw for key in ("probes", "pair_stats", "return_lse", "count_tiles"))
    out = res.out if extras else res
    rout = ref.out if isinstance(ref, iidkern.AttentionResult) else ref
    if extras != isinstance(res, iidkern.AttentionResult):
        raise Mismatch(f"return type {type(res).__name__} (extras={extras})")
    tags = kw.get("tags")
    if isinstance(tags, api.TagMask):
        tags = (tags.q_tags, tags.k_tags)
    o64, lse64, p64 = oracle(q, k, v, c["layout"], kw.get("scale"), tags, kw.get("head_weights"),
                             kw.get("block_multiplier"))
    if out.shape != q.shape or out.dtype != q.dtype:
        raise Mismatch(f"out shape/dtype {tuple(out.shape)} {out.dtype} vs q {tuple(q.shape)} {q.dtype}")
    out_b = to_bhnd(out, c["layout"])
    check_close("out vs float64 oracle", out_b, o64, OUT_TOL[dtype])
    check_close("out vs reference", out_b, to_bhnd(rout, c["layout"]).double(), OUT_TOL[dtype])
    # rows without an allowed key: exactly zero
    empty = torch.isinf(lse64)
    if empty.any() and (out_b.double()[empty] != 0).any():
        raise Mismatch("rows with no allowed key are not zero")
    if kw.get("return_lse"):
        check_lse("lse vs oracle", res.lse, lse64, 1e-4 if dtype == torch.float32 else 2e-3)
        check_lse("lse vs reference", res.lse, ref.lse, 1e-4 if dtype == torch.float32 else 2e-3)
    elif extras and res.lse is not None:
        raise Mismatch("lse returned without return_lse")
    probes = kw.get("probes", [])
    if extras:
        if len(res.probes) != len(probes):
            raise Mismatch(f"{len(res.probes)} probe results for {len(probes)} probes")
        for i, (pr, got, want) in enumerate(zip(probes, res.probes, ref.probes)):
            o = oracle_probe(p64, pr, b, nq, nk)
            if got.dtype != torch.float32:
                raise Mismatch(f"probe[{i}] dtype {got.dtype}")
            check_close(f"probe[{i}] vs oracle", got, o, PROBE_TOL[dtype], floor=1e-5)
            check_close(f"probe[{i}] vs reference", got, want.double(), PROBE_TOL[dtype], floor=1e-5)
    if "pair_stats" in kw:
        pairs = kw["pair_stats"]
        pairs = pairs.tolist() if isinstance(pairs, torch.Tensor) else pairs
        od = out_b.double()
        for name in ("dot", "norm0_sq", "norm1_sq"):
            want = torch.stack([{"dot": (od[i] * od[j]), "norm0_sq": od[i] * od[i], "norm1_sq": od[j] * od[j]}[name]
                                .sum((1, 2)) for i, j in pairs])
            check_close(f"pair_stats.{name}", getattr(res.pair_stats, name), want, 1e-4)
            if name != "dot":
                check_close(f"pair_stats.{name} vs reference", getattr(res.pair_stats, name),
                            getattr(ref.pair_stats, name).double(), 3 * OUT_TOL[dtype])
        # The dot may cancel: its error against the reference is bounded by the outputs' errors
        # times the norms, not by the dot's own size.
        got, want = res.pair_stats.dot.double(), ref.pair_stats.dot.double()
        scale = (ref.pair_stats.norm0_sq.double() * ref.pair_stats.norm1_sq.double()).sqrt()
        if not ((got - want).abs() <= 6 * OUT_TOL[dtype] * scale + 1e-6).all():
            raise Mismatch(f"pair_stats.dot vs reference: max |err| / (|O0||O1|) "
                           f"{((got - want).abs() / scale.clamp_min(1e-12)).max().item():.3e}")
    if kw.get("count_tiles"):
        bm = kw["kernel_options"].get("BLOCK_M", 16)
        bn = kw["kernel_options"].get("BLOCK_N", 16)
        if res.tile_shape != (bm, bn):
            raise Mismatch(f"tile_shape {res.tile_shape} != {(bm, bn)}")
        tv = res.tiles_visited
        if tv.shape != (b, h, -(-nq // bm)):
            raise Mismatch(f"tiles_visited shape {tuple(tv.shape)}")
        if tags is not None:
            want = iidkern.tag_mask(*tags).tile_counts(bm, bn, b)
            if not torch.equal(tv.long(), want[:, None, :].expand_as(tv).long()):
                raise Mismatch(f"tiles_visited {tv.tolist()} != {want.tolist()}")
        elif (tv != -(-nk // bn)).any():
            raise Mismatch(f"tiles_visited {tv.tolist()} != {-(-nk // bn)} (untagged)")
    return desc


def run_replay(rng, c):
    """Plain call twice with fresh inputs of one signature: the second (replayed) == a checked call."""
    q, k, v, view = make_qkv(rng, c["b"], c["h"], c["nq"], c["nk"], c["d"], c["layout"], c["dtype"])
    opts = rng.choice([None, {"poison": True}, {"poison": True, "hopper": False}])
    kw = dict(layout=c["layout"], scale=c["scale"], backend="triton", kernel_options=opts)
    global LAST_DESC
    LAST_DESC = desc = (f"replay B{c['b']} H{c['h']} Nq{c['nq']} Nk{c['nk']} D{c['d']} {c['layout']} {str(c['dtype'])[6:]} "
            f"view={view} scale={c['scale']} opts={opts}")
    api._REPLAYS.clear()
    o1 = iidkern.attention(q, k, v, **kw)
    # fresh inputs, same shapes/strides/alignment: refill the same storages with new values
    for t in (q, k, v):
        base = t
        while base._base is not None:
            base = base._base
        base.copy_(torch.randn(base.shape).to(base.dtype))
    n_before = len(api._REPLAYS)
    o2 = iidkern.attention(q, k, v, **kw)
    api._REPLAY = False
    try:
        o3 = iidkern.attention(q, k, v, **kw)
    finally:
        api._REPLAY = True
    o64, _, _ = oracle(q, k, v, c["layout"], c["scale"], None, None, None)
    check_close("replayed out vs oracle", to_bhnd(o2, c["layout"]), o64, OUT_TOL[c["dtype"]])
    if not torch.equal(o2, o3):
        raise Mismatch("replayed out != checked-path out")
    if o2.data_ptr() == o1.data_ptr():
        raise Mismatch("replay returned the first call's output buffer")
    if n_before != 1:
        desc += f" [note: {n_before} replays recorded]"
    return desc


# --------------------------------------------------------------------------- invalid arguments
def bad_cases(B=2, H=2, N=20, D=16):
    q = torch.randn(B, H, N, D)
    ones = lambda *s, dt=torch.int64: torch.ones(*s, dtype=dt)  # noqa: E731
    cases = [
        ("tags 3-D", dict(tags=(ones(B, N, 1), ones(B, N))), ["q_tags"]),
        ("tags bool", dict(tags=(ones(B, N, dt=torch.bool), ones(B, N))), ["q_tags"]),
        ("tags int16", dict(tags=(ones(B, N), ones(B, N, dt=torch.int16))), ["k_tags"]),
        ("tags [1,N] with B=2", dict(tags=(ones(1, N), ones(B, N))), ["q_tags"]),
        ("tags triple", dict(tags=(ones(N), ones(N), ones(N))), ["tags"]),
        ("head_weights [B,H,N+1]", dict(head_weights=torch.ones(B, H, N + 1)), ["head_weights"]),
        ("head_weights [1,H]", dict(head_weights=torch.ones(1, H)), ["head_weights"]),
        ("head_weights list", dict(head_weights=[1.0] * H), ["head_weights"]),
        ("head_weights complex", dict(head_weights=torch.ones(H, dtype=torch.complex64)), ["head_weights"]),
        ("probes not list", dict(probes=Probe(TG.each(0, 2), TG.each(0, 2)).queries), ["probes"]),
        ("probes None", dict(probes=None), ["probes"]),
        ("probe keys each beyond N", dict(probes=[Probe(TG.each(0, 2), TG.each(3, N + 1))]), ["probes[0].keys"]),
        ("probe ids [B+1,N]", dict(probes=[Probe(TG.ids(torch.zeros(B + 1, N, dtype=torch.int32), 1, (0, N)),
                                                 TG.each(0, 2))]), ["probes[0].queries"]),
        ("probe heads [B,H+1]", dict(probes=[Probe(TG.each(0, 2), TG.each(0, 2), heads=torch.ones(B, H + 1))]),
         ["probes[0]"]),
        ("probe heads [1,H]", dict(probes=[Probe(TG.each(0, 2), TG.each(0, 2), heads=torch.ones(1, H))]),
         ["probes[0]"]),
        ("value probe x [B+1,N,C]", dict(probes=[ValueProbe(torch.randn(B + 1, N, 2), TG.each(0, 2))]),
         ["probes[0].x"]),
        ("value probes > 64 channels", dict(probes=[ValueProbe(torch.randn(N, 16), TG.each(0, 2))] * 5),
         ["channels"]),
        ("second probe bad", dict(probes=[Probe(TG.each(0, 2), TG.each(0, 2)),
                                          Probe(TG.each(0, N + 3), TG.each(0, 2))]), ["probes[1]"]),
        ("mult values int", dict(block_multiplier=BlockMultiplier(torch.ones(B, 2, 2, dtype=torch.int32))),
         ["block_multiplier"]),
        ("mult values 2-D", dict(block_multiplier=BlockMultiplier(torch.ones(2, 2))), ["block_multiplier"]),
        ("mult values [B,H+1,2,2]", dict(block_multiplier=BlockMultiplier(torch.ones(B, H + 1, 2, 2))),
         ["block_multiplier"]),
        ("mult key range", dict(block_multiplier=BlockMultiplier(torch.ones(B, 2, 4), key_start=N - 2)),
         ["block_multiplier key range"]),
        ("mult negative start", dict(block_multiplier=BlockMultiplier(torch.ones(B, 2, 2), query_start=-1)),
         ["block_multiplier"]),
        ("mult values list", dict(block_multiplier=BlockMultiplier([[[1.0]]] * B)), ["block_multiplier"]),
        ("pairs float tensor", dict(pair_stats=torch.zeros(1, 2)), ["pair_stats"]),
        ("pairs empty", dict(pair_stats=[]), ["pair_stats"]),
        ("pairs negative", dict(pair_stats=[(-1, 0)]), ["pair_stats"]),
        ("pairs float list", dict(pair_stats=[(0, 1.5)]), ["pair_stats"]),
        ("pairs 1-D tensor", dict(pair_stats=torch.tensor([0, 1])), ["pair_stats"]),
        ("scale inf", dict(scale=float("inf")), ["scale"]),
        ("scale 0", dict(scale=0.0), ["scale"]),
        ("scale tensor", dict(scale=torch.tensor(0.5)), ["scale"]),
        ("kernel_options BLOCK_M=24", dict(kernel_options={"BLOCK_M": 24}), ["BLOCK_M"]),
        ("kernel_options BLOCK_N=0", dict(kernel_options={"BLOCK_N": 0}), ["BLOCK_N"]),
        ("kernel_options unknown key", dict(kernel_options={"BLOCK_Q": 32}), ["BLOCK_Q"]),
        ("kernel_options BLOCK_M str", dict(kernel_options={"BLOCK_M": "32"}), ["BLOCK_M"]),
        ("layout None", dict(layout=None), ["layout"]),
        ("q bnhd mismatch", dict(layout="bnhd", k=torch.randn(B, N, H + 1, D), v=torch.randn(B, N, H + 1, D)),
         ["head"]),
        ("k D=0", dict(q=torch.randn(B, H, N, 0), k=torch.randn(B, H, N, 0), v=torch.randn(B, H, N, 0)),
         ["head dim"]),
        ("Nk=0", dict(k=torch.randn(B, H, 0, D), v=torch.randn(B, H, 0, D)), ["Nk"]),
        # Host-side group ids outside [-1, num_groups) or outside their span, and a float
        # BlockMultiplier start, now raise when built, and a 0-d integer tensor start is taken
        # as an integer (tests/test_attention_errors.py).
    ]
    return q, cases


def run_bad(name, kw, words, backend):
    B, H, N, D = 2, 2, 20, 16
    kw = dict(kw)
    q = kw.pop("q", torch.randn(B, H, N, D))
    k = kw.pop("k", torch.randn(B, H, N, D) if kw.get("layout") != "bnhd" else torch.randn(B, N, H, D))
    v = kw.pop("v", torch.randn(B, H, N, D) if kw.get("layout") != "bnhd" else torch.randn(B, N, H, D))
    if kw.get("layout") == "bnhd" and q.shape == (B, H, N, D):
        q = torch.randn(B, N, H, D)
    try:
        r = iidkern.attention(q, k, v, backend=backend, **kw)
    except (ValueError, TypeError) as e:
        msg = str(e)
        missing = [w for w in words if w not in msg]
        if missing:
            return f"raised {type(e).__name__} without {missing}: {msg[:200]}"
        return None
    except Exception as e:  # noqa: BLE001
        return f"raised {type(e).__name__} (not ValueError/TypeError): {str(e).splitlines()[0][:200] if str(e) else ''}"
    return f"no error (returned {type(r).__name__})"


def main():
    budget = float(sys.argv[1]) if len(sys.argv) > 1 else 600
    seed0 = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    mode = sys.argv[3] if len(sys.argv) > 3 else "all"
    t0 = time.time()
    fails = []
    if mode in ("all", "bad"):
        _, cases = bad_cases()
        for backend in ("triton", "reference"):
            for name, kw, words in cases:
                if backend == "reference" and name.startswith("kernel_options"):
                    continue
                err = run_bad(name, kw, words, backend)
                if err:
                    print(f"BAD-ARG [{backend}] {name}: {err}", flush=True)
    n = 0
    seed = seed0
    while time.time() - t0 < budget and mode != "bad":
        rng = random.Random(seed)
        global LAST_DESC
        LAST_DESC = "(not built)"
        c = gen_case(rng)
        try:
            if rng.random() < 0.12 and mode == "all":
                desc = run_replay(rng, c)
            else:
                desc = run_case(rng, c)
            n += 1
            if "-v" in sys.argv:
                print(f"ok seed={seed}: {desc}", flush=True)
        except Mismatch as e:
            fails.append(seed)
            print(f"FAIL seed={seed}: {e}\n    case: {LAST_DESC}", flush=True)
        except Exception as e:  # noqa: BLE001
            fails.append(seed)
            tb = traceback.format_exc().strip().splitlines()
            print(f"CRASH seed={seed}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n    case: {LAST_DESC}\n"
                  f"    at: {' <- '.join(l.strip() for l in tb[-5:-1])}", flush=True)
        seed += 1
    print(f"done: {n} ok, {len(fails)} failing seeds {fails[:50]} in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
