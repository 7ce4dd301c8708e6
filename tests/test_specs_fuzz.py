"""Hypothesis fuzz of the public helpers and spec builders against re-derivations of their
documented semantics (docstrings of iidkern/specs.py, iidkern/routing.py, iidkern.tag_mask,
README.md and METHODS.md), never against the package's own helpers:

* ``instruction_tags``: the allow table that METHODS.md IID step 5 and the docstring promise,
  rebuilt token by token from the ranges and region masks (either sequence order, padding,
  overlapping regions, both backgrounds, always-visible ranges, shared and batched masks,
  masks drawn on a latent grid and flattened);
* ``tags_from_segments`` and ``allowed_pairs``: bit sets and the "share a bit" rule on Python
  integers (int32 tags sign-extended against int64 ones, as README says);
* ``tag_mask`` + ``attention``: one mask reused across calls, tile shapes and batch sizes (its
  cached lists), its tags changed after it was built, against a float64 masked softmax (rows
  with no allowed key: zeros and LSE -inf) and the dense reference backend;
* ``TokenGroups.each / ids / single / segments``: fields, dense ids and group sizes;
* ``router_weights`` (HeadRouter's IARouter, METHODS.md HeadRouter 1) from random PairStats
  and from the pair statistics of real Triton calls;
* malformed arguments: a ValueError / TypeError naming the argument.

A deeper run: IIDKERN_FUZZ_EXAMPLES=300 pytest tests/test_specs_fuzz.py --hypothesis-seed=N
(the host-side tests take that many examples, the ones that launch Triton kernels a fifth).
"""
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st

import iidkern
from iidkern import PairStats, TokenGroups

EXAMPLES = int(os.environ.get("IIDKERN_FUZZ_EXAMPLES", "0"))
SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
INT64_MIN, INT64_SPAN = -(1 << 63), 1 << 64


def host_examples(default: int) -> int:
    return EXAMPLES or default


def kernel_examples(default: int) -> int:
    return max(EXAMPLES // 5, default) if EXAMPLES else default


def as_int64(x: int) -> int:
    """A bit set in [-2^63, 2^64) as the int64 holding its bits (2^63.. wrap to negatives)."""
    return x - INT64_SPAN if x >= (1 << 63) else x


def maybe_numpy(draw, i: int):
    """An integer argument as a Python int or a numpy integer (both are documented integers)."""
    return np.int64(i) if draw(st.booleans()) else i


def share_a_bit(q_row, k_row):
    """The documented rule on Python ints: query i sees key j iff q & k != 0 (Python's ints
    are two's complement of unbounded width: an int32 tag's sign extends, as README says)."""
    return [[(a & c) != 0 for c in k_row] for a in q_row]


# --------------------------------------------------------------------------- instruction_tags
@st.composite
def iid_layouts(draw):
    """A sequence holding an image range and N instruction ranges in any order, with padding
    gaps, plus always-visible ranges, region masks in any documented form and a background."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = torch.Generator().manual_seed(seed)
    many = draw(st.integers(0, 9)) == 0  # up to the documented 62 instructions (bits 0..61), one token each
    n_instr = draw(st.integers(58, 62)) if many else draw(st.integers(1, 4))
    grid = None
    if draw(st.booleans()):  # masks drawn on a latent grid (gh x gw image tokens, row-major)
        grid = (draw(st.integers(1, 4)), draw(st.integers(1, 5)))
        n_img = grid[0] * grid[1]
    else:
        n_img = draw(st.integers(1, 16))
    order = draw(st.sampled_from(["text_image", "image_text", "mixed"]))
    instr_order = draw(st.permutations(list(range(n_instr))))
    blocks = [("instr", i) for i in instr_order]
    if order == "text_image":
        blocks = blocks + [("image", None)]
    elif order == "image_text":
        blocks = [("image", None)] + blocks
    else:
        blocks.insert(draw(st.integers(0, n_instr)), ("image", None))
    pos, image, instructions = 0, None, [None] * n_instr
    for kind, i in blocks:
        pos += draw(st.integers(0, 1 if many else 2))  # padding / other text before the block
        size = n_img if kind == "image" else 1 if many else draw(st.integers(1, 4))
        if kind == "image":
            image = (pos, pos + size)
        else:
            instructions[i] = (pos, pos + size)
        pos += size
    length = pos + draw(st.integers(0, 2))
    always = []
    for _ in range(draw(st.integers(0, 2))):
        a = draw(st.integers(0, length))
        always.append((a, draw(st.integers(a, min(length, a + 4)))))

    form = draw(st.sampled_from(["shared", "batched"]))
    batch = 1 if form == "shared" else draw(st.integers(1, 2))
    density = draw(st.floats(0.0, 1.0))
    if grid is not None:  # rectangles on the grid, flattened row-major
        masks = torch.zeros(batch, n_instr, *grid, dtype=torch.bool)
        for b in range(batch):
            for i in range(n_instr):
                if draw(st.integers(0, 4)) == 0:
                    continue  # an instruction with an empty region
                r0, c0 = draw(st.integers(0, grid[0] - 1)), draw(st.integers(0, grid[1] - 1))
                r1, c1 = draw(st.integers(r0 + 1, grid[0])), draw(st.integers(c0 + 1, grid[1]))
                masks[b, i, r0:r1, c0:c1] = True
        masks = masks.reshape(batch, n_instr, n_img)
    else:
        masks = torch.rand(batch, n_instr, n_img, generator=rng) < density
    if draw(st.booleans()):  # a non-contiguous view holding the same values
        masks = masks.transpose(-1, -2).contiguous().transpose(-1, -2)
    region_masks = masks[0] if form == "shared" else masks
    return dict(length=length, image=image, instructions=instructions, always=always, grid=grid,
                region_masks=region_masks, background=draw(st.sampled_from([None, "none", "all"])),
                device=draw(st.sampled_from([None, "cpu"])), as_generators=draw(st.booleans()))


def iid_allow_table(length, image, instructions, always, masks, background):
    """[B][q][k] booleans, from the docstring's allow table / METHODS.md IID step 5."""
    lo, hi = image
    owner = [None] * length  # which instruction's text a token is
    for i, (a, b) in enumerate(instructions):
        for t in range(a, b):
            owner[t] = i
    visible = [False] * length
    for a, b in always:
        for t in range(a, b):
            visible[t] = True

    def kind(t):
        if visible[t]:  # always-visible ranges overlap anything and win
            return "visible"
        if lo <= t < hi:
            return "image"
        return "instr" if owner[t] is not None else "none"

    kinds = [kind(t) for t in range(length)]
    n_instr = len(instructions)
    table = []
    for m in masks:  # [n_instr, n_img] per batch row
        regions = []
        for t in range(length):
            if kinds[t] != "image":
                regions.append(set())
                continue
            r = {i for i in range(n_instr) if bool(m[i, t - lo])}
            if not r and background == "all":
                r = set(range(n_instr))  # background sees every instruction
            regions.append(r)
        rows = []
        for qi in range(length):
            row = []
            for kj in range(length):
                kq, kk = kinds[qi], kinds[kj]
                if kq == "none" or kk == "none":
                    ok = False  # no bit: sees nothing and is seen by no query
                elif kq == "visible" or kk == "visible":
                    ok = True  # seen by every query, sees every key that carries a bit
                elif kq == "image":
                    ok = kk == "image" or owner[kj] in regions[qi]  # image sees image; M_i sees P_i
                else:
                    ok = kk == "image" or owner[kj] == owner[qi]  # P_i sees all image and P_i only
                row.append(ok)
            rows.append(row)
        table.append(rows)
    return table


@settings(max_examples=host_examples(150), deadline=None, suppress_health_check=SLOW_OK)
@given(iid_layouts())
def test_instruction_tags_give_the_documented_allow_table(layout):
    masks = layout["region_masks"]
    kwargs = dict(image=layout["image"], region_masks=masks)
    instructions, always = layout["instructions"], layout["always"]
    if layout["as_generators"]:  # "any iterable of pairs (read once)"
        kwargs.update(instructions=(r for r in instructions), always_visible=iter(always))
    else:
        kwargs.update(instructions=list(instructions), always_visible=tuple(always))
    if layout["background"] is not None:
        kwargs["background"] = layout["background"]
    if layout["device"] is not None:
        kwargs["device"] = layout["device"]
    q_tags, k_tags = iidkern.instruction_tags(layout["length"], **kwargs)

    batch = 1 if masks.dim() == 2 else masks.shape[0]  # README: [1, N] tags from 2-D masks
    for t in (q_tags, k_tags):
        assert t.dtype == torch.int64 and tuple(t.shape) == (batch, layout["length"]) and t.device.type == "cpu"
    masks3 = masks[None] if masks.dim() == 2 else masks
    want = iid_allow_table(layout["length"], layout["image"], instructions, always, masks3,
                           layout["background"] or "none")
    got_rule = [share_a_bit(qr, kr) for qr, kr in zip(q_tags.tolist(), k_tags.tolist())]
    assert got_rule == want, f"tags {q_tags.tolist()} / {k_tags.tolist()} break the allow table"
    got = iidkern.allowed_pairs(q_tags, k_tags)
    assert got.dtype == torch.bool and got.tolist() == want


@settings(max_examples=host_examples(30), deadline=None)
@given(st.integers(1, 3), st.integers(2, 4), st.integers(2, 4))
def test_instruction_tags_refuse_an_unflattened_grid_mask(n_instr, gh, gw):
    """Region masks are [N_instr, N_img] or [B, N_instr, N_img]: a mask left on its
    [N_instr, gh, gw] latent grid is refused with an error naming region_masks."""
    n_img = gh * gw
    instructions = [(n_img + 2 * i, n_img + 2 * i + 2) for i in range(n_instr)]
    grid = torch.ones(n_instr, gh, gw, dtype=torch.bool)
    with pytest.raises(ValueError, match="region_masks"):
        iidkern.instruction_tags(n_img + 2 * n_instr, image=(0, n_img), instructions=instructions,
                                 region_masks=grid)


# --------------------------------------------------------------------------- tags_from_segments
bit_sets = st.one_of(st.integers(INT64_MIN, INT64_SPAN - 1), st.sampled_from([0, 1, iidkern.ALL_BITS, 1 << 62,
                                                                                1 << 63, INT64_SPAN - 1]))


@settings(max_examples=host_examples(150), deadline=None)
@given(st.data())
def test_tags_from_segments_or_bits_into_a_default(data):
    draw = data.draw
    length, batch = draw(st.integers(1, 30)), draw(st.integers(1, 3))
    segments = []
    for _ in range(draw(st.integers(0, 5))):  # may overlap each other and be empty
        a = draw(st.integers(0, length))
        b = draw(st.integers(a, length))
        segments.append((maybe_numpy(draw, a), maybe_numpy(draw, b), draw(bit_sets)))
    kwargs = {"batch": batch} if draw(st.booleans()) or batch != 1 else {}
    default = None
    if draw(st.booleans()):
        default = kwargs["default"] = draw(bit_sets)
    if draw(st.booleans()):
        kwargs["device"] = "cpu"
    arg = iter(segments) if draw(st.booleans()) else segments
    tags = iidkern.tags_from_segments(length, arg, **kwargs)

    row = []
    for t in range(length):
        bits = as_int64(default or 0)
        for a, b, s in segments:
            if int(a) <= t < int(b):
                bits |= as_int64(s)
        row.append(as_int64(bits % INT64_SPAN))
    assert tags.dtype == torch.int64 and tuple(tags.shape) == (batch, length)
    assert tags.tolist() == [row] * batch


@settings(max_examples=host_examples(150), deadline=None)
@given(st.data())
def test_allowed_pairs_is_the_share_a_bit_rule(data):
    """int32 and int64 tags of any bits, the two sides of either type (README: they meet as
    int64, an int32 tag sign-extended)."""
    draw = data.draw
    batch, nq, nk = draw(st.integers(1, 3)), draw(st.integers(1, 12)), draw(st.integers(1, 12))

    def tags(n):
        dtype = draw(st.sampled_from([torch.int32, torch.int64]))
        lo, hi = (-(1 << 31), (1 << 31) - 1) if dtype == torch.int32 else (INT64_MIN, (1 << 63) - 1)
        small = st.sampled_from([0, 1, 2, 3, lo, -1, 1 << 30])
        values = draw(st.lists(st.lists(st.one_of(small, st.integers(lo, hi)), min_size=n, max_size=n),
                               min_size=batch, max_size=batch))
        return torch.tensor(values, dtype=dtype), values

    (qt, qv), (kt, kv) = tags(nq), tags(nk)
    got = iidkern.allowed_pairs(qt, kt)
    assert tuple(got.shape) == (batch, nq, nk) and got.dtype == torch.bool
    assert got.tolist() == [share_a_bit(a, c) for a, c in zip(qv, kv)]


# --------------------------------------------------------------------------- tag_mask + attention
def masked_attention_float64(q, k, v, allowed, scale):
    """[B, H, N, D] float64 softmax(QK^T * scale) @ V over the allowed pairs ([B, Nq, Nk]);
    a row with no allowed key: zeros and LSE -inf."""
    q, k, v = q.double(), k.double(), v.double()
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    mask = allowed[:, None].expand_as(s)
    s = s.masked_fill(~mask, -math.inf)
    any_key = mask.any(-1, keepdim=True)
    m = torch.where(any_key, s.amax(-1, keepdim=True), torch.zeros_like(s[..., :1]))
    p = torch.exp(s - m).masked_fill(~mask, 0.0)
    den = p.sum(-1, keepdim=True)
    out = torch.where(any_key, (p @ v) / den.clamp_min(1e-300), torch.zeros(()).double())
    lse = torch.where(any_key, torch.log(den.clamp_min(1e-300)) + m, torch.full_like(m, -math.inf))
    return out, lse[..., 0]


def tiles_with_an_allowed_pair(allowed, bm, bn):
    """[B, query tiles]: key tiles holding at least one allowed pair (the ones not skipped)."""
    b, nq, nk = allowed.shape
    mt, nt = -(-nq // bm), -(-nk // bn)
    counts = torch.zeros(b, mt, dtype=torch.long)
    for i in range(mt):
        for j in range(nt):
            counts[:, i] += allowed[:, i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].flatten(1).any(1).long()
    return counts


TILES = [(16, 16), (16, 32), (32, 16), (32, 32)]
OUT_ATOL = {torch.float32: 1e-4, torch.float16: 4e-3}


@st.composite
def tag_calls(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    rng = torch.Generator().manual_seed(seed)
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    nq, nk, d = draw(st.integers(1, 40)), draw(st.integers(1, 40)), draw(st.sampled_from([1, 4, 8, 16]))
    density = draw(st.floats(0.05, 0.8))

    def tags(n):
        # each side its own shape ([B, N], [1, N] or [N]) and type: README, "tags of different
        # integer types meet as int64: an int32 tag is sign-extended, so its bit 31 matches
        # bits 31-63 of an int64 tag" (bits 31 and 63 are drawn)
        form = draw(st.sampled_from(["bn", "1n", "n"]))
        tag_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
        positions = [0, 1, 2, 31] + ([62, 63] if tag_dtype == torch.int64 else [])
        rows = b if form == "bn" else 1
        on = torch.rand(rows, n, len(positions), generator=rng) < density
        values = [[as_int64(sum(1 << p for p, bit in zip(positions, tok) if bit) % INT64_SPAN)
                   for tok in row] for row in on.tolist()]
        if tag_dtype == torch.int32:
            values = [[x - (1 << 32) if x >= (1 << 31) else x for x in row] for row in values]
        if draw(st.booleans()):  # some tokens with no bit: queries with no key / keys no query sees
            zero = torch.rand(rows, n, generator=rng) < 0.3
            values = [[0 if z else x for x, z in zip(row, zrow)] for row, zrow in zip(values, zero.tolist())]
        t = torch.tensor(values, dtype=tag_dtype)
        t = t[0] if form == "n" else t
        view = draw(st.sampled_from(["contiguous", "strided", "transposed"]))
        if view == "strided":  # every other element of a wider tensor
            wide = torch.zeros(*t.shape[:-1], 2 * n, dtype=tag_dtype)
            wide[..., ::2] = t
            t = wide[..., ::2]
        elif view == "transposed" and t.dim() == 2:
            t = t.t().contiguous().t()
        return t, values

    (qt, qv), (kt, kv) = tags(nq), tags(nk)
    shared = len(qv) == 1 and len(kv) == 1  # both sides shared by the batch
    return dict(seed=seed, b=b, h=h, nq=nq, nk=nk, d=d, shared=shared, qt=qt, kt=kt, qv=qv, kv=kv,
                dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.float16])),
                layout=draw(st.sampled_from(["bhnd", "bnhd"])),
                scale=draw(st.one_of(st.none(), st.floats(0.05, 1.5))),
                tiles=draw(st.permutations(TILES))[:2], mutate=draw(st.booleans()))


def run_and_check(call, mask, q, k, v, backend, tiles=None, count_tiles=False):
    b = q.shape[0]
    qv = call["qv"] if len(call["qv"]) == b else call["qv"] * b  # shared rows
    kv = call["kv"] if len(call["kv"]) == b else call["kv"] * b
    allowed = torch.tensor([share_a_bit(a, c) for a, c in zip(qv, kv)], dtype=torch.bool).reshape(
        b, call["nq"], call["nk"])
    to_bhnd = (lambda t: t) if call["layout"] == "bhnd" else (lambda t: t.transpose(1, 2))
    d = q.shape[-1]
    scale = call["scale"] if call["scale"] is not None else 1.0 / math.sqrt(d)
    want_out, want_lse = masked_attention_float64(to_bhnd(q), to_bhnd(k), to_bhnd(v), allowed, scale)
    options = {"poison": True}
    if tiles is not None:
        options.update(BLOCK_M=tiles[0], BLOCK_N=tiles[1])
    res = iidkern.attention(q, k, v, layout=call["layout"], scale=call["scale"], tags=mask, return_lse=True,
                            backend=backend, count_tiles=count_tiles,
                            kernel_options=options if backend == "triton" else None)
    assert res.out.shape == q.shape and res.out.dtype == q.dtype
    out = to_bhnd(res.out).double()
    assert torch.isfinite(out).all()
    none = ~allowed.any(-1)[:, None, :].expand(-1, out.shape[1], -1)  # [B, H, Nq] rows with no key
    assert (out[none] == 0).all(), "a query with no allowed key must get zeros"
    assert torch.isneginf(res.lse[none]).all(), "a query with no allowed key must get LSE -inf"
    assert torch.isfinite(res.lse[~none]).all()
    torch.testing.assert_close(out, want_out, atol=OUT_ATOL[q.dtype], rtol=0, msg=lambda m: f"{backend}: {m}")
    torch.testing.assert_close(res.lse[~none].double(), want_lse[~none], atol=1e-3 if q.dtype != torch.float32
                               else 1e-4, rtol=0)
    if count_tiles:
        bm, bn = res.tile_shape
        want = tiles_with_an_allowed_pair(allowed, bm, bn)
        assert torch.equal(res.tiles_visited.long(), want[:, None].expand(-1, out.shape[1], -1)), \
            f"tiles visited {res.tiles_visited.tolist()} vs {want.tolist()} ({bm}x{bn} tiles)"
    return res


@settings(max_examples=kernel_examples(20), deadline=None, suppress_health_check=SLOW_OK)
@given(tag_calls())
def test_a_reused_tag_mask_gives_the_float64_masked_softmax(call):
    """One tag_mask, reused by Triton calls of two tile shapes (shared tags: also two batch
    sizes), the reference backend and a call with the raw tag pair: each is the float64
    masked softmax of the ORIGINAL tags, although the tensors passed in are changed in place
    after the mask was built (the mask holds a copy; its cached lists follow it)."""
    rng = torch.Generator().manual_seed(call["seed"] + 1)
    b, h, nq, nk, d = call["b"], call["h"], call["nq"], call["nk"], call["d"]

    def make(n):
        t = torch.randn(b, h, n, d, generator=rng).to(call["dtype"])
        return t if call["layout"] == "bhnd" else t.transpose(1, 2).contiguous()
    q, k, v = make(nq), make(nk), make(nk)
    qt, kt = call["qt"], call["kt"]  # as drawn: contiguous, strided or transposed views
    raw = (qt.clone(), kt.clone())
    mask = iidkern.tag_mask(qt, kt)
    if call["mutate"]:  # "changing the tensors passed in afterwards does not change the mask"
        qt.bitwise_not_()
        kt.fill_(-1)
    t1, t2 = call["tiles"]
    run_and_check(call, mask, q, k, v, "triton", t1, count_tiles=True)
    if call["shared"] and b == 2:  # shared tags: the same mask at another batch size
        run_and_check(call, mask, q[:1], k[:1], v[:1], "triton", t2, count_tiles=True)
    else:
        run_and_check(call, mask, q, k, v, "triton", t2, count_tiles=True)
    run_and_check(call, mask, q, k, v, "triton", t1)  # the lists cached by the first call
    run_and_check(call, mask, q, k, v, "reference")
    run_and_check(call, raw, q, k, v, "reference")


# --------------------------------------------------------------------------- TokenGroups
@settings(max_examples=host_examples(150), deadline=None)
@given(st.data())
def test_token_groups_each_and_single(data):
    draw = data.draw
    n = draw(st.integers(1, 40))
    start = draw(st.integers(0, n - 1))
    stop = draw(st.integers(start + 1, n))
    batch = draw(st.integers(1, 3))

    g = TokenGroups.each(maybe_numpy(draw, start), maybe_numpy(draw, stop))
    assert (g.kind, g.start, g.stop, g.count, g.group_ids) == ("each", start, stop, stop - start, None)
    assert type(g.start) is int and type(g.stop) is int
    ids = g.dense_ids(batch, n, "cpu")
    assert ids.dtype == torch.int32 and tuple(ids.shape) == (batch, n)
    assert ids.tolist() == [[t - start if start <= t < stop else -1 for t in range(n)]] * batch
    assert g.group_sizes(batch, n, "cpu").tolist() == [[1.0] * (stop - start)] * batch

    s = TokenGroups.single(start, stop, n)  # all of [start, stop) is one group
    assert (s.kind, s.start, s.stop, s.count) == ("ids", start, stop, 1)
    assert s.group_ids.tolist() == [0 if start <= t < stop else -1 for t in range(n)]
    assert s.dense_ids(batch, n, "cpu").tolist() == [s.group_ids.tolist()] * batch
    assert s.group_sizes(batch, n, "cpu").tolist() == [[float(stop - start)]] * batch


@settings(max_examples=host_examples(150), deadline=None)
@given(st.data())
def test_token_groups_ids(data):
    draw = data.draw
    n, groups = draw(st.integers(1, 30), label="n"), draw(st.integers(1, 6), label="groups")
    shared = draw(st.booleans(), label="shared [N] ids")
    rows = 1 if shared else draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]))
    low = 0 if dtype == torch.uint8 else -1  # uint8 ids (accepted) cannot say -1: every token is probed
    values = draw(st.lists(st.lists(st.integers(low, groups - 1), min_size=n, max_size=n),
                           min_size=rows, max_size=rows))
    probed = [t for t in range(n) if any(row[t] >= 0 for row in values)]
    if not probed:  # at least one probed token (else: no group, a ValueError, tested below)
        values[0][draw(st.integers(0, n - 1))] = groups - 1
        probed = [t for t in range(n) if any(row[t] >= 0 for row in values)]
    top = max(max(row) for row in values)
    tight = (probed[0], probed[-1] + 1)
    ids = torch.tensor(values[0] if shared else values, dtype=dtype)
    if draw(st.booleans()):
        count, span = top + 1, tight
        g = TokenGroups.ids(ids)
    else:  # given count and span, wider than needed
        count = draw(st.integers(top + 1, top + 3))
        lo = draw(st.integers(0, tight[0]))
        span = (lo, draw(st.integers(tight[1], n)))
        g = TokenGroups.ids(ids, count, span=span)
    assert (g.kind, g.start, g.stop, g.count) == ("ids", span[0], span[1], count)
    assert g.group_ids.shape == ids.shape and g.group_ids.tolist() == ids.tolist()

    batch = rows if not shared else draw(st.integers(1, 3))
    dense = g.dense_ids(batch, n, "cpu")
    full = values * batch if shared else values
    assert dense.dtype == torch.int32 and dense.tolist() == full
    sizes = g.group_sizes(batch, n, "cpu")
    assert sizes.dtype == torch.float32 and tuple(sizes.shape) == (batch, count)
    assert sizes.tolist() == [[float(row.count(i)) for i in range(count)] for row in full]
    assert g.group_sizes(batch, n, "cpu").tolist() == sizes.tolist()  # kept: same answer again


@settings(max_examples=host_examples(150), deadline=None)
@given(st.data())
def test_token_groups_segments(data):
    draw = data.draw
    n = draw(st.integers(1, 40))
    cuts = sorted(set(draw(st.lists(st.integers(0, n), min_size=2, max_size=10))))
    ranges = [(a, c) for a, c in zip(cuts[:-1], cuts[1:]) if draw(st.booleans())]
    if not ranges:
        ranges = [(cuts[0], cuts[1])] if len(cuts) > 1 else [(0, n)]
    ranges = draw(st.permutations(ranges))  # any order: group i is ranges[i]
    arg = (r for r in ranges) if draw(st.booleans()) else [list(r) for r in ranges]
    g = TokenGroups.segments(arg, n)
    want = [-1] * n
    for i, (a, c) in enumerate(ranges):
        want[a:c] = [i] * (c - a)
    assert (g.kind, g.count) == ("ids", len(ranges))
    assert (g.start, g.stop) == (min(a for a, _ in ranges), max(c for _, c in ranges))
    assert tuple(g.group_ids.shape) == (n,) and g.group_ids.tolist() == want
    assert not g.group_ids.is_floating_point()
    batch = draw(st.integers(1, 2))
    assert g.dense_ids(batch, n, "cpu").tolist() == [want] * batch
    assert g.group_sizes(batch, n, "cpu").tolist() == [[float(c - a) for a, c in ranges]] * batch


# --------------------------------------------------------------------------- router_weights
def router_float64(dot, n0, n1, gamma, delta, eps):
    """METHODS.md HeadRouter 1 in float64: s_h = cosine, d_h = (max s - s_h) / max(max s - min s,
    eps), w_h = 1 + gamma * sigmoid(d_h - delta); a pair with no spread gets d_h = 0. Also
    returns the spread per pair (what the rounding error of s is amplified by)."""
    s = dot.double() / (n0.double().sqrt() * n1.double().sqrt())
    smax, smin = s.max(-1, keepdim=True).values, s.min(-1, keepdim=True).values
    spread = smax - smin
    d = torch.where(spread == 0, torch.zeros_like(s), (smax - s) / spread.clamp_min(eps))
    return 1.0 + gamma * torch.sigmoid(d - delta), spread


def weight_tolerance(spread, gamma, eps, s_error):
    """|w - w64| bound: an error e in each s moves d by <= ~4e / max(spread, eps), and w by
    gamma / 4 of that (sigmoid' <= 1/4)."""
    return 1e-6 + abs(gamma) * s_error / torch.clamp(spread, min=eps)


@st.composite
def pair_stats_values(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    rng = torch.Generator().manual_seed(seed)
    p, h = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    n0 = torch.exp(torch.empty(p, h).uniform_(-7, 7, generator=rng)).double()  # norms 1e-3 .. 1e3
    n1 = torch.exp(torch.empty(p, h).uniform_(-7, 7, generator=rng)).double()
    cos = torch.empty(p, h).uniform_(-1, 1, generator=rng).double()
    shape = draw(st.sampled_from(["random", "equal", "tiny spread", "two values"]))
    if shape == "equal":  # identical heads in a pair: d_h = 0
        cos, n0, n1 = (t[:, :1].expand(p, h).clone() for t in (cos, n0, n1))
    elif shape == "tiny spread":  # spread below eps: d_h = (max s - s_h) / eps
        cos = cos[:, :1] * 0.5 + torch.empty(p, h).uniform_(0, 1e-8, generator=rng).double()
    elif shape == "two values":
        cos = torch.where(cos > 0, torch.full_like(cos, 0.7), torch.full_like(cos, -0.2))
    dot = cos * (n0 * n1).sqrt()
    gamma = draw(st.one_of(st.just(None), st.floats(-3, 3)))
    delta = draw(st.one_of(st.just(None), st.floats(-3, 3)))
    eps = draw(st.one_of(st.just(None), st.floats(1e-9, 0.5)))
    return dict(dot=dot.to(dtype), n0=n0.to(dtype), n1=n1.to(dtype), gamma=gamma, delta=delta, eps=eps,
                wrap=draw(st.sampled_from([float, np.float64, torch.tensor])))


@settings(max_examples=host_examples(200), deadline=None)
@given(pair_stats_values())
def test_router_weights_follow_methods_headrouter_1(case):
    kwargs = {name: case["wrap"](case[name]) for name in ("gamma", "delta", "eps") if case[name] is not None}
    w = iidkern.router_weights(PairStats(case["dot"], case["n0"], case["n1"]), **kwargs)
    gamma, delta, eps = (case[k] if case[k] is not None else dflt for k, dflt in
                         (("gamma", 0.2), ("delta", 0.5), ("eps", 1e-6)))
    want, spread = router_float64(case["dot"], case["n0"], case["n1"], gamma, delta, eps)
    assert tuple(w.shape) == tuple(case["dot"].shape) and w.is_floating_point()
    s_error = 1e-6 if case["dot"].dtype == torch.float32 else 1e-14
    tol = weight_tolerance(spread, gamma, eps, s_error)
    err = (w.double() - want).abs()
    assert (err <= tol).all(), f"router weights {w.tolist()} vs {want.tolist()} (error {err.max().item():.2e})"
    if gamma > 0:  # the lowest similarity gets the largest weight
        s = case["dot"].double() / (case["n0"].double() * case["n1"].double()).sqrt()
        low = s.argmin(-1, keepdim=True)
        assert (w.double().gather(-1, low) >= w.double().max(-1, keepdim=True).values - tol.max()).all()


# log10 of the squared scales a^2 (b^2) over which each dtype holds norm0_sq * a^2 (norms of 8
# standard normal values: 0.5 .. 30) as a normal, finite number, with a margin
SQUARED_SCALE_RANGE = {torch.float16: 2.5, torch.float32: 33.0, torch.float64: 300.0}
S_ERROR = {torch.float16: 4e-3, torch.float32: 1e-6, torch.float64: 1e-14}


@settings(max_examples=host_examples(60), deadline=None)
@example(dtype=torch.float32, log_a=1.0, log_b=1.0, seed=0)  # a^2 = b^2 = 1e33: the product overflows
@example(dtype=torch.float16, log_a=1.0, log_b=1.0, seed=0)  # a^2 = b^2 = 316
@example(dtype=torch.float64, log_a=-0.1, log_b=-0.1, seed=0)  # a b = 1e-30: the 1e-12 clamp
@given(st.sampled_from([torch.float16, torch.float32, torch.float64]), st.floats(-1, 1), st.floats(-1, 1),
       st.integers(0, 2**31 - 1))
def test_router_weights_do_not_depend_on_the_outputs_scale(dtype, log_a, log_b, seed):
    """s_h is a cosine: scaling branch 0's outputs by a and branch 1's by b (dot * a b,
    norm0_sq * a^2, norm1_sq * b^2) leaves the weights as they are, for every a, b whose
    statistics the stats' dtype holds as normal finite numbers (PairStats accepts any
    floating-point dtype). Found by this test: the cosine was taken in the stats' dtype as
    dot / sqrt(norm0_sq * norm1_sq) clamped to 1e-12, so the product overflowed or the clamp bent
    it, and the weights depended on the scale."""
    rng = torch.Generator().manual_seed(seed)
    a2, b2 = (10.0 ** (x * SQUARED_SCALE_RANGE[dtype]) for x in (log_a, log_b))
    o0, o1 = torch.randn(2, 4, 8, generator=rng).double().unbind(0)  # [H=4, 8] per branch
    dot, n0, n1 = (o0 * o1).sum(-1)[None], (o0 * o0).sum(-1)[None], (o1 * o1).sum(-1)[None]
    scaled = PairStats((dot * math.sqrt(a2) * math.sqrt(b2)).to(dtype), (n0 * a2).to(dtype), (n1 * b2).to(dtype))
    w = iidkern.router_weights(scaled)
    want, spread = router_float64(dot, n0, n1, 0.2, 0.5, 1e-6)
    tol = weight_tolerance(spread, 0.2, 1e-6, S_ERROR[dtype])
    assert torch.isfinite(w).all() and ((w.double() - want).abs() <= tol).all(), \
        f"a^2={a2:.3g} b^2={b2:.3g} {dtype}: {w.tolist()} vs {want.tolist()}"


@settings(max_examples=kernel_examples(15), deadline=None, suppress_health_check=SLOW_OK)
@given(st.data())
def test_router_weights_from_the_pair_stats_of_a_triton_call(data):
    """PairStats of the returned output (after head weights; masked rows count 0), then the
    router's weights against the cosine of that output computed in float64. Identical branches
    (a pair (b, b), or twin batch rows) have equal similarities: every d_h = 0 (routing.py)."""
    draw = data.draw
    seed = draw(st.integers(0, 2**31 - 1))
    rng = torch.Generator().manual_seed(seed)
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    nq, nk, d = draw(st.integers(1, 24)), draw(st.integers(1, 24)), draw(st.sampled_from([1, 8, 16]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    layout = draw(st.sampled_from(["bhnd", "bnhd"]))
    pairs = draw(st.lists(st.tuples(st.integers(0, b - 1), st.integers(0, b - 1)), min_size=1, max_size=3))
    if draw(st.booleans()) and b == 2:
        pairs = [(0, 1)]
    q, k, v = (torch.randn(b, h, n, d, generator=rng).to(dtype) for n in (nq, nk, nk))
    twins = b == 2 and draw(st.integers(0, 3)) == 0  # batch row 1 a copy of row 0 (tags, weights too)
    if twins:
        q, k, v = (t[:1].expand_as(t).contiguous() for t in (q, k, v))
    if layout == "bnhd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    hw = draw(st.sampled_from([None, (h,), (b, h), (b, h, nq)]))
    if hw is not None:
        hw = torch.rand(hw, generator=rng) + 0.5
        if twins and hw.dim() > 1:
            hw = hw[:1].expand_as(hw).contiguous()
    tags = None
    if draw(st.booleans()):  # some rows see nothing (count 0); query 0 sees every key
        qt = (torch.rand(b, nq, generator=rng) < 0.7).long()
        qt[:, 0] = 3
        kt = torch.where(torch.rand(b, nk, generator=rng) < 0.5, 1, 2)
        tags = (qt[:1].expand_as(qt).contiguous(), kt[:1].expand_as(kt).contiguous()) if twins else (qt, kt)
    gamma, delta = draw(st.floats(-2, 2)), draw(st.floats(-2, 2))
    res = iidkern.attention(q, k, v, layout=layout, tags=tags, head_weights=hw, pair_stats=pairs,
                            backend="triton", kernel_options={"poison": True})
    out = (res.out if layout == "bhnd" else res.out.transpose(1, 2)).double()  # [B, H, Nq, D]
    assert torch.isfinite(out).all()
    idx = torch.tensor(pairs)
    o0, o1 = out[idx[:, 0]].flatten(2), out[idx[:, 1]].flatten(2)  # [P, H, Nq * D]
    dot, n0, n1 = (o0 * o1).sum(-1), (o0 * o0).sum(-1), (o1 * o1).sum(-1)
    ps = res.pair_stats
    size = (n0 * n1).sqrt()
    for name, got, want, mag in (("dot", ps.dot, dot, size), ("norm0_sq", ps.norm0_sq, n0, n0),
                                 ("norm1_sq", ps.norm1_sq, n1, n1)):
        assert got.dtype == torch.float32 and tuple(got.shape) == (len(pairs), h), name
        assert ((got.double() - want).abs() <= 1e-5 * mag + 1e-30).all(), f"{name}: {got.tolist()} vs {want.tolist()}"

    w = iidkern.router_weights(ps, gamma, delta)
    want, spread = router_float64(dot, n0, n1, gamma, delta, 1e-6)
    tol = weight_tolerance(spread, gamma, 1e-6, 3e-5)
    err = (w.double() - want).abs()
    assert (err <= tol).all(), f"weights {w.tolist()} vs {want.tolist()} (error {err.max().item():.2e})"
    for p, (b0, b1) in enumerate(pairs):
        if b0 == b1 or twins:
            uniform = 1.0 + gamma / (1.0 + math.exp(delta))  # d_h = 0: 1 + gamma * sigmoid(-delta)
            assert (w[p].double() - uniform).abs().max() <= 1e-6, f"identical branches {pairs[p]}: {w[p].tolist()}"


# --------------------------------------------------------------------------- malformed arguments
MASK4 = torch.ones(1, 4, dtype=torch.bool)


def malformed_cases(draw):
    """(thunk, exception types, word the message must name) for one random malformed call."""
    r = draw(st.integers(-5, 50))
    bad_real = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    good_stats = PairStats(torch.rand(2, 3), torch.rand(2, 3) + 1, torch.rand(2, 3) + 1)
    cases = [
        # instruction_tags (image (0, 4), one instruction (4, 6) in a sequence of 8)
        (lambda: iidkern.instruction_tags(8, image=(0, 4), instructions=[(4, 6)],
                                          region_masks=torch.ones(1, 4) * r), TypeError, "region_masks"),
        (lambda: iidkern.instruction_tags(8, image=(0, 4), instructions=[(4, 6)],
                                          region_masks=torch.ones(1, 4 + abs(r) + 1, dtype=torch.bool)),
         ValueError, "region_masks"),
        (lambda: iidkern.instruction_tags(8, image=(0, 4), instructions=[(4, 6)],
                                          region_masks=MASK4, background=f"bg{r}"), ValueError, "background"),
        (lambda: iidkern.instruction_tags(8, image=(0, 4), instructions=[(min(3, abs(r) % 4), 6)],
                                          region_masks=MASK4), ValueError, "image"),
        (lambda: iidkern.instruction_tags(8, image=(0, 4), instructions=[(4, 6), (4 + abs(r) % 2, 8)],
                                          region_masks=torch.ones(2, 4, dtype=torch.bool)), ValueError, "overlap"),
        (lambda: iidkern.instruction_tags(8, image=(0, 9 + abs(r)), instructions=[(4, 6)], region_masks=MASK4),
         ValueError, "image"),
        (lambda: iidkern.instruction_tags(8, image=(0, 4.0 + abs(r)), instructions=[(4, 6)], region_masks=MASK4),
         TypeError, "image"),
        (lambda: iidkern.instruction_tags(8, image=(0, 4), instructions=(4, 6), region_masks=MASK4),
         TypeError, "instructions"),
        (lambda: iidkern.instruction_tags(8, image=(0, 4), instructions=[], region_masks=MASK4[:0]),
         ValueError, "instructions"),
        (lambda: iidkern.instruction_tags(67 + abs(r), image=(0, 4), instructions=[(4 + i, 5 + i) for i in range(63)],
                                          region_masks=torch.ones(63, 4, dtype=torch.bool)),
         ValueError, "instructions"),
        (lambda: iidkern.instruction_tags(8, image=(0, 4), instructions=[(4, 6)], region_masks=MASK4,
                                          always_visible=[(0, 9 + abs(r))]), ValueError, "always_visible"),
        (lambda: iidkern.instruction_tags(8, image=(0, 4), instructions=[(4, 6)],
                                          region_masks=MASK4.tolist()), TypeError, "region_masks"),
        # tags_from_segments
        (lambda: iidkern.tags_from_segments(-abs(r), [(0, 0, 1)]), ValueError, "length"),
        (lambda: iidkern.tags_from_segments(4, [(0, 2, 1)], batch=-abs(r)), ValueError, "batch"),
        (lambda: iidkern.tags_from_segments(4, [(0, 2, r + 0.5)]), TypeError, "bits"),
        (lambda: iidkern.tags_from_segments(4, [(0, 2, (1 << 64) + abs(r))]), ValueError, "bits"),
        (lambda: iidkern.tags_from_segments(4, [(0, 2, -(1 << 63) - 1 - abs(r))]), ValueError, "bits"),
        (lambda: iidkern.tags_from_segments(4, [(0, 5 + abs(r), 1)]), ValueError, "segment"),
        (lambda: iidkern.tags_from_segments(4, [(0, 2)]), TypeError, "segment"),
        (lambda: iidkern.tags_from_segments(4, [(0, 2, 1)], default=float(r)), TypeError, "default"),
        # TokenGroups
        (lambda: TokenGroups.each(abs(r), abs(r) - (r % 3)), ValueError, "start"),
        (lambda: TokenGroups.each(0.5 + abs(r), 40), TypeError, "start"),
        (lambda: TokenGroups.ids(torch.zeros(4) + r), TypeError, "group_ids"),
        (lambda: TokenGroups.ids([0, 1, -1]), TypeError, "group_ids"),
        (lambda: TokenGroups.ids(torch.tensor([0, 1, abs(r) + 2]), 2), ValueError, "ids"),
        (lambda: TokenGroups.ids(torch.tensor([0, -2 - abs(r), 1])), ValueError, "ids"),
        (lambda: TokenGroups.ids(torch.tensor([0, 1, -1, 1]), 2, span=(0, 2 + abs(r) % 2 - 1)), ValueError, "span"),
        (lambda: TokenGroups.ids(torch.full((3,), -1)), ValueError, "num_groups"),
        (lambda: TokenGroups.segments([(0, 3), (2 - abs(r) % 3, 5)], 8), ValueError, "overlap"),
        (lambda: TokenGroups.segments([(abs(r) % 8, abs(r) % 8)], 8), ValueError, "range"),
        (lambda: TokenGroups.segments([(0, 3)], -abs(r)), ValueError, "length"),
        (lambda: TokenGroups.segments((0, 3), 8), TypeError, "ranges"),
        # router_weights / PairStats
        (lambda: iidkern.router_weights(good_stats, gamma=bad_real), ValueError, "gamma"),
        (lambda: iidkern.router_weights(good_stats, delta=bad_real), ValueError, "delta"),
        (lambda: iidkern.router_weights(good_stats, gamma=f"{r}"), TypeError, "gamma"),
        (lambda: iidkern.router_weights(good_stats, eps=-abs(r) * 1e-3), ValueError, "eps"),
        (lambda: iidkern.router_weights(PairStats(torch.rand(2, 3), -torch.rand(2, 3) - 1e-3, torch.rand(2, 3))),
         ValueError, "norm0_sq"),
        (lambda: iidkern.router_weights(PairStats(torch.rand(2, 3), torch.rand(2, 3), -torch.rand(2, 3) - 1e-3)),
         ValueError, "norm1_sq"),
        (lambda: iidkern.router_weights(torch.rand(2, 3)), TypeError, "stats"),
        (lambda: PairStats(torch.rand(2, 3), torch.rand(2, 3), torch.rand(2, 3 + abs(r) + 1)),
         ValueError, "norm1_sq"),
        (lambda: PairStats(torch.ones(2, 3, dtype=torch.int64), torch.rand(2, 3), torch.rand(2, 3)), TypeError, "dot"),
        # tag_mask / attention tags
        (lambda: iidkern.tag_mask(torch.ones(4) * 0.5, torch.ones(4, dtype=torch.int64)), TypeError, "q_tags"),
        (lambda: iidkern.tag_mask(torch.ones(4, dtype=torch.int32), torch.ones(1, 1, 4, dtype=torch.int64)),
         ValueError, "k_tags"),
        (lambda: iidkern.attention(*(torch.randn(1, 1, 4, 8) for _ in range(3)), backend="reference",
                                   tags=iidkern.tag_mask(torch.ones(4 + abs(r) + 1, dtype=torch.int64),
                                                         torch.ones(4, dtype=torch.int64))), ValueError, "q_tags"),
    ]
    return draw(st.sampled_from(cases))


@settings(max_examples=host_examples(150), deadline=None)
@given(st.data())
def test_malformed_arguments_raise_an_error_naming_them(data):
    thunk, exc, word = malformed_cases(data.draw)
    with pytest.raises(exc) as info:
        thunk()
    assert word in str(info.value), f"{type(info.value).__name__}: {info.value} does not name {word!r}"
