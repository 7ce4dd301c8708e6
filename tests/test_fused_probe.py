"""The grouped-key probe that rides in the main pass (IID's image x instruction map).

A probe whose keys are grouped into few groups is accumulated beside the output in the
flash pass instead of a second pass. These tests pin that path: it is taken (the probe
pass is never launched), and it matches the float64 oracle for every query-side kind,
head reduction, normalization, key span placement (inside one tile, across tiles, up to
the ragged last tile; spans into that tile take the probe pass unless tags are given),
with tags, a block multiplier and value probes beside it.
"""
import pytest
import torch

import iidkern
from iidkern import BlockMultiplier, Probe, TokenGroups as TG, ValueProbe
from iidkern.kernels import fast_launch, launch
from iidkern.kernels.kernel_args import scales_p_for_key_groups
from iidkern.reference import attention_reference
from helpers import OUT_TOL, PROBE_TOL, assert_close_rel, make_qkv, random_key_groups, random_tags, \
    tiny_group_probabilities

OPTS = {"poison": True}


def _query_groups(kind, nq, g, b):
    if kind == "each":
        return TG.each(3, nq - 2)
    if kind == "single":
        return TG.single(4, nq - 1, nq)
    ids = torch.randint(-1, 5, (b, nq), generator=g, dtype=torch.int32)
    return TG.ids(ids, 5)


@pytest.mark.parametrize("query_kind", ["each", "single", "ids"])
@pytest.mark.parametrize("heads", ["keep", "mean", "sum", "weights"])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("normalize", ["keys", None, "both"])
def test_fused_probe_matches_reference(no_probe_pass, query_kind, heads, layout, normalize):
    # The key groups' sizes divide in the kernel's epilogue; the query side's after it.
    g = torch.Generator().manual_seed(61)
    b, h, nq, nk, d = 2, 3, 53, 61, 32  # several 16-token tiles and a ragged last tile
    q, k, v = make_qkv(b, h, nq, nk, d, layout=layout, generator=g)
    head_mode = torch.rand(b, h, generator=g) if heads == "weights" else heads
    probe = Probe(_query_groups(query_kind, nq, g, b), random_key_groups(nk, (5, 40), 4, g),
                  heads=head_mode, normalize=normalize)
    res = iidkern.attention(q, k, v, layout=layout, probes=[probe], backend="triton", kernel_options=OPTS)
    ref = attention_reference(q, k, v, layout=layout, probes=[probe])
    assert_close_rel(res.out, ref.out, OUT_TOL[torch.float32])
    assert res.probes[0].shape == ref.probes[0].shape
    assert_close_rel(res.probes[0], ref.probes[0], PROBE_TOL[torch.float32])


@pytest.mark.parametrize("span", [(0, 7), (17, 30), (0, 48), (40, 61), (0, 61), (60, 61)])
@pytest.mark.parametrize("n_groups", [1, 3, 17, 32])
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("kg_split", [True, False])
def test_fused_probe_key_spans_and_group_counts(no_probe_pass, span, n_groups, batched, kg_split):
    # Spans inside one tile, across tiles, up to the ragged last tile (keys 48..60 with
    # 16-key tiles), through it, everything, one key in it; group counts that pad to 16
    # and to 32 columns; one id row for the batch or one per batch item; the groups' own
    # key-tile range (the D=128 default) or a per-tile test (D=64). All ride in the main
    # pass: the ragged tile runs in a one-tile loop of its own (NOTES.md 25).
    g = torch.Generator().manual_seed(62)
    q, k, v = make_qkv(2, 2, 37, 61, 16, generator=g)
    block_n = launch.default_config(16, torch.float32)["BLOCK_N"]
    assert 61 // block_n * block_n == 48  # the spans above are placed for 16-key tiles
    probe = Probe(TG.each(0, 37), random_key_groups(61, span, n_groups, g, batched=batched, b=2), heads="keep",
                  normalize="keys")
    res = iidkern.attention(q, k, v, probes=[probe], backend="triton", kernel_options={**OPTS, "kg_split": kg_split})
    ref = attention_reference(q, k, v, probes=[probe])
    assert res.probes[0].shape == (2, 2, 37, n_groups)
    assert_close_rel(res.out, ref.out, OUT_TOL[torch.float32])
    assert_close_rel(res.probes[0], ref.probes[0], PROBE_TOL[torch.float32])


@pytest.mark.parametrize("span", [(40, 61), (0, 61), (60, 61)])
def test_key_spans_in_the_ragged_tail_are_fused_with_tags(no_probe_pass, span):
    # With tags the ragged last tile runs inside the tile-list loops instead.
    g = torch.Generator().manual_seed(68)
    q, k, v = make_qkv(1, 2, 37, 61, 16, generator=g)
    tags = (random_tags(1, 37, generator=g), random_tags(1, 61, generator=g))
    probe = Probe(TG.each(0, 37), random_key_groups(61, span, 3, g), heads="keep", normalize="keys")
    res = iidkern.attention(q, k, v, tags=tags, probes=[probe], backend="triton", kernel_options=OPTS)
    ref = attention_reference(q, k, v, tags=tags, probes=[probe])
    assert_close_rel(res.out, ref.out, OUT_TOL[torch.float32])
    assert_close_rel(res.probes[0], ref.probes[0], PROBE_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_tags", [False, True])
@pytest.mark.parametrize("with_mult", [False, "split", "per-tile"])
def test_fused_probe_with_other_extras(no_probe_pass, dtype, with_tags, with_mult):
    # Tags (list-driven loop, rows with no allowed key), a multiplier (which then owns the
    # key-range split, so the key groups are tested per tile), a value probe alongside.
    g = torch.Generator().manual_seed(63)
    b, h, nq, nk, d = 2, 2, 45, 50, 32
    q, k, v = make_qkv(b, h, nq, nk, d, dtype=dtype, layout="bnhd", generator=g)
    tags = (random_tags(b, nq, generator=g), random_tags(b, nk, generator=g)) if with_tags else None
    mult = BlockMultiplier(torch.rand(b, 20, 18, generator=g) * 2, 10, 12) if with_mult else None
    probes = [ValueProbe(torch.randn(b, nk, 3, generator=g), TG.each(0, nq), heads="mean"),
              Probe(TG.each(2, nq), random_key_groups(nk, (6, 35), 3, g, batched=True, b=b), heads="keep")]
    # "per-tile": the multiplier is tested per tile and the key groups own the key-range split.
    opts = {**OPTS, "mult_split": with_mult != "per-tile", "kg_split": True}
    res = iidkern.attention(q, k, v, layout="bnhd", tags=tags, block_multiplier=mult, probes=probes,
                            backend="triton", kernel_options=opts)
    ref = attention_reference(q, k, v, layout="bnhd", tags=tags, block_multiplier=mult, probes=probes)
    assert_close_rel(res.out, ref.out, OUT_TOL[dtype])
    for i, (got, want) in enumerate(zip(res.probes, ref.probes)):
        assert_close_rel(got, want, PROBE_TOL[dtype], what=f"probe {i}")


def test_rows_without_allowed_keys_give_zero_rows(no_probe_pass):
    # Query 0 shares no tag bit with any key: its softmax row is empty, its probe row is 0.
    g = torch.Generator().manual_seed(64)
    q, k, v = make_qkv(1, 2, 20, 24, 16, generator=g)
    q_tags = torch.ones(20, dtype=torch.int32)
    q_tags[0] = 2
    k_tags = torch.ones(24, dtype=torch.int32)
    probe = Probe(TG.each(0, 20), random_key_groups(24, (0, 24), 3, g), heads="keep")
    res = iidkern.attention(q, k, v, tags=(q_tags, k_tags), probes=[probe], backend="triton", kernel_options=OPTS)
    ref = attention_reference(q, k, v, tags=(q_tags, k_tags), probes=[probe])
    assert torch.equal(res.probes[0][:, :, 0], torch.zeros(1, 2, 3))
    assert_close_rel(res.probes[0], ref.probes[0], PROBE_TOL[torch.float32])


def test_only_the_first_eligible_probe_is_fused_and_the_rest_run_as_before(probe_pass_calls):
    # Two grouped-key probes and one with too many groups: the first is fused, the others
    # take the probe pass (which needs the LSE the main pass then stores).
    g = torch.Generator().manual_seed(65)
    q, k, v = make_qkv(1, 2, 40, 44, 16, generator=g)
    many = launch.MAX_FUSED_KEY_GROUPS + 1
    probes = [Probe(TG.each(0, 40), TG.each(0, 44), heads="mean"),
              Probe(TG.each(0, 40), random_key_groups(44, (0, 44), many, g), heads="keep"),
              Probe(TG.each(5, 40), random_key_groups(44, (3, 30), 2, g), heads="sum"),
              Probe(TG.each(0, 10), random_key_groups(44, (10, 20), 3, g), heads="mean")]
    assert launch._fused_probe_index(probes, {}) == 2
    res = iidkern.attention(q, k, v, probes=probes, backend="triton", kernel_options=OPTS)
    assert [id(p) for p in probe_pass_calls] == [id(probes[0]), id(probes[1]), id(probes[3])]
    ref = attention_reference(q, k, v, probes=probes)
    for i, (got, want) in enumerate(zip(res.probes, ref.probes)):
        assert_close_rel(got, want, PROBE_TOL[torch.float32], what=f"probe {i}")


def test_fusion_can_be_turned_off_with_the_same_result(probe_pass_calls):
    """``fuse_key_groups=False`` moves the probe to the probe pass (the option is obeyed, not
    just harmless), and both routes give the reference's map."""
    g = torch.Generator().manual_seed(66)
    q, k, v = make_qkv(2, 2, 33, 35, 16, generator=g)
    probe = Probe(TG.each(1, 33), random_key_groups(35, (2, 20), 3, g), heads="mean", normalize="keys")
    want = attention_reference(q, k, v, probes=[probe], compute_dtype=torch.float64).probes[0]
    fused = iidkern.attention(q, k, v, probes=[probe], backend="triton", kernel_options=OPTS).probes[0]
    assert probe_pass_calls == []  # it rode in the main pass
    second = iidkern.attention(q, k, v, probes=[probe], backend="triton",
                               kernel_options={**OPTS, "fuse_key_groups": False}).probes[0]
    assert probe_pass_calls == [probe]  # and now in the probe pass
    assert_close_rel(fused, want, PROBE_TOL[torch.float32])
    assert_close_rel(second, want, PROBE_TOL[torch.float32])
    assert_close_rel(fused, second, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim,split", [(32, 2), (40, 0), (24, 0)])
def test_key_group_fp16_split_only_at_power_of_two_head_dims(no_probe_pass, dtype, head_dim, split):
    """Where K and V are loaded with a channel mask (a head dim that is not a power of two),
    Triton 3.6 miscompiled the key groups' fp16 split on an H200 (sums 50-110% off, an
    out-of-bounds shared read): those calls take the fp32 product (mode 0). The launch's
    constexpr shows the route; the sums still match float64."""
    g = torch.Generator().manual_seed(74)
    q, k, v = make_qkv(2, 2, 37, 45, head_dim, dtype=dtype, layout="bnhd", generator=g)
    probe = Probe(TG.each(0, 37), random_key_groups(45, (3, 41), 4, g), heads="keep")
    with fast_launch.recording() as launches:
        res = iidkern.attention(q, k, v, layout="bnhd", probes=[probe], backend="triton", kernel_options=OPTS)
    assert launches[0][3]["KG_HALF_DOT"] == split
    ref = attention_reference(q, k, v, layout="bnhd", probes=[probe], compute_dtype=torch.float64)
    assert_close_rel(res.probes[0], ref.probes[0], PROBE_TOL[dtype])


@pytest.mark.parametrize("option,flag", [("kg_split", "KG_SPLIT"), ("mult_split", "MULT_SPLIT")])
def test_split_options_reach_the_launch(option, flag):
    """``kg_split`` / ``mult_split`` give the same results either way, so only the launch can
    show that they are obeyed: its constexpr follows the option."""
    g = torch.Generator().manual_seed(68)
    q, k, v = make_qkv(1, 2, 40, 50, 16, generator=g)
    probe = Probe(TG.each(0, 40), random_key_groups(50, (5, 30), 3, g), heads="keep")
    mult = BlockMultiplier(torch.rand(1, 20, 10, generator=g) * 2, query_start=3, key_start=7)
    for value in (True, False):
        with fast_launch.recording() as launches:
            iidkern.attention(q, k, v, probes=[probe], block_multiplier=mult, backend="triton",
                              kernel_options={**OPTS, option: value})
        assert launches[0][3][flag] is value


@pytest.mark.parametrize("options", [{"kg_half_dot": False, "kg_split": True}, {"kg_half_dot": False, "kg_split": False},
                                     {"kg_half_dot": True, "kg_split": True}, {"kg_half_dot": True, "kg_split": False}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_probe_kernel_variants(no_probe_pass, options, dtype):
    # fp16 or fp32/tf32 products for the group sums, and the key-range split or a per-tile
    # test, compute the same map (the defaults depend on the head dim: pin each one here).
    # (fp32 inputs always take fp32 products: kg_half_dot applies to 16-bit inputs.)
    g = torch.Generator().manual_seed(67)
    q, k, v = make_qkv(2, 2, 41, 57, 32, dtype=dtype, generator=g)
    probe = Probe(TG.each(0, 41), random_key_groups(57, (9, 40), 3, g), heads="keep", normalize="keys")
    res = iidkern.attention(q, k, v, probes=[probe], backend="triton", kernel_options={**OPTS, **options})
    ref = attention_reference(q, k, v, probes=[probe], compute_dtype=torch.float64)
    assert_close_rel(res.out, ref.out, OUT_TOL[dtype])
    assert_close_rel(res.probes[0], ref.probes[0], PROBE_TOL[dtype])
    # Per element, the sums keep fp32-level precision (the interpreter measures ~5e-7): the
    # fp16 split's low half matters, one fp16 product alone would be ~5e-4 off.
    got, want = res.probes[0].double(), ref.probes[0].double()
    assert ((got - want).abs() <= 2e-5 * want.abs() + 1e-12).all()


@pytest.mark.parametrize("batched", [False, True])
def test_group_ids_read_through_a_strided_view(batched):
    """Group ids that are a strided int32 view (every other token of a wider tensor) are read
    as the view shows them, in the main pass and in the probe pass."""
    g = torch.Generator().manual_seed(71)
    b, h, n, d = 2, 2, 40, 16
    q, k, v = make_qkv(b, h, n, n, d, generator=g)
    wide = torch.randint(-1, 3, (b, 2 * n) if batched else (2 * n,), generator=g, dtype=torch.int32)
    ids = wide[..., ::2]
    assert ids.stride(-1) == 2
    fused = Probe(TG.each(0, n), TG.ids(ids, 3), heads="mean")
    pass_probe = Probe(TG.ids(ids, 3), TG.each(0, n), heads="keep")
    res = iidkern.attention(q, k, v, probes=[fused, pass_probe], backend="triton", kernel_options=OPTS)
    ref = attention_reference(q, k, v, probes=[fused, pass_probe])
    for got, want in zip(res.probes, ref.probes):
        assert_close_rel(got, want, PROBE_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gap", [9.0, 14.0, 17.0])
@pytest.mark.parametrize("with_multiplier", [False, True])
def test_fused_key_group_sums_of_tiny_probabilities_keep_their_relative_precision(no_probe_pass, dtype, gap,
                                                                                  with_multiplier):
    """IID's image-to-instruction sums are often ~1e-4..1e-7 of a row's mass. The fused probe
    folds p into the groups with fp16 products: unscaled, p below fp16's smallest normal
    (6.1e-5) is subnormal and the sums came out several % off; scaled by 2^14 they keep the
    ~1e-5 relative precision of larger ones (checked per element against float64). A block
    multiplier (M = 1 on a corner of the scores here, a no-op) on fp16 inputs rules the
    scaling out: those calls take the fp32 product (tf32 on a GPU: ~5e-4 a term), whose
    range is fp32's; they kept the unscaled split before, 2-5% off at p ~1e-6."""
    g = torch.Generator().manual_seed(67)
    b, h, n, d = 1, 2, 70, 16
    q, k, v = tiny_group_probabilities(b, h, n, d, (40, 58), gap, dtype, "bhnd", g)
    probe = Probe(TG.each(0, n), TG.segments([(40, 46), (46, 52), (52, 58)], n), heads="keep")
    mult = BlockMultiplier(torch.ones(b, 3, 4), query_start=2, key_start=60) if with_multiplier else None
    res = iidkern.attention(q, k, v, scale=1.0, probes=[probe], block_multiplier=mult, backend="triton",
                            kernel_options=OPTS)
    ref = attention_reference(q, k, v, scale=1.0, probes=[probe], compute_dtype=torch.float64).probes[0]
    got = res.probes[0].double()
    assert 1e-9 < ref.min() and ref.max() < 1e-2  # the regime under test
    rel = ((got - ref).abs() / ref).max().item()
    assert rel < 2e-4, f"largest per-element relative error {rel:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [5.0, 60.0])
def test_fused_key_groups_beside_a_large_multiplier_stay_finite(no_probe_pass, dtype, m):
    """With key groups p carries 2^14 (the precision fix above); a block multiplier M then
    makes 2^14 * M, which past ~4 would overflow fp16's P @ V operand: fp16 calls with a
    multiplier keep p unscaled and sum the groups with the fp32 product (KG_HALF_DOT mode 0),
    bf16 ones keep the scaling."""
    g = torch.Generator().manual_seed(73)
    b, h, n = 1, 2, 48
    q, k, v = make_qkv(b, h, n, n, 16, dtype=dtype, generator=g)
    probe = Probe(TG.each(0, n), TG.segments([(0, 10), (10, 30)], n), heads="keep")
    mult = BlockMultiplier(torch.full((b, 20, 30), m), query_start=10, key_start=5)
    res = iidkern.attention(q, k, v, probes=[probe], block_multiplier=mult, backend="triton", kernel_options=OPTS)
    ref = attention_reference(q, k, v, probes=[probe], block_multiplier=mult, compute_dtype=torch.float64)
    assert torch.isfinite(res.out).all()
    assert_close_rel(res.out, ref.out, OUT_TOL[dtype])
    assert_close_rel(res.probes[0], ref.probes[0], PROBE_TOL[dtype])
    assert launch._kg_half_dot_mode({}, dtype, object(), mult) == (0 if dtype == torch.float16 else 2)
    assert launch._kg_half_dot_mode({}, dtype, object(), None) == 2
    assert launch._kg_half_dot_mode({}, dtype, None, mult) == 0
    assert launch._kg_half_dot_mode({"kg_half_dot": False}, dtype, object(), None) == 0
    assert launch._kg_half_dot_mode({}, torch.float32, object(), None) == 0
    assert scales_p_for_key_groups(True, dtype == torch.float16) == (dtype != torch.float16)
    assert scales_p_for_key_groups(False, True) and scales_p_for_key_groups(False, False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unpipelined_main_pass_takes_the_fp32_key_group_product(dtype, monkeypatch):
    """With ``num_stages=1`` on a GPU the fused key groups take the fp32 product (mode 0):
    triton 3.6 miscompiled the fp16 split there (NOTES.md 80). The interpreter, which always
    runs one stage, keeps the split, so CPU tests still cover it."""
    assert launch._kg_half_dot_mode({"num_stages": 1}, dtype, object(), None) == 2
    monkeypatch.setattr(launch, "_INTERPRET", False)
    assert launch._kg_half_dot_mode({"num_stages": 1}, dtype, object(), None) == 0
    assert launch._kg_half_dot_mode({"num_stages": 2}, dtype, object(), None) == 2
    assert launch._kg_half_dot_mode({}, dtype, object(), None) == 2


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("value_probe", [False, True])
def test_fused_key_groups_with_one_stage_on_gpu(head_dim, value_probe):
    """The calls that came out wrong (group sums ~3x off at head dim 128) or read shared
    memory out of bounds (head dim 64) with ``num_stages=1`` and the fp16 split (H200)."""
    g = torch.Generator().manual_seed(81 + head_dim + value_probe)
    b, h, nq, nk = 2, 2, 300, 200
    q, k, v = (t.cuda() for t in make_qkv(b, h, nq, nk, head_dim, dtype=torch.bfloat16, generator=g))
    ids = torch.randint(-1, 3, (nk,), generator=g, dtype=torch.int32)
    probes = [Probe(TG.each(0, nq), TG.ids(ids.cuda()), heads="mean")]
    if value_probe:
        probes.append(ValueProbe(torch.randn(nk, 2, generator=g).cuda(), TG.each(0, 5)))
    options = {**OPTS, "num_stages": 1, "hopper": False}
    res = iidkern.attention(q, k, v, probes=probes, backend="triton", kernel_options=options)
    ref = attention_reference(q, k, v, probes=probes, compute_dtype=torch.float64)
    assert_close_rel(res.out.float(), ref.out.float(), OUT_TOL[torch.bfloat16])
    # tf32 products (mode 0): ~5e-4 a term, as the GPU fuzz allows (helpers.GPU_PROBE_TOL)
    for got, want in zip(res.probes, ref.probes):
        assert_close_rel(got, want, 2e-3)
