"""Public helpers (router_weights / PairStats, instruction_tags, TokenGroups.segments,
tags_from_segments): a wrong shape, type, device or range is a ValueError / TypeError naming
the argument, what it expects and what it got; valid input behaves as before."""
import math

import numpy as np
import pytest
import torch

from iidkern import PairStats, TokenGroups as TG, allowed_pairs, instruction_tags, router_weights, tags_from_segments
from helpers import assert_raises_naming


def stats(p=2, h=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return PairStats(torch.rand(p, h, generator=g), torch.rand(p, h, generator=g) + .1,
                     torch.rand(p, h, generator=g) + .1)


def formula(st, gamma=0.2, delta=0.5, eps=1e-6):
    """METHODS.md, HeadRouter step 1, as router_weights computes it without its checks (the
    cosine in float64, 0 where a norm is 0, then in the stats' dtype, at least float32)."""
    norms = st.norm0_sq.double().sqrt() * st.norm1_sq.double().sqrt()
    s = torch.where(norms > 0, st.dot.double() / norms.clamp_min(1e-300), 0.0)
    s = s.to(torch.promote_types(st.dot.dtype, torch.float32))
    s_max, s_min = s.max(-1, keepdim=True).values, s.min(-1, keepdim=True).values
    return 1.0 + gamma * torch.sigmoid((s_max - s) / torch.clamp(s_max - s_min, min=eps) - delta)


# --------------------------------------------------------------------------- PairStats / router_weights
PAIR_STATS_CASES = [
    ("shape-mismatch", lambda: PairStats(torch.rand(2, 4), torch.rand(2, 3), torch.rand(2, 4)), ValueError,
     ["PairStats", "one shape [P, H]", "'norm0_sq': (2, 3)"]),
    ("one-d", lambda: PairStats(torch.rand(4), torch.rand(4), torch.rand(4)), ValueError, ["PairStats", "[P, H]", "(4,)"]),
    ("lists", lambda: PairStats([1., 2.], [1., 1.], [1., 1.]), TypeError, ["PairStats", "dot", "torch.Tensor", "list"]),
    ("strings", lambda: PairStats("a", "b", "c"), TypeError, ["PairStats", "dot", "torch.Tensor", "str"]),
    ("int-dtype", lambda: PairStats(torch.ones(1, 3), torch.ones(1, 3, dtype=torch.int64), torch.ones(1, 3)), TypeError,
     ["PairStats", "norm0_sq", "floating point", "int64"]),
    ("two-devices", lambda: PairStats(torch.ones(1, 3), torch.ones(1, 3), torch.ones(1, 3, device="meta")), ValueError,
     ["PairStats", "one device", "'norm1_sq': 'meta'"]),
]


@pytest.mark.parametrize("case", PAIR_STATS_CASES, ids=[c[0] for c in PAIR_STATS_CASES])
def test_pair_stats_refuses_what_is_no_p_by_h_float_tensor_triple(case):
    _, make, exc, words = case
    assert_raises_naming(exc, words, make)


ROUTER_CASES = [
    ("no-heads", dict(stats=PairStats(torch.rand(2, 0), torch.rand(2, 0), torch.rand(2, 0))), ValueError,
     ["router_weights", "stats", "H >= 1", "(2, 0)"]),
    ("no-pairs", dict(stats=PairStats(torch.rand(0, 3), torch.rand(0, 3), torch.rand(0, 3))), ValueError,
     ["router_weights", "P >= 1", "(0, 3)"]),
    ("meta", dict(stats=PairStats(*(torch.ones(1, 3, device="meta") for _ in range(3)))), ValueError,
     ["router_weights: stats.dot", "meta"]),
    ("negative-norm0", dict(stats=PairStats(torch.rand(1, 3), -torch.ones(1, 3), torch.ones(1, 3))), ValueError,
     ["router_weights", "stats.norm0_sq", ">= 0", "-1.0"]),
    ("negative-norm1", dict(stats=PairStats(torch.rand(1, 3), torch.ones(1, 3), torch.tensor([[1., -2., 1.]]))),
     ValueError, ["stats.norm1_sq", ">= 0", "-2.0"]),
    ("gamma-str", dict(gamma="0.2"), TypeError, ["router_weights", "gamma", "real number", "'0.2'"]),
    ("gamma-bool", dict(gamma=True), TypeError, ["gamma", "real number", "True"]),
    ("gamma-nan", dict(gamma=float("nan")), ValueError, ["gamma", "finite", "nan"]),
    ("delta-none", dict(delta=None), TypeError, ["delta", "real number", "None"]),
    ("delta-inf", dict(delta=float("inf")), ValueError, ["delta", "finite", "inf"]),
    ("eps-zero", dict(eps=0), ValueError, ["eps", "> 0", "0"]),
    ("eps-negative", dict(eps=-1.0), ValueError, ["eps", "> 0", "-1.0"]),
    ("eps-nan", dict(eps=float("nan")), ValueError, ["eps", "finite", "nan"]),
    ("eps-str", dict(eps="1e-6"), TypeError, ["eps", "real number", "'1e-6'"]),
]


@pytest.mark.parametrize("case", ROUTER_CASES, ids=[c[0] for c in ROUTER_CASES])
def test_router_weights_refuses_bad_stats_and_knobs(case):
    _, kw, exc, words = case
    kw = dict(kw)
    assert_raises_naming(exc, words, router_weights, kw.pop("stats", stats()), **kw)


def test_router_weights_checks_stats_changed_after_construction():
    """PairStats is mutable: router_weights checks its fields again."""
    st = stats()
    st.norm1_sq = torch.rand(2, 5)
    assert_raises_naming(ValueError, ["router_weights: stats", "one shape", "(2, 5)"], router_weights, st)
    st.norm1_sq = [1.0]
    assert_raises_naming(TypeError, ["router_weights: stats", "norm1_sq", "list"], router_weights, st)


def test_router_weights_identical_branches_give_finite_equal_weights_for_any_eps():
    """Equal similarities: d_h = 0 for every head, also where eps underflows float32 (0 / 0)."""
    same = PairStats(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3))
    expected = 1.0 + 0.2 * (1.0 / (1.0 + math.exp(0.5)))
    for eps in (1e-6, 1e-300):
        w = router_weights(same, eps=eps)
        assert torch.isfinite(w).all(), (eps, w)
        torch.testing.assert_close(w, torch.full((2, 3), expected), rtol=0, atol=1e-7)


def test_router_weights_valid_input_unchanged():
    """The checks change nothing for valid input (bit for bit), including zero norms,
    numpy / 0-d tensor knobs, a spread below eps and half-precision stats."""
    for st in (stats(), stats(1, 7, seed=3), PairStats(torch.rand(3, 5), torch.zeros(3, 5), torch.rand(3, 5)),
               PairStats(torch.tensor([[1.0, 1.0 - 1e-7, 1.0]]), torch.ones(1, 3), torch.ones(1, 3))):
        assert torch.equal(router_weights(st), formula(st))
        assert torch.equal(router_weights(st, 0.7, -0.3, 1e-3), formula(st, 0.7, -0.3, 1e-3))
        assert torch.equal(router_weights(st, np.float64(0.7), torch.tensor(-0.3), np.float32(1e-3)),
                           formula(st, 0.7, -0.3, float(np.float32(1e-3))))
        assert torch.equal(router_weights(st, gamma=1, delta=0), formula(st, 1, 0))
    half = PairStats(*(t.half() for t in (stats().dot, stats().norm0_sq, stats().norm1_sq)))
    assert torch.equal(router_weights(half), formula(half))
    assert router_weights(stats()).shape == (2, 4)


# --------------------------------------------------------------------------- instruction_tags
MASKS = torch.zeros(2, 4, dtype=torch.bool)
TAG_KW = dict(instructions=[(0, 1), (1, 2)], region_masks=MASKS)

TAG_CASES = [
    ("image-one", dict(image=(6,)), TypeError, ["instruction_tags: image", "(start, stop) pair", "(6,)"]),
    ("image-int", dict(image=6), TypeError, ["instruction_tags: image", "(start, stop) pair", "got 6 (int)"]),
    ("image-triple", dict(image=(6, 10, 99)), TypeError, ["instruction_tags: image", "(6, 10, 99)", "length 3"]),
    ("image-str", dict(image="6:10"), TypeError, ["instruction_tags: image", "'6:10'"]),
    ("image-none", dict(image=None), TypeError, ["instruction_tags: image", "None"]),
    ("instruction-triple", dict(image=(6, 10), instructions=[(0, 1, 2), (1, 2)]), TypeError,
     ["instruction_tags: instruction 0", "(start, stop) pair", "(0, 1, 2)"]),
    ("instructions-bare-pair", dict(image=(6, 10), instructions=(0, 1), region_masks=MASKS[:1]), TypeError,
     ["instruction_tags: instructions", "sequence of (start, stop) pairs", "[(start, stop)]", "(0, 1)"]),
    ("instructions-none", dict(image=(6, 10), instructions=None), TypeError, ["instruction_tags: instructions", "None"]),
    ("always-visible-bare-pair", dict(image=(6, 10), always_visible=(3, 4)), TypeError,
     ["instruction_tags: always_visible", "sequence of (start, stop) pairs", "[(start, stop)]", "(3, 4)"]),
    ("always-visible-triple", dict(image=(6, 10), always_visible=[(2, 3), (3, 4, 5)]), TypeError,
     ["instruction_tags: always_visible range 1", "(3, 4, 5)"]),
    ("always-visible-range", dict(image=(6, 10), always_visible=[(2, 3), (3, 11)]), ValueError,
     ["always_visible range 1=(3, 11)", "[0, 10]"]),
    ("device-str", dict(image=(6, 10), device="nope"), ValueError, ["instruction_tags: device", "'nope'"]),
    ("device-float", dict(image=(6, 10), device=1.5), TypeError, ["instruction_tags: device", "1.5"]),
    ("overlap", dict(image=(6, 10), instructions=[(0, 3), (2, 5)]), ValueError,
     ["instruction_tags: instruction ranges 0 (0, 3) and 1 (2, 5) overlap"]),
    ("duplicate", dict(image=(6, 10), instructions=[(0, 3), (0, 3)]), ValueError,
     ["instruction ranges 0 (0, 3) and 1 (0, 3) overlap"]),
    ("masks-no-batch", dict(image=(6, 10), region_masks=torch.zeros(0, 2, 4, dtype=torch.bool)), ValueError,
     ["instruction_tags: region_masks", "B >= 1", "(0, 2, 4)"]),
]


@pytest.mark.parametrize("case", TAG_CASES, ids=[c[0] for c in TAG_CASES])
def test_instruction_tags_refuses_bad_ranges_and_device(case):
    _, over, exc, words = case
    assert_raises_naming(exc, words, instruction_tags, 10, **{**TAG_KW, **over})


def test_instruction_tags_overlap_would_let_an_instruction_see_another():
    """Why overlapping instruction ranges are refused (as the IID policies refuse them): a
    shared token carries both bits, so P_0's text would see P_1's text ("never P_k")."""
    masks = torch.tensor([[True, False, False, False], [False, True, False, False]])
    q, k = instruction_tags(10, image=(6, 10), instructions=[(0, 2), (2, 5)], region_masks=masks)
    allow = allowed_pairs(q, k)[0]
    assert not allow[0:2, 2:5].any() and not allow[2:5, 0:2].any()


def test_instruction_tags_takes_any_iterable_of_pairs_and_valid_input_unchanged():
    masks = torch.tensor([[True, False, False, False], [False, True, True, False]])
    ref = instruction_tags(12, image=(6, 10), instructions=[(0, 2), (3, 5)], region_masks=masks,
                           always_visible=[(10, 11), (2, 3)])
    assert ref[0].shape == ref[1].shape == (1, 12)
    variants = [
        dict(image=[6, 10], instructions=((a, b) for a, b in [(0, 2), (3, 5)]), always_visible=iter([(10, 11), (2, 3)])),
        dict(image=torch.tensor([6, 10]), instructions=torch.tensor([[0, 2], [3, 5]]),
             always_visible=np.array([[10, 11], [2, 3]])),
        dict(image=(np.int64(6), 10), instructions=[[0, 2], (3, 5)], always_visible=((10, 11), (2, 3)), device="cpu"),
        dict(image=(6, 10), instructions=[(0, 2), (3, 5)], always_visible=[(10, 11), (2, 3)], device=torch.device("cpu")),
    ]
    for kw in variants:
        q, k = instruction_tags(12, region_masks=masks, **kw)
        assert torch.equal(q, ref[0]) and torch.equal(k, ref[1]), kw
    # Adjacent (touching) instruction ranges do not overlap; always_visible may overlap anything.
    q, k = instruction_tags(10, image=(6, 10), instructions=[(0, 3), (3, 6)], region_masks=MASKS,
                            always_visible=[(2, 4), (8, 9)])
    assert (q[0, 2:4] == -1).all() and (k[0, 8:9] == -1).all()


# --------------------------------------------------------------------------- TokenGroups.segments
SEGMENT_CASES = [
    ("bare-pair", lambda: TG.segments((0, 2), 5), TypeError,
     ["TokenGroups.segments: ranges", "sequence of (start, stop) pairs", "[(start, stop)]", "(0, 2)"]),
    ("none", lambda: TG.segments(None, 5), TypeError, ["TokenGroups.segments: ranges", "None"]),
    ("triple", lambda: TG.segments([(0, 2, 3)], 5), TypeError,
     ["TokenGroups.segments: range 0", "(start, stop) pair", "(0, 2, 3)"]),
    ("string", lambda: TG.segments("02", 5), TypeError, ["TokenGroups.segments: ranges", "'02'"]),
    ("device", lambda: TG.segments([(0, 2)], 5, device="gpu"), ValueError, ["TokenGroups.segments: device", "'gpu'"]),
    ("device-list", lambda: TG.segments([(0, 2)], 5, device=[0]), TypeError, ["TokenGroups.segments: device", "[0]"]),
]


@pytest.mark.parametrize("case", SEGMENT_CASES, ids=[c[0] for c in SEGMENT_CASES])
def test_segments_refuses_what_is_no_sequence_of_pairs(case):
    _, make, exc, words = case
    assert_raises_naming(exc, words, make)


def test_segments_takes_any_iterable_of_pairs_and_valid_input_unchanged():
    ref = TG.segments([(0, 2), (3, 5)], 6)
    assert ref.group_ids.tolist() == [0, 0, -1, 1, 1, -1] and (ref.start, ref.stop, ref.count) == (0, 5, 2)
    for ranges in (((a, b) for a, b in [(0, 2), (3, 5)]), iter([[0, 2], [3, 5]]), torch.tensor([[0, 2], [3, 5]]),
                   np.array([[0, 2], [3, 5]])):
        g = TG.segments(ranges, 6)
        assert torch.equal(g.group_ids, ref.group_ids) and (g.start, g.stop, g.count) == (0, 5, 2)
    g = TG.segments([(1, 3)], 4, device="cpu")
    assert g.group_ids.tolist() == [-1, 0, 0, -1] and TG.single(1, 3, 4).group_ids.tolist() == [-1, 0, 0, -1]
    assert_raises_naming(ValueError, ["at least one"], TG.segments, iter([]), 5)


# --------------------------------------------------------------------------- tags_from_segments
TFS_CASES = [
    ("batch-negative", lambda: tags_from_segments(5, [(0, 2, 1)], batch=-1), ValueError,
     ["tags_from_segments: batch", ">= 1", "-1"]),
    ("batch-zero", lambda: tags_from_segments(5, [(0, 2, 1)], batch=0), ValueError, ["tags_from_segments: batch", ">= 1"]),
    ("length-negative", lambda: tags_from_segments(-5, []), ValueError, ["tags_from_segments: length", ">= 1", "-5"]),
    ("bare-triple", lambda: tags_from_segments(5, (0, 2, 1)), TypeError,
     ["tags_from_segments: segments", "(start, stop, bits) triples", "[(start, stop, bits)]", "(0, 2, 1)"]),
    ("pair", lambda: tags_from_segments(5, [(0, 2)]), TypeError,
     ["tags_from_segments: segment 0", "(start, stop, bits) triple", "(0, 2)"]),
    ("none", lambda: tags_from_segments(5, None), TypeError, ["tags_from_segments: segments", "None"]),
    ("device", lambda: tags_from_segments(5, [(0, 2, 1)], device="nope"), ValueError,
     ["tags_from_segments: device", "'nope'"]),
]


@pytest.mark.parametrize("case", TFS_CASES, ids=[c[0] for c in TFS_CASES])
def test_tags_from_segments_refuses_bad_sizes_and_segments(case):
    _, make, exc, words = case
    assert_raises_naming(exc, words, make)


def test_tags_from_segments_takes_any_iterable_of_triples_and_valid_input_unchanged():
    ref = tags_from_segments(6, [(0, 2, 1), (1, 4, 2)], batch=2, default=8)
    assert ref.tolist() == [[9, 11, 10, 10, 8, 8]] * 2
    for segs in (((a, b, c) for a, b, c in [(0, 2, 1), (1, 4, 2)]), torch.tensor([[0, 2, 1], [1, 4, 2]]),
                 np.array([[0, 2, 1], [1, 4, 2]])):
        assert torch.equal(tags_from_segments(6, segs, batch=2, default=8, device="cpu"), ref)
    assert tags_from_segments(3, []).tolist() == [[0, 0, 0]]
