"""Probes, value probes, head weights, block multiplier and branch-pair statistics vs the oracle."""
import warnings

import pytest
import torch

import iidkern
from iidkern import BlockMultiplier, Probe, TokenGroups as TG, ValueProbe
from iidkern.reference import attention_probs, attention_reference
from iidkern.kernels import fast_launch, launch
from helpers import OUT_TOL, PROBE_TOL, assert_close_rel, assert_lse_equal, assert_within_magnitudes, make_qkv, \
    probe_on, random_key_groups, random_tags, rel_err
from oracle import magnitude_probes, oracle

OPTS = {"poison": True}
B, H, NQ, NK, D = 2, 3, 45, 38, 32


def _probe_suite(nq, nk, b, h, g):
    """One probe of every kind the issue lists, on odd ranges."""
    instr = torch.full((nk,), -1, dtype=torch.int32)
    instr[2:7], instr[7:9], instr[9:15] = 0, 1, 2
    qgroups = torch.randint(-1, 4, (b, nq), generator=g, dtype=torch.int32)
    return [
        Probe(TG.each(5, nq), TG.each(0, 20), heads="mean"),  # image x text head-mean map
        Probe(TG.each(3, nq - 2), TG.ids(instr, 3, span=(2, 15)), heads="keep", normalize="keys"),  # IID map
        Probe(TG.each(0, 20), TG.each(20, nk), heads="sum"),  # text x image, other direction
        Probe(TG.single(15, nq, nq), TG.each(15, nk), heads="keep", normalize="queries"),  # column means
        Probe(TG.ids(qgroups), TG.ids(instr, 3, span=(2, 15)), heads=torch.rand(b, h, generator=g), normalize="both"),
        ValueProbe(torch.randn(b, nk, 3, generator=g), TG.each(0, nq), heads="mean"),
        ValueProbe(torch.randn(nk, 5, generator=g), TG.ids(qgroups), heads="keep", normalize="queries"),
    ]


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_tags", [False, True])
def test_every_probe_kind(layout, dtype, with_tags):
    g = torch.Generator().manual_seed(31)
    q, k, v = make_qkv(B, H, NQ, NK, D, dtype=dtype, layout=layout, generator=g)
    tags = (random_tags(B, NQ, generator=g), random_tags(B, NK, generator=g)) if with_tags else None
    probes = _probe_suite(NQ, NK, B, H, g)
    res = iidkern.attention(q, k, v, layout=layout, tags=tags, probes=probes, backend="triton", kernel_options=OPTS)
    ref = attention_reference(q, k, v, layout=layout, tags=tags, probes=probes)
    assert_close_rel(res.out, ref.out, OUT_TOL[dtype])
    assert len(res.probes) == len(probes)
    for i, (got, want) in enumerate(zip(res.probes, ref.probes)):
        assert got.dtype == torch.float32
        assert_close_rel(got, want, PROBE_TOL[dtype], what=f"probe {i}")


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_probes_summed_weighted_and_wide(layout, dtype):
    """Value probes reduced over heads by "sum" and by per-(batch, head) weights, 20 channels in
    all (the side channel pads to 32, not 16), on odd query groups, against the float64
    attention times x written out here (not through the reference's helpers)."""
    g = torch.Generator().manual_seed(39)
    q, k, v = make_qkv(B, H, NQ, NK, D, dtype=dtype, layout=layout, generator=g)
    x1, x2 = torch.randn(B, NK, 12, generator=g), torch.randn(NK, 8, generator=g)
    weights = torch.rand(B, H, generator=g) + 0.25
    qgroups = torch.randint(-1, 3, (B, NQ), generator=g, dtype=torch.int32)
    probes = [ValueProbe(x1, TG.each(4, NQ - 3), heads="sum"), ValueProbe(x2, TG.ids(qgroups), heads=weights)]
    res = iidkern.attention(q, k, v, layout=layout, probes=probes, backend="triton", kernel_options=OPTS)
    qh, kh = (t if layout == "bhnd" else t.transpose(1, 2) for t in (q, k))
    a = attention_probs(qh.double(), kh.double(), D ** -0.5, None)[0]  # [B, H, NQ, NK]
    want_sum = (a @ x1.double()[:, None]).sum(1)[:, 4:NQ - 3]  # [B, rows, 12]
    per_head = a @ x2.double()  # [B, H, NQ, 8]
    weighted = (per_head * weights.double()[:, :, None, None]).sum(1)  # [B, NQ, 8]
    want_ids = torch.stack([torch.stack([weighted[b][qgroups[b] == grp].sum(0) for grp in range(3)])
                            for b in range(B)])  # [B, 3, 8]
    assert_close_rel(res.probes[0].reshape(want_sum.shape), want_sum, PROBE_TOL[dtype])
    assert_close_rel(res.probes[1].reshape(want_ids.shape), want_ids, PROBE_TOL[dtype])


def test_probe_shapes_and_row_sums():
    """A full-range, each x each probe with heads='keep' is the attention matrix: rows sum to 1."""
    g = torch.Generator().manual_seed(32)
    q, k, v = make_qkv(2, 2, 21, 19, 16, generator=g)
    res = iidkern.attention(q, k, v, probes=[Probe(TG.each(0, 21), TG.each(0, 19), heads="keep")],
                            backend="triton", kernel_options=OPTS)
    full = res.probes[0]
    assert full.shape == (2, 2, 21, 19)
    assert torch.allclose(full.sum(-1), torch.ones(2, 2, 21), atol=1e-5)
    probs, _ = attention_probs(q.double(), k.double(), 16 ** -0.5, None)
    assert torch.allclose(full.double(), probs, atol=1e-6)


def test_grouped_probe_with_many_groups_spans_several_chunks():
    """More groups than one output tile holds (G_BLOCK = 16) on both grouped sides."""
    g = torch.Generator().manual_seed(33)
    q, k, v = make_qkv(1, 2, 60, 70, 16, generator=g)
    qg = torch.randint(-1, 37, (1, 60), generator=g, dtype=torch.int32)
    kg = torch.randint(-1, 41, (1, 70), generator=g, dtype=torch.int32)
    probe = Probe(TG.ids(qg, 37), TG.ids(kg, 41), heads="keep")
    res = iidkern.attention(q, k, v, probes=[probe], backend="triton", kernel_options=OPTS)
    ref = attention_reference(q, k, v, probes=[probe])
    assert res.probes[0].shape == (1, 2, 37, 41)
    assert_close_rel(res.probes[0], ref.probes[0], 2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probe_ignores_head_weights_and_multiplier(dtype):
    """Probes read the softmax before head weights or a multiplier touch it: a probe-pass map
    and a fused key-group probe (whose sums the main pass takes beside P @ V), against the
    float64 probabilities of the plain attention."""
    g = torch.Generator().manual_seed(34)
    q, k, v = make_qkv(1, 2, 25, 29, 16, dtype=dtype, generator=g)
    probes = [Probe(TG.each(0, 25), TG.each(0, 29), heads="keep"),
              Probe(TG.each(2, 25), random_key_groups(29, (3, 20), 3, g), heads="keep", normalize="keys")]
    plain = attention_reference(q, k, v, probes=probes, compute_dtype=torch.float64).probes
    mult = BlockMultiplier(torch.rand(1, 10, 12, generator=g) * 3, 5, 4)
    extra = iidkern.attention(q, k, v, probes=probes, head_weights=torch.rand(2, generator=g) + 0.5,
                              block_multiplier=mult, backend="triton", kernel_options=OPTS)
    for got, want in zip(extra.probes, plain):
        assert_close_rel(got, want, PROBE_TOL[dtype])
    # the extras did act on the output
    assert rel_err(extra.out, attention_reference(q, k, v, compute_dtype=torch.float64).out) > 5 * OUT_TOL[dtype]


@pytest.mark.parametrize("shape", ["h", "bh", "bhq"])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_head_weights(shape, layout):
    g = torch.Generator().manual_seed(35)
    q, k, v = make_qkv(B, H, NQ, NK, D, layout=layout, generator=g)
    w = {"h": torch.rand(H, generator=g), "bh": torch.rand(B, H, generator=g),
         "bhq": torch.rand(B, H, NQ, generator=g)}[shape] + 0.5
    out = iidkern.attention(q, k, v, layout=layout, head_weights=w, backend="triton", kernel_options=OPTS)
    plain = attention_reference(q, k, v, layout=layout).out
    wq = w.view(1, H, 1) if shape == "h" else (w.view(B, H, 1) if shape == "bh" else w)  # [B or 1, H, Nq]
    wq = wq.unsqueeze(-1) if layout == "bhnd" else wq.transpose(1, 2).unsqueeze(-1)
    assert_close_rel(out, plain * wq, 2e-5)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_multiplier(per_head, dtype):
    g = torch.Generator().manual_seed(36)
    q, k, v = make_qkv(B, H, NQ, NK, D, dtype=dtype, layout="bnhd", generator=g)
    shape = (B, H, 17, 11) if per_head else (B, 17, 11)
    mult = BlockMultiplier(torch.rand(shape, generator=g) * 4, query_start=20, key_start=9)
    out = iidkern.attention(q, k, v, layout="bnhd", block_multiplier=mult, backend="triton", kernel_options=OPTS)
    # Independent definition: out = (M * P) @ V with P the plain softmax.
    probs, _ = attention_probs(q.transpose(1, 2).double(), k.transpose(1, 2).double(), D ** -0.5, None)
    m = torch.ones_like(probs)
    vals = mult.values.double() if per_head else mult.values.double().unsqueeze(1)
    m[:, :, 20:37, 9:20] = vals
    want = ((m * probs) @ v.transpose(1, 2).double()).transpose(1, 2)
    assert_close_rel(out, want, OUT_TOL[dtype])


@pytest.mark.parametrize("m_dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_multiplier_values_of_any_float_dtype(m_dtype, dtype):
    """The kernel reads the multiplier's values in their own dtype (no copy to float32): 16-bit
    values (which let the Hopper kernel split a head-dim-128 call's last wave, bench/NOTES.md
    71) and float64 ones give the reference's output for the same values."""
    g = torch.Generator().manual_seed(37)
    q, k, v = make_qkv(B, H, NQ, NK, D, dtype=dtype, layout="bhnd", generator=g)
    values = (0.25 + 3 * torch.rand(B, 23, 13, generator=g)).to(m_dtype)
    mult = BlockMultiplier(values, query_start=7, key_start=20)
    out = iidkern.attention(q, k, v, block_multiplier=mult, backend="triton", kernel_options=OPTS)
    want = attention_reference(q, k, v, layout="bhnd", block_multiplier=mult, compute_dtype=torch.float64).out
    assert_close_rel(out, want, OUT_TOL[dtype])
    plain = attention_reference(q, k, v, layout="bhnd", compute_dtype=torch.float64).out
    assert rel_err(plain, want) > 5 * OUT_TOL[dtype]  # the values did act


# Sub-block placements against 16x16 interpreter tiles (NQ=45, NK=70): at the first key,
# tile-aligned inside, mid-tile over several tiles, into the ragged last tile, everything.
@pytest.mark.parametrize("q0,nq,k0,nk", [(0, 7, 0, 5), (16, 29, 16, 32), (3, 40, 5, 40), (30, 15, 50, 20),
                                         (0, 45, 0, 70)])
@pytest.mark.parametrize("with_tags,mult_split", [(False, True), (False, False), (True, True)])
def test_block_multiplier_placements(q0, nq, k0, nk, with_tags, mult_split):
    # mult_split: the key range split at the sub-block (branch-free M loads) or a per-tile test.
    g = torch.Generator().manual_seed(1000 + q0 + k0 + nk)
    q, k, v = make_qkv(B, H, NQ, 70, D, layout="bhnd", generator=g)
    tags = (random_tags(B, NQ, generator=g), random_tags(B, 70, generator=g)) if with_tags else None
    mult = BlockMultiplier(torch.rand(B, nq, nk, generator=g) * 3, query_start=q0, key_start=k0)
    out = iidkern.attention(q, k, v, tags=tags, block_multiplier=mult, backend="triton",
                            kernel_options={**OPTS, "mult_split": mult_split})
    want = attention_reference(q, k, v, layout="bhnd", scale=D ** -0.5, tags=tags, block_multiplier=mult,
                               compute_dtype=torch.float64).out
    assert_close_rel(out, want, OUT_TOL[torch.float32])


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_pair_stats_and_router_weights(layout):
    g = torch.Generator().manual_seed(37)
    q, k, v = make_qkv(4, H, 29, 29, D, layout=layout, generator=g)
    pairs = [(0, 1), (2, 3), (3, 0)]
    res = iidkern.attention(q, k, v, layout=layout, pair_stats=pairs, backend="triton", kernel_options=OPTS)
    o = res.out.double() if layout == "bhnd" else res.out.double().transpose(1, 2)
    for p, (b0, b1) in enumerate(pairs):
        assert torch.allclose(res.pair_stats.dot[p].double(), (o[b0] * o[b1]).sum((1, 2)), rtol=1e-5)
        assert torch.allclose(res.pair_stats.norm0_sq[p].double(), (o[b0] ** 2).sum((1, 2)), rtol=1e-5)
        assert torch.allclose(res.pair_stats.norm1_sq[p].double(), (o[b1] ** 2).sum((1, 2)), rtol=1e-5)
    # The IARouter formula of METHODS.md, written out independently.
    w = iidkern.router_weights(res.pair_stats, gamma=0.2, delta=0.5)
    s = res.pair_stats.dot / (res.pair_stats.norm0_sq * res.pair_stats.norm1_sq).sqrt()
    d = (s.max(-1, keepdim=True).values - s) / (s.max(-1, keepdim=True).values - s.min(-1, keepdim=True).values)
    assert torch.allclose(w, 1 + 0.2 * torch.sigmoid(d - 0.5), atol=1e-6)
    assert w.shape == (3, H) and (w >= 1).all() and (w <= 1.2).all()


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_pair_stats_pass_walks_several_token_tiles_a_program(layout):
    """The pass's programs each loop over token tiles (pid, pid + n_progs, ...), the last one
    ragged: 83 tokens are 6 tiles of 16 for 2 programs here, so each walks 3."""
    from iidkern.kernels import launch
    assert launch._pair_stats_programs(6, 3, torch.device("cpu")) == 2
    g = torch.Generator().manual_seed(41)
    q, k, v = make_qkv(3, 3, 83, 40, 24, layout=layout, generator=g)
    res = iidkern.attention(q, k, v, layout=layout, pair_stats=[(2, 0)], backend="triton", kernel_options=OPTS)
    o = res.out.double() if layout == "bhnd" else res.out.double().transpose(1, 2)
    torch.testing.assert_close(res.pair_stats.dot[0].double(), (o[2] * o[0]).sum((1, 2)), rtol=1e-5, atol=0)
    torch.testing.assert_close(res.pair_stats.norm0_sq[0].double(), (o[2] ** 2).sum((1, 2)), rtol=1e-5, atol=0)
    torch.testing.assert_close(res.pair_stats.norm1_sq[0].double(), (o[0] ** 2).sum((1, 2)), rtol=1e-5, atol=0)


def test_everything_at_once_matches_reference():
    g = torch.Generator().manual_seed(38)
    q, k, v = make_qkv(B, H, NQ, NK, D, dtype=torch.float16, layout="bnhd", generator=g)
    tags = (random_tags(B, NQ, generator=g), random_tags(B, NK, generator=g))
    probes = _probe_suite(NQ, NK, B, H, g)
    hw = torch.rand(B, H, generator=g) + 0.5
    mult = BlockMultiplier(torch.rand(B, 9, 13, generator=g) * 2, 30, 20)
    kw = dict(layout="bnhd", tags=tags, probes=probes, head_weights=hw, block_multiplier=mult, pair_stats=[(0, 1)])
    res = iidkern.attention(q, k, v, backend="triton", return_lse=True, kernel_options=OPTS, **kw)
    ref = attention_reference(q, k, v, pair_stats=torch.tensor([[0, 1]]), **{k_: v_ for k_, v_ in kw.items()
                                                                               if k_ != "pair_stats"})
    assert_close_rel(res.out, ref.out, OUT_TOL[torch.float16])
    assert_lse_equal(res.lse, ref.lse, 1e-3)
    for got, want in zip(res.probes, ref.probes):
        assert_close_rel(got, want, PROBE_TOL[torch.float16])
    # the statistics of the output the call returned (fp16: the reference's own output differs
    # by its rounding, so it is the returned one that the sums must match closely)
    o = res.out.double().transpose(1, 2)  # [B, H, N, D]
    torch.testing.assert_close(res.pair_stats.dot[0].double(), (o[0] * o[1]).sum((1, 2)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.pair_stats.norm0_sq[0].double(), (o[0] ** 2).sum((1, 2)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.pair_stats.norm1_sq[0].double(), (o[1] ** 2).sum((1, 2)), rtol=1e-5, atol=1e-6)
    assert torch.allclose(res.pair_stats.dot, ref.pair_stats.dot, rtol=1e-2)


def test_warp_specialize_option_same_result():
    # The opt-in warp-specialized loop must compute the same thing (plain and multiplier paths).
    g = torch.Generator().manual_seed(41)
    q, k, v = make_qkv(B, H, NQ, NK, D, layout="bnhd", generator=g)
    mult = BlockMultiplier(torch.rand(B, 20, 17, generator=g) * 3, query_start=10, key_start=4)
    for kw in ({}, {"block_multiplier": mult}):
        ws = iidkern.attention(q, k, v, layout="bnhd", backend="triton",
                               kernel_options={**OPTS, "warp_specialize": True}, **kw)
        want = attention_reference(q, k, v, layout="bnhd", scale=D ** -0.5, compute_dtype=torch.float64,
                                   block_multiplier=kw.get("block_multiplier")).out
        assert_close_rel(ws, want, OUT_TOL[torch.float32])


@pytest.mark.parametrize("view", ["transposed", "narrow-of-wider"])
def test_block_multiplier_strided_values(view):
    # Multipliers that are views (column-major, or a narrow slice of a padded buffer) give
    # the same result as their contiguous copy.
    g = torch.Generator().manual_seed(43)
    q, k, v = make_qkv(B, H, NQ, NK, D, layout="bnhd", generator=g)
    base = torch.rand(B, 19, 13, generator=g) * 3
    vals = base.transpose(1, 2).contiguous().transpose(1, 2) if view == "transposed" else \
        torch.zeros(B, 19, 16).index_copy_(2, torch.arange(13), base)[..., :13]
    got = iidkern.attention(q, k, v, layout="bnhd", backend="triton", kernel_options=OPTS,
                            block_multiplier=BlockMultiplier(vals, query_start=7, key_start=11))
    want = iidkern.attention(q, k, v, layout="bnhd", backend="reference",
                             block_multiplier=BlockMultiplier(base, query_start=7, key_start=11))
    assert_close_rel(got, want, OUT_TOL[torch.float32])


def test_group_sizes_are_counted_once_per_groups_object():
    ids = torch.tensor([[0, 0, 1, -1, 1, 1], [1, -1, -1, 0, 0, 0]], dtype=torch.int32)
    groups = TG.ids(ids, 2)
    sizes = groups.group_sizes(2, 6, "cpu")
    assert sizes.tolist() == [[2.0, 3.0], [3.0, 1.0]]
    assert groups.group_sizes(2, 6, "cpu") is sizes  # reused, no recount
    assert TG.each(2, 5).group_sizes(1, 6, "cpu").tolist() == [[1.0, 1.0, 1.0]]


def test_normalization_factors_are_kept_per_groups_object():
    """``normalize`` divides by max(size, 1) and the fused probe multiplies by its inverse:
    float32, an empty group's factor 1, both computed once per TokenGroups object."""
    ids = torch.tensor([[0, 0, 2, -1, 2, 2], [2, -1, -1, 0, 0, 0]], dtype=torch.int32)  # group 1 is empty
    groups = TG.ids(ids, 3)
    divisors, inverse = groups.size_divisors(2, 6, "cpu"), groups.inverse_sizes(2, 6, "cpu")
    assert divisors.dtype == inverse.dtype == torch.float32
    assert divisors.tolist() == [[2.0, 1.0, 3.0], [3.0, 1.0, 1.0]]
    assert torch.equal(inverse, 1.0 / divisors)
    assert groups.size_divisors(2, 6, "cpu") is divisors and groups.inverse_sizes(2, 6, "cpu") is inverse


def test_nothing_built_during_a_graph_capture_is_kept(monkeypatch):
    """A tensor built while a CUDA graph is captured holds its values only once the graph
    replays: the per-group factors and the fused probe's unit row are then used by that call
    but not kept for others (on a GPU: every later eager call would read unset memory)."""
    from iidkern.kernels import fast_launch
    monkeypatch.setattr(fast_launch, "capturing", lambda t: True)
    monkeypatch.setattr(launch, "capturing", lambda t: True)
    monkeypatch.setattr(launch, "_UNIT_SCALES", {})
    groups = TG.ids(torch.tensor([0, 0, 1, -1], dtype=torch.int32), 2)
    first = groups.inverse_sizes(1, 4, "cpu")
    assert groups.inverse_sizes(1, 4, "cpu") is not first and torch.equal(groups.inverse_sizes(1, 4, "cpu"), first)
    assert launch._unit_column_scale(torch.device("cpu")) is not launch._unit_column_scale(torch.device("cpu"))
    assert launch._UNIT_SCALES == {}
    monkeypatch.setattr(fast_launch, "capturing", lambda t: False)
    monkeypatch.setattr(launch, "capturing", lambda t: False)
    assert groups.inverse_sizes(1, 4, "cpu") is groups.inverse_sizes(1, 4, "cpu")
    assert launch._unit_column_scale(torch.device("cpu")) is launch._unit_column_scale(torch.device("cpu"))


def test_each_probe_result_is_its_own_contiguous_tensor():
    """Value probes come out of one padded kernel buffer and per-query probes may be slices:
    every result is returned contiguous and owns its storage (as the reference backend's),
    so ``.view(-1)`` works and a kept result does not hold the padded buffer alive."""
    g = torch.Generator().manual_seed(83)
    b, h, n = 2, 3, 40
    q, k, v = make_qkv(b, h, n, n, 16, generator=g)
    ids = torch.randint(-1, 3, (n,), generator=g, dtype=torch.int32)
    probes = [ValueProbe(torch.randn(b, n, 2, generator=g), TG.each(0, 10), heads="keep"),
              ValueProbe(torch.randn(b, n, 3, generator=g), TG.each(5, 30), heads="keep"),
              Probe(TG.each(3, 20), TG.ids(ids, 3), heads="keep"),
              Probe(TG.each(0, n), TG.each(7, 19), heads="keep")]
    res = iidkern.attention(q, k, v, probes=probes, backend="triton", kernel_options=OPTS)
    ref = attention_reference(q, k, v, probes=probes)
    storages = set()
    for got, want in zip(res.probes, ref.probes):
        assert got.is_contiguous() and got.view(-1).numel() == want.numel()
        assert got.untyped_storage().nbytes() == got.numel() * got.element_size()
        storages.add(got.untyped_storage().data_ptr())
        assert_close_rel(got, want, PROBE_TOL[torch.float32])
    assert len(storages) == len(probes)


@pytest.mark.parametrize("ids_form", ["shared", "batched", "transposed"])
def test_query_group_folding_sums_each_group_in_float64(ids_form):
    """The host fold of per-query probe rows into query groups (value probes, grouped-query
    key-group probes): each group's float64 sum, empty groups zero, unprobed rows dropped,
    from any first row; sort and running sum, so the same on every run (no atomics). Ids
    read from a transposed tensor fold the same, without a warning."""
    from iidkern.kernels.launch import _fold_query_groups
    g = torch.Generator().manual_seed(17)
    b, h, n, c, count, row0 = 2, 3, 57, 4, 6, 5
    shape = {"shared": (n,), "batched": (b, n), "transposed": (n, b)}[ids_form]
    ids = torch.randint(-1, count - 1, shape, generator=g, dtype=torch.int32)  # group count-1 stays empty
    if ids_form == "transposed":
        ids = ids.t()
        assert not ids.is_contiguous()
    groups = TG.ids(ids, num_groups=count, span=(0, n))
    per_query = torch.randn(b, h, n - row0, c, generator=g) * 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _fold_query_groups(per_query, groups, row0, n)
    dense = ids.expand(b, n)[:, row0:]
    want = torch.stack([(per_query.double() * (dense == j)[:, None, :, None]).sum(2) for j in range(count)], 2)
    assert got.dtype == torch.float32 and got.shape == (b, h, count, c)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-5)
    assert torch.equal(got[:, :, count - 1], torch.zeros(b, h, c))


def test_query_group_folding_keeps_small_groups_and_non_finite_rows_apart():
    """Each group is summed on its own: a group of tiny values after large ones keeps its
    relative precision, and a NaN row spoils its own group only (an empty group stays 0)."""
    from iidkern.kernels.launch import _fold_query_groups
    n, count = 4100, 4
    ids = torch.zeros(n, dtype=torch.int32)
    ids[4092:4096] = 1  # four tiny rows after 4092 large ones
    ids[4096:] = 3  # group 2 stays empty
    per_query = torch.rand(1, 1, n, 1, dtype=torch.float64).float()
    per_query[0, 0, 4092:4096] = 1e-10 * (1 + torch.arange(4.0))[:, None]
    got = _fold_query_groups(per_query, TG.ids(ids, num_groups=count, span=(0, n)), 0, n)
    torch.testing.assert_close(got[0, 0, 1], torch.tensor([1e-9]), rtol=1e-6, atol=0)
    per_query[0, 0, 5] = float("nan")
    got = _fold_query_groups(per_query, TG.ids(ids, num_groups=count, span=(0, n)), 0, n)
    assert torch.isnan(got[0, 0, 0]).all() and torch.isfinite(got[0, 0, 1:]).all() and got[0, 0, 2].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 40, 64])
def test_probe_pass_splits_its_fold_only_at_power_of_two_head_dims(dtype, head_dim):
    """The three-piece bf16 fold (16-bit inputs, a grouped side) is what Triton 3.6 compiled
    into an out-of-bounds shared-memory read at head dim 40 (NOTES.md 76): a head dim that
    is not a power of two, and fp32 inputs, take the one-product fold. The launch's constexprs
    show the route; the folds still match float64."""
    g = torch.Generator().manual_seed(77)
    q, k, v = make_qkv(2, 2, 37, 45, head_dim, dtype=dtype, generator=g)
    probes = [Probe(TG.ids(torch.randint(-1, 3, (37,), generator=g, dtype=torch.int32)), TG.each(0, 45)),
              Probe(TG.each(0, 37), random_key_groups(45, (3, 41), 4, g), heads="keep"),
              Probe(TG.each(0, 37), TG.each(0, 45))]  # token x token: nothing folds
    with fast_launch.recording() as launches:
        res = iidkern.attention(q, k, v, probes=probes, backend="triton",
                                kernel_options={**OPTS, "fuse_key_groups": False})
    folds = [c for (_, _, _, c) in launches if "FOLD_SPLIT" in c]
    assert len(folds) == len(probes)
    split = dtype != torch.float32 and head_dim in (32, 64)
    assert [c["FOLD_SPLIT"] for c in folds] == [split, split, False]
    ref = attention_reference(q, k, v, probes=probes, compute_dtype=torch.float64)
    for i, (got, want) in enumerate(zip(res.probes, ref.probes)):
        assert_close_rel(got, want, PROBE_TOL[dtype], what=f"probe {i}")


def fold_precision_inputs(d, dtype):
    """q, k, v ``[2, 3, N, d]`` (70 queries, 93 keys), query ids in 5 groups per batch row and
    key ids with keys 80.. alone in group 4, scoring ~18 below the rest at every head dim
    (scores scale by 1 / sqrt(d)), and the generator, to draw more. Also used by
    scratch/fold_d256_diag.py."""
    g = torch.Generator().manual_seed(76)
    b, h, nq, nk = 2, 3, 70, 93
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for n in (nq, nk, nk))
    q[..., 0], k[..., :80, 0], k[..., 80:, 0] = 4 * (d / 32) ** 0.5, 0, -25
    q_ids = torch.randint(-1, 5, (b, nq), generator=g, dtype=torch.int32)
    k_ids = torch.randint(-1, 4, (nk,), generator=g, dtype=torch.int32)
    k_ids[80:] = 4
    return q, k, v, q_ids, k_ids, g


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dev, d", [("cpu", 32)] + [pytest.param("cuda", d, marks=pytest.mark.cuda)
                                                    for d in (16, 32, 64, 128, 256)])
def test_probe_pass_folds_groups_to_fp32_precision(dev, d, dtype, probe_pass_calls):
    """The probe pass folds 16-bit calls' probabilities into groups as three bf16 pieces per
    value (kernels/probe.py, ``_fold_split``; at head dims that are powers of two, each of
    which the GPU compiles with its own tiles; the interpreter's product does not depend on
    the head dim, so CPU runs one). The fold alone: within 1e-6 of the same call's token x
    token map (nothing folds; the same scores and LSE) folded on the host in float64. End to
    end: per element within 1e-5 of the sum of its terms' magnitudes against float64 (5e-5 at
    head dim 256, where the scores' fp32 sums round to ~1e-5 of p), also for a group of
    probabilities ~1e-10, at either side and both. A tf32 product (the fold before NOTES.md
    76, and still at other head dims) truncates each operand to 11 bits, ~1e-3 a term."""
    device = torch.device(dev)
    q, k, v, q_ids, k_ids, g = fold_precision_inputs(d, dtype)
    (b, h, nq, _), nk = q.shape, k.shape[2]
    signed = torch.rand(b, h, generator=g) * 2 - 1
    probes = [
        Probe(TG.ids(q_ids), TG.ids(k_ids), heads=signed, normalize="both"),  # both sides fold
        Probe(TG.ids(q_ids), TG.each(0, nk), heads="keep"),  # queries fold
        Probe(TG.each(1, nq), TG.ids(k_ids), heads="mean"),  # keys fold
        Probe(TG.each(0, 9), TG.ids(k_ids, 5, span=(0, nk)), heads="sum", normalize="keys"),
    ]
    token_map = Probe(TG.each(0, nq), TG.each(0, nk), heads="keep")
    res = iidkern.attention(*(t.to(device) for t in (q, k, v)),
                            probes=[probe_on(p, device) for p in probes + [token_map]], backend="triton",
                            kernel_options={**OPTS, "fuse_key_groups": False})
    assert len(probe_pass_calls) == len(probes) + 1  # none rides in the main pass (its own fp16 split)
    tokens = res.probes[-1].double().cpu()  # [B, H, nq, nk], unfolded
    q_members = torch.stack([q_ids == j for j in range(5)], 1).double()  # [B, 5, nq]
    k_members = torch.stack([k_ids == j for j in range(5)], 1).double()  # [nk, 5]
    host_folds = {1: torch.einsum("bgq,bhqk->bhgk", q_members, tokens),
                  2: (tokens[:, :, 1:] @ k_members).mean(1, keepdim=True)}
    for i, host in host_folds.items():
        # every term is a probability: the host's fold is its own terms' magnitude, per element
        assert_within_magnitudes(res.probes[i].cpu(), host, host, 1e-6, what=f"probe {i} against the host's fold")
    want = oracle(q, k, v, probes=probes).probes
    magnitudes = oracle(q, k, v, probes=magnitude_probes(probes)).probes
    tiny = want[2][:, :, :, 4]
    assert 0 < tiny.abs().max() < 1e-7  # the tiny group is there
    # End to end the scores' own fp32 sums set the floor: over 256 channels, with keys 80..'s
    # raw dot ~280 (~18 below the rest at scale 1 / 16), they round to ~1e-5 of p (a CPU
    # emulation: 9.6e-6; 5.7e-6 at 128). The H200 measured 1.5-1.7e-5 there, the token map
    # itself 2.1-2.8e-5, the fold against it 1.6e-7 (scratch/fold_d256_diag.py, session 28).
    tol = 1e-5 if d <= 128 else 5e-5
    for i, (got, w, m) in enumerate(zip(res.probes, want, magnitudes)):
        assert_within_magnitudes(got.cpu(), w, m, tol, what=f"probe {i}")
