"""Hypothesis fuzz of bad (and unusual but valid) arguments of ``iidkern.attention``.

The rule (README, "Every wrong shape, dtype, device or range raises a ValueError/TypeError
naming the argument, expected and given"): each example draws a random VALID call (tiny
shapes: B <= 2, H <= 3, N <= 40, D <= 16; either layout, any input dtype, any mix of tags,
head weights, probes, block multiplier, pair statistics, LSE and kernel options, each in an
ordinary or an unusual but documented form), checks that it runs, then applies one or two
random corruptions (every argument: rank, B/H/N/D mismatches per layout, empty and too large
dims, dtypes, devices, strides, scale values, layout / backend strings, tag dtypes, shapes and
containers, head weight shapes and dtypes, every probe field, multiplier ranges and dims, pair
lists, count_tiles, kernel options, flags) and checks that the call raises a ValueError or
TypeError whose message names the corrupted argument (and, for one corruption, shows what was
given), on the reference backend and on the Triton one (interpreter) where both apply.

A second fuzz draws only the unusual valid forms (numpy / 0-d tensor / Fraction / int scalars,
int32 and int64 tags, ``[N]`` / ``[1, N]`` / expanded shared tags, prebuilt tag masks, strided,
padded, offset, broadcast and transposed views of every tensor argument, other float dtypes of
exactly representable weights, pairs as numpy ints, tensors or lists) and checks that both
backends accept them and agree with the reference backend on the canonical form of the call.

Library bugs this fuzz found (now fixed) have minimal tests at the end. A deeper run:
``IIDKERN_FUZZ_EXAMPLES=500 pytest tests/test_attention_errors_fuzz.py --hypothesis-seed=N``.
"""
import fractions
import importlib
import os
import re
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import iidkern
from iidkern import BlockMultiplier, Probe, TokenGroups as TG, ValueProbe
from helpers import OUT_TOL, PROBE_TOL, assert_close_rel, assert_lse_equal

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EXAMPLES = int(os.environ.get("IIDKERN_FUZZ_EXAMPLES", "0"))
SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
ERRORS = (ValueError, TypeError)
BOTH = ("reference", "triton")
REPLAYS = importlib.import_module("iidkern.attention")._REPLAYS  # plain calls' recorded launches


# --------------------------------------------------------------------------- valid calls
def qkv_shape(layout, b, h, n, d):
    return (b, h, n, d) if layout == "bhnd" else (b, n, h, d)


def eighths(shape, rng, lo=-8, hi=16):
    """Values k/8: exact in float16, bfloat16, float32 and float64 (dtype changes keep them)."""
    return torch.randint(lo, hi + 1, shape, generator=rng).float() / 8


def view_of(draw, t, keep_last=False):
    """``t``'s values through a random view with other strides (or ``t`` itself):
    reversed-stride storage, a padded last dim, a storage offset (unaligned pointer).
    ``keep_last``: the last dim stays contiguous (q, k, v)."""
    kinds = ["same", "padded", "offset"] + ([] if keep_last and t.shape[-1] > 1 else ["reversed"])
    kind = draw(st.sampled_from(kinds))
    if kind == "padded":
        big = torch.zeros(*t.shape[:-1], t.shape[-1] + draw(st.integers(1, 3)), dtype=t.dtype)
        big[..., :t.shape[-1]] = t
        return big[..., :t.shape[-1]]
    if kind == "offset":
        flat = torch.zeros(t.numel() + 1, dtype=t.dtype)
        flat[1:] = t.flatten()
        return flat[1:].view(t.shape)
    if kind == "reversed" and t.dim() > 1:
        order = tuple(reversed(range(t.dim())))
        return t.permute(order).contiguous().permute(order)
    return t


@dataclass
class Call:
    b: int
    h: int
    nq: int
    nk: int
    d: int
    layout: str
    dtype: torch.dtype
    canonical: dict  # q, k, v and keyword arguments in their plain form
    rendered: dict  # the same call as passed: unusual (but valid) forms where drawn
    notes: list = field(default_factory=list)

    def extras(self, kw=None):
        kw = self.rendered if kw is None else kw
        return bool(kw.get("return_lse") or kw.get("probes") or kw.get("pair_stats") is not None
                    or kw.get("count_tiles"))


def draw_qkv(draw, rng, layout, b, h, n, d, dtype, unusual):
    shape = qkv_shape(layout, b, h, n, d)
    t = torch.randn(shape, generator=rng).to(dtype)
    if unusual and draw(st.integers(0, 4)) == 0:  # broadcast rows: batch and head of stride 0
        hdim = 1 if layout == "bhnd" else 2
        small = t.narrow(0, 0, 1).narrow(hdim, 0, 1)
        return small.expand(shape).contiguous(), small.expand(shape)
    if not unusual:
        return t, t
    kind = draw(st.sampled_from(["view", "tokens", "other_layout", "parameter", "d1_stride"]))
    if kind == "tokens":  # every second token of a longer tensor
        tdim = 2 if layout == "bhnd" else 1
        return t, t.repeat_interleave(2, dim=tdim).narrow(tdim, 0, 2 * n)[(slice(None),) * tdim + (slice(None, None, 2),)]
    if kind == "other_layout":  # the other layout's storage, viewed in this one
        return t, t.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "parameter":
        return t, torch.nn.Parameter(t.clone(), requires_grad=False)
    if kind == "d1_stride" and d == 1:  # a size-1 last dim may have any stride
        c = t.contiguous()
        return t, c.as_strided(c.shape, (*c.stride()[:-1], 7))
    return t, view_of(draw, t, keep_last=True)


def draw_groups(draw, n, b, rng, unusual):
    """(canonical, rendered) TokenGroups over n tokens."""
    kind = draw(st.sampled_from(["each", "ids", "segments"]))
    if kind == "each":
        a = draw(st.integers(0, n - 1))
        z = draw(st.integers(a + 1, n))
        if unusual:
            wrap = draw(st.sampled_from([int, np.int64, np.int32, torch.tensor]))
            return TG.each(a, z), TG.each(wrap(a), wrap(z))
        return TG.each(a, z), TG.each(a, z)
    if kind == "segments":
        cuts = sorted(set(draw(st.lists(st.integers(0, n), min_size=2, max_size=5))))
        if len(cuts) < 2:
            cuts = [0, n]
        ranges = [(a, z) for a, z in zip(cuts[:-1], cuts[1:]) if draw(st.booleans())] or [(cuts[0], cuts[1])]
        g = TG.segments(ranges, n)
        return g, (TG.segments(np.array(ranges), np.int64(n)) if unusual else g)
    count = draw(st.integers(1, 4))
    batched = draw(st.booleans())
    ids = torch.randint(-1, count, (b, n) if batched else (n,), generator=rng)
    ids[..., int(torch.randint(0, n, (1,), generator=rng))] = count - 1
    g = TG.ids(ids.to(torch.int32), count, span=(0, n))
    if not unusual:
        return g, g
    dtypes = [torch.int64, torch.int16, torch.int8] + ([torch.uint8] if (ids >= 0).all() else [])
    raw = view_of(draw, ids.to(draw(st.sampled_from(dtypes))))
    if not batched and b > 1 and draw(st.booleans()):
        raw = raw.expand(b, n)  # [N] ids and their [B, N] broadcast mean the same
    return g, (TG.ids(raw) if draw(st.booleans()) else TG.ids(raw, np.int64(count), span=(np.int64(0), n)))


def draw_heads(draw, b, h, rng, unusual):
    rule = draw(st.sampled_from(["mean", "sum", "keep", "h", "bh"]))
    if rule in ("mean", "sum", "keep"):
        return rule, rule
    w = eighths((h,) if rule == "h" else (b, h), rng)
    if not unusual:
        return w, w
    if rule == "h" and draw(st.booleans()):
        return w.expand(b, h).contiguous(), w.expand(b, h)
    return w, view_of(draw, w.to(draw(st.sampled_from([torch.float64, torch.float16, torch.float32]))))


def draw_probe(draw, b, h, nq, nk, rng, unusual):
    heads, heads_r = draw_heads(draw, b, h, rng, unusual)
    if draw(st.integers(0, 2)) == 0:
        c = draw(st.integers(1, 4))
        x = eighths((b, nk, c) if draw(st.booleans()) else (nk, c), rng)
        xr = x
        if unusual:
            xr = view_of(draw, x.to(draw(st.sampled_from([torch.float64, torch.float16, torch.float32]))))
            if x.dim() == 2 and draw(st.booleans()):
                x, xr = x.expand(b, nk, c).contiguous(), xr.expand(b, nk, c)
        queries, queries_r = draw_groups(draw, nq, b, rng, unusual)
        normalize = draw(st.sampled_from([None, "queries"]))
        return (ValueProbe(x, queries, heads=heads, normalize=normalize),
                ValueProbe(xr, queries_r, heads=heads_r, normalize=normalize))
    queries, queries_r = draw_groups(draw, nq, b, rng, unusual)
    keys, keys_r = draw_groups(draw, nk, b, rng, unusual)
    normalize = draw(st.sampled_from([None, "queries", "keys", "both"]))
    return (Probe(queries, keys, heads=heads, normalize=normalize),
            Probe(queries_r, keys_r, heads=heads_r, normalize=normalize))


def draw_tags(draw, b, nq, nk, rng, unusual):
    shared = draw(st.booleans())
    rows = 1 if shared else b

    def bits(n):
        t = ((torch.rand(rows, n, 3, generator=rng) < 0.5).long() * torch.tensor([1, 2, 4])).sum(-1)
        special = torch.rand(rows, n, generator=rng) < 0.1  # all bits / bits 31-63 (int32's sign)
        return torch.where(special, torch.tensor(-1 if draw(st.booleans()) else -2**31), t)
    qt, kt = bits(nq), bits(nk)
    canonical = (qt.expand(b, nq).contiguous(), kt.expand(b, nk).contiguous())
    if not unusual:
        return canonical, canonical

    def render(t, n):
        t = t.to(draw(st.sampled_from([torch.int32, torch.int64])))  # values fit int32: same bits
        form = draw(st.sampled_from(["N", "1N", "expand", "BN"])) if shared else "BN"
        if form == "N":
            return view_of(draw, t[0])
        if form == "expand":
            return t.expand(b, n)
        return view_of(draw, t.expand(b, n).contiguous() if form == "BN" else t)
    q_r, k_r = render(qt, nq), render(kt, nk)
    container = draw(st.sampled_from(["tuple", "list", "mask"]))
    return canonical, (iidkern.tag_mask(q_r, k_r) if container == "mask" else
                       [q_r, k_r] if container == "list" else (q_r, k_r))


@st.composite
def valid_calls(draw, unusual=None):
    rng = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if unusual is None:
        unusual = draw(st.booleans())
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    nq, nk, d = draw(st.integers(1, 40)), draw(st.integers(1, 40)), draw(st.integers(1, 16))
    layout, dtype = draw(st.sampled_from(["bhnd", "bnhd"])), draw(st.sampled_from(DTYPES))
    can, ren = {}, {}
    for name, n in (("q", nq), ("k", nk), ("v", nk)):
        can[name], ren[name] = draw_qkv(draw, rng, layout, b, h, n, d, dtype, unusual)
    can["layout"] = ren["layout"] = layout

    if draw(st.booleans()):
        k8 = draw(st.integers(1, 16))
        can["scale"] = k8 / 8
        ren["scale"] = k8 / 8
        if unusual:
            forms = [np.float32, np.float64, fractions.Fraction, torch.tensor, lambda x: torch.tensor(x).double()]
            ren["scale"] = draw(st.sampled_from(forms))(k8 / 8)
            if k8 % 8 == 0:
                ren["scale"] = draw(st.sampled_from([int, np.int64, torch.tensor]))(k8 // 8)

    if draw(st.booleans()):
        can["tags"], ren["tags"] = draw_tags(draw, b, nq, nk, rng, unusual)

    if draw(st.booleans()):
        shape = draw(st.sampled_from([(h,), (b, h), (b, h, nq)]))
        w = eighths(shape, rng)
        can["head_weights"] = ren["head_weights"] = w
        if unusual:
            if len(shape) == 2 and draw(st.booleans()):
                can["head_weights"], ren["head_weights"] = w[0].expand(b, h).contiguous(), w[0].expand(b, h)
            else:
                ren["head_weights"] = view_of(draw, w.to(draw(st.sampled_from([torch.float64, torch.float16,
                                                                                torch.bfloat16]))))

    probes = [draw_probe(draw, b, h, nq, nk, rng, unusual) for _ in range(draw(st.integers(0, 2)))]
    if probes:
        can["probes"] = [p for p, _ in probes]
        ren["probes"] = [p for _, p in probes]
        if unusual:
            form = draw(st.sampled_from(["list", "tuple", "single"]))
            if form == "tuple":
                ren["probes"] = tuple(ren["probes"])
            elif form == "single" and len(probes) == 1:
                ren["probes"] = ren["probes"][0]  # one spec, not in a sequence
    elif unusual and draw(st.booleans()):
        ren["probes"] = draw(st.sampled_from([None, (), []]))

    if draw(st.booleans()):
        mq, mk = draw(st.integers(0, nq)), draw(st.integers(0, nk))
        q0, k0 = draw(st.integers(0, nq - mq)), draw(st.integers(0, nk - mk))
        shape = (b, h, mq, mk) if draw(st.booleans()) else (b, mq, mk)
        vals = eighths(shape, rng, 0, 24)
        can["block_multiplier"] = ren["block_multiplier"] = BlockMultiplier(vals, query_start=q0, key_start=k0)
        if unusual:
            wrap = draw(st.sampled_from([int, np.int64, torch.tensor]))
            vals_r = view_of(draw, vals.to(draw(st.sampled_from([torch.float64, torch.float16, torch.bfloat16]))))
            ren["block_multiplier"] = BlockMultiplier(vals_r, query_start=wrap(q0), key_start=wrap(k0))

    if draw(st.booleans()):
        pairs = [(draw(st.integers(0, b - 1)), draw(st.integers(0, b - 1))) for _ in range(draw(st.integers(1, 3)))]
        can["pair_stats"] = ren["pair_stats"] = pairs
        if unusual:
            form = draw(st.sampled_from(["np", "tensor32", "tensor64", "lists", "row_tensors", "tuple"]))
            ren["pair_stats"] = {
                "np": lambda: [(np.int64(a), np.int32(z)) for a, z in pairs],
                "tensor32": lambda: torch.tensor(pairs, dtype=torch.int32),
                "tensor64": lambda: view_of(draw, torch.tensor(pairs)),
                "lists": lambda: [[a, z] for a, z in pairs],
                "row_tensors": lambda: [torch.tensor([a, z]) for a, z in pairs],
                "tuple": lambda: tuple(pairs),
            }[form]()

    if draw(st.booleans()):
        can["return_lse"] = ren["return_lse"] = True
    if draw(st.booleans()):
        opts = draw(st.sampled_from([{"poison": True}, {"BLOCK_M": 16, "BLOCK_N": 16}, {"hopper": False},
                                     {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 2, "num_stages": 1},
                                     {"fuse_key_groups": False, "PROBE_BLOCK_M": 16, "PROBE_BLOCK_N": 16}]))
        can["kernel_options"] = ren["kernel_options"] = opts
        if unusual:
            ren["kernel_options"] = {key: (draw(st.sampled_from([np.int64, np.int32, torch.tensor]))(val)
                                           if type(val) is int else val) for key, val in opts.items()}
    return Call(b, h, nq, nk, d, layout, dtype, can, ren)


def run(kw, backend):
    kw = dict(kw)
    q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
    backend = kw.pop("backend", backend)  # a corrupted backend replaces the one under test
    with torch.no_grad():
        return iidkern.attention(q, k, v, backend=backend, **kw)


def parts(res, extras):
    """(out, lse, probes, pair stats) of a call's result."""
    if not extras:
        assert isinstance(res, torch.Tensor)
        return res, None, (), None
    return res.out, res.lse, res.probes, res.pair_stats


def assert_same_result(got, want, call, tol_out, tol_probe, what):
    out, lse, probes, stats = parts(got, call.extras(call.rendered))
    w_out, w_lse, w_probes, w_stats = parts(want, call.extras(call.canonical))
    q = call.canonical["q"]
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous(), what
    if w_out.abs().max() > 0:
        assert_close_rel(out, w_out, tol_out, what=f"{what}: output")
    else:
        assert (out == 0).all(), f"{what}: output should be zero"
    assert (lse is None) == (w_lse is None), what
    if lse is not None:
        assert_lse_equal(lse, w_lse, tol=1e-3)
    assert len(probes) == len(w_probes), what
    for i, (g, w) in enumerate(zip(probes, w_probes)):
        assert g.dtype == torch.float32 and g.shape == w.shape, f"{what}: probe {i} {g.shape} vs {w.shape}"
        if w.abs().max() > 0:
            assert_close_rel(g, w, tol_probe, what=f"{what}: probe {i}")
        else:
            assert (g == 0).all(), f"{what}: probe {i} should be zero"
    assert (stats is None) == (w_stats is None), what
    if stats is not None:
        size = (w_stats.norm0_sq * w_stats.norm1_sq).sqrt().double() + 1e-30
        for name in ("dot", "norm0_sq", "norm1_sq"):
            err = (getattr(stats, name).double() - getattr(w_stats, name).double()).abs()
            assert (err <= 8 * tol_out * size + 1e-6).all(), f"{what}: pair_stats.{name}"


# --------------------------------------------------------------------------- corruptions
@dataclass
class Bad:
    family: str  # the argument it corrupts (two corruptions of one call corrupt different ones)
    over: dict  # argument -> value (a Lazy: built inside the raises block, for spec constructors)
    names: tuple  # the message must name one of these
    given: tuple = ()  # ... and, for a lone corruption, show each of these (what was given)
    backends: tuple = BOTH
    exc: tuple = ERRORS


class Lazy:
    """An argument whose construction itself must raise (a spec's constructor checks it)."""

    def __init__(self, make):
        self.make = make


def names_in(message, name):
    if re.fullmatch(r"\w+", name):  # "q" must not match "q_tags" or "Nq"
        return re.search(rf"(?<![\w]){name}(?![\w])", message) is not None
    return name in message


def which(draw, options=("q", "k", "v")):
    return draw(st.sampled_from(list(options)))


def reshaped(call, name, **dims):
    """A fresh tensor for q, k or v with some of B, H, N, D changed (in the call's layout)."""
    b, h, d = dims.get("b", call.b), dims.get("h", call.h), dims.get("d", call.d)
    n = dims.get("n", call.nq if name == "q" else call.nk)
    return torch.randn(qkv_shape(call.layout, b, h, n, d)).to(dims.get("dtype", call.dtype))


def other(draw, value, lo=0, hi=4):
    """An int in [lo, hi] other than value."""
    return draw(st.integers(lo, hi).filter(lambda x: x != value))


def c_rank(draw, call):
    name = which(draw)
    t = call.rendered[name]
    bad = draw(st.sampled_from([t[0], t.unsqueeze(0), t.flatten(), t.reshape(-1)[0]]))
    return Bad("qkv", {name: bad}, (name,), ("4-D", str(tuple(bad.shape))))


def c_dim_mismatch(draw, call):
    dim = draw(st.sampled_from(["b", "h", "n", "d"]))
    names = ("k", "v") if dim == "n" else ("q", "k", "v")
    name = which(draw, names)
    cur = {"b": call.b, "h": call.h, "n": call.nk, "d": call.d}[dim]
    new = other(draw, cur, 1, {"b": 3, "h": 4, "n": 41, "d": 17}[dim])
    return Bad("qkv", {name: reshaped(call, name, **{dim: new})}, (name,), (f"{name}={new}",))


def c_empty_or_wide(draw, call):
    dim = draw(st.sampled_from(["b", "h", "nq", "nk", "d0", "dbig"]))
    over = {}
    for name in ("q", "k", "v"):
        if dim == "b":
            over[name] = reshaped(call, name, b=0)
        elif dim == "h":
            over[name] = reshaped(call, name, h=0)
        elif dim == "nq" and name == "q":
            over[name] = reshaped(call, name, n=0)
        elif dim == "nk" and name != "q":
            over[name] = reshaped(call, name, n=0)
        elif dim == "d0":
            over[name] = reshaped(call, name, d=0)
        elif dim == "dbig":
            over[name] = reshaped(call, name, d=draw(st.sampled_from([257, 300])) if name == "q" else over["q"].shape[-1])
    if dim in ("d0", "dbig"):
        d = over["q"].shape[-1]
        return Bad("qkv", over, ("q", "head dim"), ("256", f"D={d}"))
    return Bad("qkv", over, ("q", "k"), ("non-empty", "=0"))


BAD_DTYPES = [torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.float64,
              torch.float8_e4m3fn, torch.int16]


def c_dtype(draw, call):
    dtype = draw(st.sampled_from(BAD_DTYPES))
    names = draw(st.sampled_from([("q",), ("k",), ("v",), ("q", "k", "v")]))
    over = {name: call.canonical[name].to(dtype) if dtype != torch.bool else call.canonical[name] > 0
            for name in names}
    return Bad("qkv", over, (names[0],), (str(dtype), "float16, bfloat16 or float32"), exc=(TypeError,))


def c_mixed_dtype(draw, call):
    name = which(draw)
    dtype = draw(st.sampled_from([t for t in DTYPES if t != call.dtype]))
    return Bad("qkv", {name: call.canonical[name].to(dtype)}, (name,), ("share a dtype", str(dtype)),
               exc=(TypeError,))


def c_strided_last(draw, call):
    if call.d < 2:
        return None
    name = which(draw)
    t = call.canonical[name]
    kind = draw(st.sampled_from(["every_second", "transposed", "broadcast_last"]))
    if kind == "every_second":
        bad = torch.cat([t, t], -1)[..., ::2]
    elif kind == "transposed":  # a [.., D, N] storage viewed as [.., N, D]
        bad = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    else:
        bad = t[..., :1].expand(t.shape)
    if bad.stride(-1) == 1:  # a transposed view of one token or head is contiguous after all
        return None
    return Bad("qkv", {name: bad}, (name,), ("contiguous last", str(bad.stride())))


def c_device(draw, call):
    kind = draw(st.sampled_from(["one_meta", "all_meta"]))
    if kind == "one_meta":
        name = which(draw)
        return Bad("qkv", {name: call.canonical[name].to("meta")}, (name,), ("one device", "meta"))
    # Every q, k, v on meta: the Triton backend refuses it (the reference computes shapes
    # only, as torch ops do, unless a CPU tensor beside it names the device mismatch).
    names = ["q", "backend"] + [n for n in ("tags", "head_weights", "block_multiplier") if n in call.rendered]
    if any(isinstance(getattr(p, "heads", None), torch.Tensor) for p in as_list(call.rendered.get("probes"))):
        names.append("probes")
    over = {name: call.canonical[name].to("meta") for name in ("q", "k", "v")}
    return Bad("qkv", over, tuple(names), ("meta",), backends=("triton",))


def as_list(probes):
    if probes is None:
        return []
    return [probes] if isinstance(probes, (Probe, ValueProbe)) else list(probes)


def c_not_tensor(draw, call):
    name = which(draw)
    t = call.canonical[name]
    bad = draw(st.sampled_from([t.tolist(), t.float().numpy(), None, 3.0, t.to_sparse()]))
    given = ("dense (strided)",) if isinstance(bad, torch.Tensor) else ("torch.Tensor", type(bad).__name__)
    return Bad("qkv", {name: bad}, (name,), given, exc=(TypeError,))


def c_scale(draw, call):
    bad = draw(st.sampled_from([
        float("nan"), float("inf"), -float("inf"), 0, 0.0, -0.0, -1, -0.125, True, False, "0.5", np.nan,
        np.float32("inf"), np.float64(-2.0), np.bool_(True), complex(0.5, 0), np.complex64(0.5), 1e-40, 1e39,
        10**400, torch.tensor([0.5, 0.5]), torch.tensor([0.5]), torch.tensor(0.5, device="meta"),
        torch.tensor(float("nan")), torch.tensor(True), torch.tensor(-1), [0.5], (0.5,), fractions.Fraction(-1, 2),
        torch.tensor(0.5, dtype=torch.complex64), np.array([0.5]), "inf"]))
    return Bad("scale", {"scale": bad}, ("scale",), exc=(ValueError,))


def c_layout(draw, call):
    bad = draw(st.sampled_from(["BHND", "bnh", "", "nhd", "bhdn", None, 0, b"bhnd", ["bhnd"], " bhnd", "bsnd"]))
    return Bad("layout", {"layout": bad}, ("layout",), (repr(bad),), exc=(ValueError,))


def c_backend(draw, call):
    bad = draw(st.sampled_from(["cuda", "TRITON", "", None, "torch", "sdpa", 1, "Reference", ["triton"]]))
    return Bad("backend", {"backend": bad}, ("backend",), (repr(bad),), backends=("reference",),
               exc=(ValueError,))


def good_tags(call):
    return (torch.ones(call.b, call.nq, dtype=torch.int64), torch.ones(call.b, call.nk, dtype=torch.int64))


def c_tags(draw, call):
    q_tags, k_tags = good_tags(call)
    side = draw(st.integers(0, 1))
    name = ("q_tags", "k_tags")[side]
    n = (call.nq, call.nk)[side]
    kind = draw(st.sampled_from(["dtype", "length", "batch", "rank", "meta", "sparse", "container", "mask",
                                 "not_tensor"]))
    pair = [q_tags, k_tags]
    exc, given = ValueError, ()
    if kind == "dtype":
        dtype = draw(st.sampled_from([torch.float32, torch.bool, torch.uint8, torch.int16, torch.int8,
                                      torch.float64, torch.complex64]))
        pair[side] = pair[side].to(dtype)
        exc, given = TypeError, ("int32 or int64", str(dtype))
    elif kind == "length":
        bad = other(draw, n, 1, 41)
        pair[side] = pair[side][..., :1].expand(pair[side].shape[0], bad).contiguous()
        if draw(st.booleans()):
            pair[side] = pair[side][0]
        given = (str(tuple(pair[side].shape)),)
    elif kind == "batch":
        rows = draw(st.sampled_from([r for r in (0, 2, 3) if r != call.b]))
        pair[side] = torch.ones(rows, n, dtype=torch.int64)
        given = (str(tuple(pair[side].shape)),)
    elif kind == "rank":
        pair[side] = draw(st.sampled_from([torch.tensor(1), torch.ones(1, call.b, n, dtype=torch.int64)]))
        given = (str(tuple(pair[side].shape)),)
    elif kind == "meta":
        pair[side] = pair[side].to("meta")
        given = ("meta",)
    elif kind == "sparse":
        pair[side] = pair[side].to_sparse()
        exc, given = TypeError, ("dense",)
    elif kind == "not_tensor":
        pair[side] = draw(st.sampled_from([pair[side].numpy(), pair[side].tolist(), None]))
        exc, given = TypeError, ("torch.Tensor",)
    elif kind == "container":
        bad = draw(st.sampled_from([q_tags, (q_tags,), (q_tags, k_tags, k_tags), {0: q_tags, 1: k_tags}, "tags",
                                    iter([q_tags, k_tags])]))
        return Bad("tags", {"tags": bad}, ("tags",), (), exc=(TypeError,))
    else:  # a prebuilt mask for other shapes
        rows = draw(st.sampled_from([r for r in (2, 3) if r != call.b]))
        shapes = [(call.b, call.nq), (call.b, call.nk)]
        shapes[side] = draw(st.sampled_from([(rows, n), (call.b, n + 1)]))
        mask = iidkern.tag_mask(*(torch.ones(s, dtype=torch.int64) for s in shapes))
        return Bad("tags", {"tags": mask}, ("tags",), (name, str(shapes[side])))
    return Bad("tags", {"tags": tuple(pair)}, ("tags",), (name,) + given, exc=(exc,))


def c_head_weights(draw, call):
    b, h, nq = call.b, call.h, call.nq
    kind = draw(st.sampled_from(["shape", "dtype", "meta", "sparse", "not_tensor"]))
    if kind == "shape":
        shapes = [(h + 1,), (b + 1, h), (b, h + 1), (b, h, nq + 1), (b + 1, h, nq), (), (1, b, h), (b, h, nq, 1),
                  (h, b, nq), (nq,), (1, h), (h, b)]
        allowed = {(h,), (b, h), (b, h, nq)}
        bad = torch.ones(draw(st.sampled_from([s for s in shapes if s not in allowed])))
        return Bad("head_weights", {"head_weights": bad}, ("head_weights",), (str(tuple(bad.shape)),),
                   exc=(ValueError,))
    if kind == "dtype":
        dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.bool, torch.uint8, torch.complex64]))
        return Bad("head_weights", {"head_weights": torch.ones(h, dtype=dtype)}, ("head_weights",), (str(dtype),),
                   exc=(TypeError,))
    if kind == "meta":
        return Bad("head_weights", {"head_weights": torch.ones(h, device="meta")}, ("head_weights",), ("meta",),
                   exc=(ValueError,))
    if kind == "sparse":
        return Bad("head_weights", {"head_weights": torch.ones(b, h).to_sparse()}, ("head_weights",), ("dense",),
                   exc=(TypeError,))
    bad = draw(st.sampled_from([[1.0] * h, np.ones(h), 1.0, "mean"]))
    return Bad("head_weights", {"head_weights": bad}, ("head_weights",), (type(bad).__name__,), exc=(TypeError,))


def c_probes(draw, call):
    b, h, nq, nk = call.b, call.h, call.nq, call.nk
    good = as_list(call.rendered.get("probes"))
    i = draw(st.integers(0, len(good)))
    where = f"probes[{i}]"
    kind = draw(st.sampled_from(["object", "container", "range", "ids_length", "ids_batch", "segments", "heads",
                                 "x_length", "x_batch", "channels", "spec"]))
    exc, given, names = ERRORS, (), (where,)
    if kind == "object":
        bad = draw(st.sampled_from(["map", None, {"queries": 0}, TG.each(0, 1), torch.ones(2), (TG.each(0, 1),) * 2,
                                    0]))
        exc, given = (TypeError,), ("Probe or ValueProbe",)
    elif kind == "container":
        bad_all = draw(st.sampled_from(["probe", {0: 1}, iter(good), 3, torch.ones(2), {TG.each(0, 1)}]))
        return Bad("probes", {"probes": bad_all}, ("probes",), ("sequence of Probe",), exc=(TypeError,))
    elif kind == "range":
        side = draw(st.sampled_from(["queries", "keys"]))
        n = nq if side == "queries" else nk
        stop = draw(st.integers(n + 1, n + 5))
        start = draw(st.integers(0, stop - 1))
        g = TG.each(start, stop)
        bad = Probe(g, TG.each(0, nk)) if side == "queries" else Probe(TG.each(0, nq), g)
        names, given = (f"{where}.{side}",), (f"[{start}, {stop})", str(n))
    elif kind in ("ids_length", "ids_batch", "segments"):
        side = draw(st.sampled_from(["queries", "keys", "vqueries"]))
        n = nk if side == "keys" else nq
        if kind == "ids_length":
            g = TG.ids(torch.zeros(other(draw, n, 1, 41), dtype=torch.int32))
        elif kind == "ids_batch":
            rows = draw(st.sampled_from([r for r in (1, 2, 3) if r != b]))
            g = TG.ids(torch.zeros(rows, n, dtype=torch.int32))
        else:
            g = TG.segments([(0, 1)], other(draw, n, 1, 41))
        bad = (Probe(g, TG.each(0, nk)) if side == "queries" else Probe(TG.each(0, nq), g) if side == "keys"
               else ValueProbe(torch.ones(nk, 1), g))
        names, given = (f"{where}.{'keys' if side == 'keys' else 'queries'}",), (str(tuple(g.group_ids.shape)),)
    elif kind == "heads":
        shapes = [(h + 1,), (b + 1, h), (b, h + 1), (1, h) if b > 1 else (2, h)]
        w = torch.ones(draw(st.sampled_from(shapes)))
        bad = (Probe(TG.each(0, nq), TG.each(0, nk), heads=w) if draw(st.booleans())
               else ValueProbe(torch.ones(nk, 2), TG.each(0, nq), heads=w))
        given = ("heads", str(tuple(w.shape)))
    elif kind in ("x_length", "x_batch"):
        c = draw(st.integers(1, 16))
        if kind == "x_length":
            shape = (other(draw, nk, 1, 41), c) if draw(st.booleans()) else (b, other(draw, nk, 1, 41), c)
        else:
            shape = (draw(st.sampled_from([r for r in (1, 2, 3) if r != b])), nk, c)
        bad = ValueProbe(torch.ones(shape), TG.each(0, nq))
        names, given = (f"{where}.x",), (str(shape),)
    elif kind == "channels":  # more than 4 x 16 channels over the call's value probes
        bad = [ValueProbe(torch.ones(nk, 16), TG.each(0, nq))] * 5
        return Bad("probes", {"probes": good + bad}, ("probes",), ("at most 64 channels",), exc=(ValueError,))
    else:  # the specs' own constructors refuse the field
        make, names, exc = draw(st.sampled_from([
            (lambda: Probe(TG.each(0, nq), TG.each(0, nk), normalize="Keys"), ("normalize",), ValueError),
            (lambda: Probe(TG.each(0, nq), TG.each(0, nk), normalize="rows"), ("normalize",), ValueError),
            (lambda: Probe(TG.each(0, nq), TG.each(0, nk), normalize=True), ("normalize",), ValueError),
            (lambda: ValueProbe(torch.ones(nk, 1), TG.each(0, nq), normalize="keys"), ("normalize",), ValueError),
            (lambda: ValueProbe(torch.ones(nk, 1), TG.each(0, nq), normalize="both"), ("normalize",), ValueError),
            (lambda: Probe(TG.each(0, nq), TG.each(0, nk), heads="max"), ("heads",), ValueError),
            (lambda: Probe(TG.each(0, nq), TG.each(0, nk), heads=torch.ones(h, dtype=torch.int64)), ("heads",),
             TypeError),
            (lambda: Probe(TG.each(0, nq), TG.each(0, nk), heads=torch.ones(1, 1, h)), ("heads",), ValueError),
            (lambda: Probe(TG.each(0, nq), TG.each(0, nk), heads=1.0), ("heads",), TypeError),
            (lambda: Probe((0, nq), TG.each(0, nk)), ("Probe",), TypeError),
            (lambda: ValueProbe(torch.ones(nk, 17), TG.each(0, nq)), ("ValueProbe: x",), ValueError),
            (lambda: ValueProbe(torch.ones(nk, 0), TG.each(0, nq)), ("ValueProbe: x",), ValueError),
            (lambda: ValueProbe(torch.ones(nk), TG.each(0, nq)), ("ValueProbe: x",), ValueError),
            (lambda: ValueProbe(torch.ones(1, b, nk, 1), TG.each(0, nq)), ("ValueProbe: x",), ValueError),
            (lambda: ValueProbe(torch.ones(nk, 2, dtype=torch.int64), TG.each(0, nq)), ("ValueProbe: x",),
             TypeError),
            (lambda: ValueProbe(torch.ones(nk, 2, device="meta"), TG.each(0, nq)), ("ValueProbe: x",), ValueError),
            (lambda: ValueProbe(np.ones((nk, 2)), TG.each(0, nq)), ("ValueProbe: x",), TypeError),
            (lambda: ValueProbe(torch.ones(nk, 1), (0, nq)), ("ValueProbe",), TypeError),
            (lambda: TG.each(nq, nq), ("TokenGroups.each",), ValueError),
            (lambda: TG.each(-1, nq), ("TokenGroups.each",), ValueError),
            (lambda: TG.each(0, float(nq)), ("TokenGroups.each",), TypeError),
            (lambda: TG.ids(torch.zeros(nq)), ("TokenGroups.ids",), TypeError),
            (lambda: TG.ids(torch.full((nq,), -1)), ("TokenGroups.ids",), ValueError),
            (lambda: TG.ids(torch.zeros(nq, dtype=torch.int32), 1, span=(0, nq + 1)), ("TokenGroups.ids",),
             ValueError),
            (lambda: TG.segments([(0, nq + 1)], nq), ("TokenGroups.segments",), ValueError),
        ]))
        return Bad("probes", {"probes": Lazy(lambda: good + [make()])}, names, (), exc=(exc,))
    return Bad("probes", {"probes": good[:i] + [bad] + good[i:]}, names, given, exc=exc)


def c_multiplier(draw, call):
    b, h, nq, nk = call.b, call.h, call.nq, call.nk
    kind = draw(st.sampled_from(["query_range", "key_range", "negative", "dims", "dtype", "type", "meta",
                                 "sparse", "start_type"]))
    exc, given = (ValueError,), ()
    if kind == "query_range":
        mq = draw(st.integers(1, nq))
        start = draw(st.integers(nq - mq + 1, nq + 2))
        bad = BlockMultiplier(torch.ones(b, mq, 1), query_start=start)
        given = (f"[{start}, {start + mq})", str(nq))
    elif kind == "key_range":
        mk = draw(st.integers(1, nk + 2))
        start = draw(st.integers(max(0, nk - mk + 1), nk + 2))
        bad = BlockMultiplier(torch.ones(b, 1, mk), key_start=start)
        given = (f"[{start}, {start + mk})", str(nk))
    elif kind == "negative":
        side = draw(st.sampled_from(["query_start", "key_start"]))
        bad = BlockMultiplier(torch.ones(b, 1, 1), **{side: draw(st.integers(-5, -1))})
        given = ("range",)
    elif kind == "dims":
        shape = draw(st.sampled_from([(b + 1, 1, 1), (b, h + 1, 1, 1), (1, 1), (b, h, 1, 1, 1), (b + 1, h, 1, 1)]
                                     + ([(1, 1, 1), (1, h, 1, 1)] if b > 1 else [])
                                     + ([(b, 1, 1, 1)] if h > 1 else [])))
        bad = BlockMultiplier(torch.ones(shape))
        given = (str(shape),)
    elif kind == "dtype":
        dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.bool, torch.uint8, torch.complex64]))
        bad = BlockMultiplier(torch.ones(b, 1, 1, dtype=dtype))
        exc, given = (TypeError,), (str(dtype),)
    elif kind == "type":
        bad = draw(st.sampled_from([torch.ones(b, 1, 1), (torch.ones(b, 1, 1), 0, 0), {"values": torch.ones(b, 1, 1)},
                                    1.0]))
        exc, given = (TypeError,), ("BlockMultiplier",)
    elif kind == "meta":
        bad = BlockMultiplier(torch.ones(b, 1, 1, device="meta"))
        given = ("meta",)
    elif kind == "sparse":
        bad = BlockMultiplier(torch.ones(b, 1, 1).to_sparse())
        exc, given = (TypeError,), ("dense",)
    else:
        side = draw(st.sampled_from(["query_start", "key_start"]))
        value = draw(st.sampled_from([0.0, 1.5, "0", None, torch.tensor(0.0), np.float64(0), True, [0]]))
        return Bad("block_multiplier", {"block_multiplier": Lazy(lambda: BlockMultiplier(torch.ones(b, 1, 1),
                                                                                         **{side: value}))},
                   (f"BlockMultiplier.{side}",), ("integer",), exc=(TypeError,))
    return Bad("block_multiplier", {"block_multiplier": bad}, ("block_multiplier",), given, exc=exc)


def c_pairs(draw, call):
    b = call.b
    kind = draw(st.sampled_from(["range", "flat", "triple", "ragged", "float", "string", "bool", "empty",
                                 "tensor_dtype", "tensor_shape", "tensor_meta", "none", "numpy", "not_sequence"]))
    exc = ERRORS
    if kind == "range":
        bad = [(0, 0), draw(st.sampled_from([(0, b), (b, 0), (-1, 0), (0, -1), (b + 3, 0), (0, 2**40)]))]
        exc = (ValueError,)
    elif kind == "flat":
        bad = draw(st.sampled_from([(0, 0), [0, 0], (np.int64(0), np.int64(0))]))
        exc = (TypeError,)
    elif kind == "triple":
        bad = draw(st.sampled_from([[(0, 0, 0)], [(0,)], [()], torch.zeros(1, 3, dtype=torch.int64)]))
        exc = (ValueError,)
    elif kind == "ragged":
        bad = [(0, 0), (0,)]
        exc = (ValueError,)
    elif kind == "float":
        bad = draw(st.sampled_from([[(0, 0.0)], [(0.0, 0)], [(0, np.float64(0))], [(0, torch.tensor(0.0))],
                                    [torch.tensor([0.0, 0.0])], [(0, 1.5)]]))
        exc = (TypeError,)
    elif kind == "string":
        bad = draw(st.sampled_from([[("0", "0")], "00", [(0, "0")]]))
        exc = (TypeError,)
    elif kind == "bool":
        bad = draw(st.sampled_from([[(True, False)], [(0, True)], [(np.bool_(False), 0)], True]))
        exc = (TypeError,)
    elif kind == "empty":
        bad = draw(st.sampled_from([[], (), torch.zeros(0, 2, dtype=torch.int64)]))
        exc = (ValueError,)
    elif kind == "tensor_dtype":
        bad = torch.zeros(1, 2, dtype=draw(st.sampled_from([torch.float32, torch.bool, torch.uint8, torch.int16,
                                                            torch.float64])))
        exc = (TypeError,)
    elif kind == "tensor_shape":
        bad = draw(st.sampled_from([torch.zeros(2, dtype=torch.int64), torch.zeros(2, 1, dtype=torch.int64),
                                    torch.zeros(1, 2, 1, dtype=torch.int64), torch.tensor(0)]))
        exc = (ValueError,)
    elif kind == "tensor_meta":
        bad = torch.zeros(1, 2, dtype=torch.int64, device="meta")
        exc = (ValueError,)
    elif kind == "none":
        bad = draw(st.sampled_from([[None], [(0, None)], [(None, None)]]))
        exc = (TypeError,)
    elif kind == "numpy":  # only lists of pairs and [P, 2] tensors are taken
        bad = draw(st.sampled_from([np.zeros((1, 2), dtype=np.int64), [np.array([0, 0])]]))
        exc = (TypeError,)
    else:
        bad = draw(st.sampled_from([{0: 0}, {(0, 0)}, 0, iter([(0, 0)]), [{0, 1}]]))
        exc = (TypeError,)
    return Bad("pair_stats", {"pair_stats": bad}, ("pair_stats",), (), exc=exc)


def c_count_tiles(draw, call):
    if draw(st.booleans()):  # a Triton-only result
        return Bad("count_tiles", {"count_tiles": True}, ("count_tiles",), ("backend='triton'",),
                   backends=("reference",), exc=(ValueError,))
    bad = draw(st.sampled_from([1, 0, "yes", None, np.bool_(True), torch.tensor(False)]))
    return Bad("count_tiles", {"count_tiles": bad}, ("count_tiles",), ("bool", repr(bad)), exc=(TypeError,))


def c_return_lse(draw, call):
    bad = draw(st.sampled_from([1, 0, "no", "yes", None, np.bool_(False), torch.tensor(True), 1.0, [True]]))
    return Bad("return_lse", {"return_lse": bad}, ("return_lse",), ("bool", repr(bad)), exc=(TypeError,))


def c_kernel_options(draw, call):
    kind = draw(st.sampled_from(["type", "key", "value", "half_split"]))
    if kind == "type":
        bad = draw(st.sampled_from([[("BLOCK_M", 16)], "BLOCK_M=16", 16, True, (("poison", True),)]))
        return Bad("kernel_options", {"kernel_options": bad}, ("kernel_options",), ("dict",), exc=(TypeError,))
    if kind == "key":
        key = draw(st.sampled_from(["BLOCK_Q", "block_m", "", 1, None, "num_warp", "tail-split", ("BLOCK_M",)]))
        return Bad("kernel_options", {"kernel_options": {key: 16}}, ("kernel_options",), (repr(key), "BLOCK_M"),
                   exc=(ValueError,))
    if kind == "half_split":
        key = draw(st.sampled_from(["tail_split_tiles", "tail_split_pieces"]))
        return Bad("kernel_options", {"kernel_options": {key: 2}}, ("kernel_options",), (key,), exc=(ValueError,))
    key, value = draw(st.sampled_from([
        ("BLOCK_M", 24), ("BLOCK_M", 0), ("BLOCK_N", 8), ("BLOCK_N", 512), ("BLOCK_M", "32"), ("BLOCK_N", 32.0),
        ("BLOCK_M", True), ("BLOCK_M", -16), ("BLOCK_N", None), ("PROBE_BLOCK_M", 48), ("PROBE_BLOCK_N", 2**9),
        ("num_warps", 3), ("num_warps", 32), ("num_warps", 0), ("PROBE_NUM_WARPS", 1.0), ("num_stages", 0),
        ("num_stages", 9), ("PROBE_NUM_STAGES", "2"), ("maxnreg", 10), ("maxnreg", 300), ("maxnreg", "x"),
        ("maxnreg", 64.0), ("poison", 1), ("hopper", "no"), ("fuse_key_groups", None), ("kg_split", 0),
        ("mult_split", np.bool_(True)), ("kg_half_dot", "True"), ("warp_specialize", 1.0), ("tail_split", None),
        ("tail_split_tiles", -1), ("tail_split_pieces", 1), ("tail_split_pieces", 65), ("BLOCK_M", np.float64(32)),
        ("BLOCK_M", torch.tensor([32])), ("num_stages", 2**40),
    ]))
    over = {key: value}
    if key in ("tail_split_tiles", "tail_split_pieces"):  # the other one of the pair, valid
        over[{"tail_split_tiles": "tail_split_pieces", "tail_split_pieces": "tail_split_tiles"}[key]] = 2
    return Bad("kernel_options", {"kernel_options": over}, (f"kernel_options[{key!r}]",), (repr(value),),
               exc=(ValueError,))


CORRUPTIONS = [c_rank, c_dim_mismatch, c_empty_or_wide, c_dtype, c_mixed_dtype, c_strided_last, c_device,
               c_not_tensor, c_scale, c_layout, c_backend, c_tags, c_head_weights, c_probes, c_multiplier, c_pairs,
               c_count_tiles, c_return_lse, c_kernel_options]


def draw_bad(draw, call, kinds=CORRUPTIONS):
    while True:
        bad = draw(st.sampled_from(kinds))(draw, call)
        if bad is not None:
            return bad


def build(kw):
    return {key: (value.make() if isinstance(value, Lazy) else value) for key, value in kw.items()}


# One test per kind of corruption (each argument gets its examples), a second one of any kind.
@pytest.mark.parametrize("first", CORRUPTIONS, ids=[c.__name__[2:] for c in CORRUPTIONS])
@settings(max_examples=EXAMPLES or 12, deadline=None, suppress_health_check=SLOW_OK)
@given(call=valid_calls(), data=st.data())
def test_fuzz_corrupted_call_raises_naming_the_argument(first, call, data):
    draw = data.draw
    triton_too = draw(st.integers(0, 15)) == 0  # the valid call on the Triton backend too (slow)
    # The call as drawn is valid (so a corruption's error is not the base call's own).
    for backend in BOTH if triton_too else ("reference",):
        run(call.rendered, backend)
    # A plain Triton call records a replay that skips the flag checks of a later one (see
    # test_bug_replay_skips_the_flag_checks): each corrupted call takes the checked path.
    REPLAYS.clear()
    bads = [draw_bad(draw, call, [first])] if first is not c_strided_last or call.d > 1 else [draw_bad(draw, call)]
    if draw(st.booleans()):
        second = draw_bad(draw, call)
        if second.family != bads[0].family and set(second.backends) & set(bads[0].backends):
            bads.append(second)
    kw = dict(call.rendered)
    for bad in bads:
        kw.update(bad.over)
    backends = [x for x in BOTH if all(x in bad.backends for bad in bads)]
    names = [name for bad in bads for name in bad.names]
    exc = tuple({e for bad in bads for e in bad.exc})
    assert backends
    for backend in backends:
        with pytest.raises(ERRORS) as info:
            run(build(kw), backend)
        message = str(info.value)
        assert isinstance(info.value, exc), f"{type(info.value).__name__} ({message}), expected {exc}"
        assert any(names_in(message, name) for name in names), f"message {message!r} names none of {names}"
        if len(bads) == 1:
            for word in bads[0].given:
                assert word in message, f"message {message!r} lacks {word!r}"


@settings(max_examples=EXAMPLES or 36, deadline=None, suppress_health_check=SLOW_OK)
@given(valid_calls(unusual=True))
def test_fuzz_unusual_valid_call_is_accepted_and_matches_the_reference(call):
    """Unusual but documented forms of every argument run on both backends and give what the
    reference backend gives on the plain form of the same call."""
    want = run(call.canonical, "reference")
    got_ref = run(call.rendered, "reference")
    assert_same_result(got_ref, want, call, 1e-5, 1e-5, "reference, unusual forms")
    got = run(call.rendered, "triton")
    assert_same_result(got, want, call, OUT_TOL[call.dtype], PROBE_TOL[call.dtype], "triton, unusual forms")


# --------------------------------------------------------------------------- fixed cases the fuzz leans on
def test_names_in_matches_whole_argument_names_only():
    assert names_in("q must be 4-D", "q") and names_in("q, k, v batch sizes differ: q=2", "k")
    assert not names_in("tags: q_tags must be int32", "q") and not names_in("got Nq=0", "q")
    assert names_in("probes[1].x must have shape", "probes[1].x")


def test_meta_inputs_run_shape_only_on_the_reference_backend():
    """What c_device relies on: the reference backend takes meta q, k, v (torch ops compute
    shapes only), the Triton backend refuses them naming the device."""
    q, k, v = (torch.randn(2, 3, 5, 8, device="meta") for _ in range(3))
    out = iidkern.attention(q, k, v, backend="reference")
    assert out.device.type == "meta" and out.shape == q.shape
    with pytest.raises(ValueError, match="meta"):
        iidkern.attention(q, k, v, backend="triton")


# --------------------------------------------------------------------------- bugs this fuzz found (fixed)
B, H, N, D = 2, 3, 6, 8


def small_qkv(d=D):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, N, d, generator=g) for _ in range(3))


@pytest.mark.parametrize("index", [2**63, 2**70, np.uint64(2**63 + 1)])
def test_bug_pair_index_past_int64_is_not_named(index):
    q, k, v = small_qkv()
    with pytest.raises(ERRORS, match="pair_stats"):
        iidkern.attention(q, k, v, pair_stats=[(0, index)], backend="reference")


@pytest.mark.parametrize("pairs", [[torch.tensor(0), torch.tensor(1)], [(0, 1), torch.tensor(1)]],
                         ids=["flat-0d", "one-0d"])
def test_bug_pair_list_of_0d_tensors_is_not_named(pairs):
    q, k, v = small_qkv()
    with pytest.raises(ERRORS, match="pair_stats"):
        iidkern.attention(q, k, v, pair_stats=pairs, backend="reference")


def neg_bit(shape):
    """A float32 tensor that carries PyTorch's lazy negation bit (``z.conj().imag``): its
    values read through torch are -Im(z), its memory holds +Im(z)."""
    z = torch.randn(shape, dtype=torch.complex64, generator=torch.Generator().manual_seed(1))
    t = z.conj().imag
    assert t.is_neg() and t.dtype == torch.float32
    return t


@pytest.mark.parametrize("backend", BOTH)
@pytest.mark.parametrize("where", ["head_weights", "block_multiplier", "q_d1", "v_d1"])
def test_negative_bit_views_are_refused_by_name(where, backend):
    """Found by this fuzz: the Triton kernels read a negated view's memory (+x) where torch reads -x,
    a silent wrong result. Such views (accepted by the layout checks: at head dim 1, or as weights)
    are refused on every backend, naming the argument; resolve_neg() makes them ordinary."""
    kw = {}
    if where in ("q_d1", "v_d1"):
        q, k, v = small_qkv(d=1)
        if where == "q_d1":
            q = neg_bit((B, H, N, 1))  # stride 2 on a size-1 last dim: accepted by the layout check
        else:
            v = neg_bit((B, H, N, 1))
    else:
        q, k, v = small_qkv()
        kw = ({"head_weights": neg_bit((H,))} if where == "head_weights" else
              {"block_multiplier": BlockMultiplier(neg_bit((B, 3, 4)), query_start=1, key_start=2)})
    name = where.split("_d1")[0]
    with pytest.raises(TypeError, match=f"{name}.*lazily negated view"):
        iidkern.attention(q, k, v, backend=backend, **kw)
    resolved = {key: (BlockMultiplier(val.values.resolve_neg(), val.query_start, val.key_start)
                      if isinstance(val, BlockMultiplier) else val.resolve_neg()) for key, val in kw.items()}
    got = iidkern.attention(q.resolve_neg(), k, v.resolve_neg(), backend=backend, **resolved)
    want = iidkern.attention(q.resolve_neg().clone(), k, v.resolve_neg().clone(), backend="reference", **resolved)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BOTH)
def test_bug_group_count_past_any_tensor_size_is_not_named(backend):
    with pytest.raises(ValueError, match="num_groups"):  # refused where it is given
        TG.ids(torch.zeros(N, dtype=torch.int32), num_groups=2**62, span=(0, N))
    q, k, v = small_qkv()  # the largest count the kernels' int32 ids hold is accepted
    groups = TG.ids(torch.zeros(N, dtype=torch.int32), num_groups=2**31 - 1, span=(0, N))
    assert groups.count == 2**31 - 1 and callable(iidkern.attention)


@pytest.mark.parametrize("flag", ["return_lse", "count_tiles"])
@pytest.mark.parametrize("value", [0, None, np.bool_(False), ""], ids=["0", "None", "np.False_", "empty-str"])
def test_bug_replay_skips_the_flag_checks(flag, value):
    q, k, v = small_qkv()
    with pytest.raises(TypeError, match=flag):  # the checked path refuses it ...
        iidkern.attention(q, k, v, backend="triton", **{flag: value})
    iidkern.attention(q, k, v, backend="triton")  # ... a valid plain call records a replay ...
    with pytest.raises(TypeError, match=flag):  # ... which must not let it through
        iidkern.attention(q, k, v, backend="triton", **{flag: value})
