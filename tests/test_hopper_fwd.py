"""The Hopper (sm_90) Gluon kernel of kernels/hopper_fwd.py and the routing to it.

Gluon does not run under Triton's interpreter, so on CPU this file compiles the kernel for
sm_90 (it must build on every Triton the package supports) and tests which calls are routed
to it; its results are tested on an H100 against the float64 reference (``cuda`` tests).
"""
import importlib
import math

import pytest
import torch

import iidkern
from iidkern import BlockMultiplier, Probe, TokenGroups as TG, ValueProbe
from iidkern.kernels import fast_launch, hopper_fwd, launch, replay
from iidkern.kernels.kernel_args import MultiplierArgs
from iidkern.reference import attention_reference
from helpers import OUT_TOL, PROBE_TOL, assert_close_rel, assert_lse_equal, make_qkv, random_key_groups, random_tags, \
    rel_err, tiny_group_probabilities

needs_gluon = pytest.mark.skipif(not hopper_fwd.AVAILABLE, reason="this Triton has no Gluon warp_specialize")


def _on_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and hopper_fwd.AVAILABLE


needs_hopper = pytest.mark.skipif(not _on_hopper(), reason="needs an sm_90 GPU (H100) and Triton's Gluon")


# --------------------------------------------------------------------------- compiles (CPU)
@pytest.fixture(scope="module")
def compiled_variants(compile_script):
    """Every kernel variant compiled for sm_90 in a non-interpreting child process."""
    return compile_script("hopper_compile.py")


@needs_gluon
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("extras", [False, True])
def test_kernel_compiles_for_sm90_with_the_fa3_schedule(compiled_variants, dtype, extras):
    info = compiled_variants[f"{dtype}-{extras}-{extras}"]  # extras: head weights and LSE
    # What the kernel exists for: S_j's wgmma waited on while PV_{j-1} stays in flight ...
    assert info["wgmma_wait_1"] > 0
    # ... warp specialization with register reallocation, and 4-D TMA loads.
    assert info["setmaxnreg"] > 0
    assert info["tma_4d"] > 0
    assert info["shared"] <= 227 * 1024
    assert (info["global_loads"] > 0) == extras  # the head weights are the only global loads
    assert info["mma_sync"] == 0
    assert info["spills"] < 64  # ptxas spills a few values outside the loop on some Tritons (-1: no cuobjdump)


@needs_gluon
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("g_pad", [8, 32])
def test_key_group_probe_compiles_into_the_same_schedule(compiled_variants, dtype, g_pad):
    """The fused key-group sums: mma.sync products beside the wgmma schedule, and little
    shared memory beyond the plain kernel's (the K/V ring leaves 2.7 KB: the ids pass through
    512 bytes of it on their way into the one-hot operand). Spills are not asserted: ptxas
    spills 8 (8 groups) to 158 (32 groups) instructions' worth on triton 3.6 (the H100's,
    timed) and 174-427 on 3.9."""
    info, plain = compiled_variants[f"{dtype}-kg{g_pad}"], compiled_variants[f"{dtype}-True-True"]
    assert info["wgmma_wait_1"] > 0 and info["setmaxnreg"] > 0 and info["tma_4d"] > 0
    # per update and warp: 8 k-steps of 16 keys x g_pad / 8 column blocks
    assert info["mma_sync"] > 0 and info["mma_sync"] % (8 * g_pad // 8) == 0
    assert info["shared"] <= min(plain["shared"] + 1024, 227 * 1024)


@needs_gluon
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_block_multiplier_compiles_into_the_same_schedule(compiled_variants, dtype):
    """HeadRouter's block multiplier: M read straight into the score layout, vectorized (two
    adjacent columns a thread) when the launch finds its pointer and strides 16-aligned, as
    Flux's 512 text tokens make them; no shared memory of its own (the ring leaves none).
    Spills are not asserted: 4 instructions on triton 3.6, 25 on 3.9 (with key groups too,
    129 / 353)."""
    info, plain = compiled_variants[f"{dtype}-mult"], compiled_variants[f"{dtype}-False-False"]
    both = compiled_variants[f"{dtype}-mult-kg8"]
    for variant in (info, both):
        assert variant["wgmma_wait_1"] > 0 and variant["setmaxnreg"] > 0 and variant["tma_4d"] > 0
    assert info["global_loads"] > 0 and info["global_loads_vector"] == info["global_loads"]
    assert info["shared"] <= plain["shared"] + 64 and info["mma_sync"] == 0
    assert both["mma_sync"] > 0 and both["global_loads"] > info["global_loads"]


@needs_gluon
@pytest.mark.parametrize("variant", ["bf16-split", "fp16-split", "bf16-split-hw-lse", "bf16-split-kg8",
                                     "bf16-d64-split"])
def test_tail_split_variants_compile_into_the_same_schedule(compiled_variants, variant):
    """The last wave's key split (pieces of a key range writing fp32 partial outputs) keeps
    the FA3 schedule and the plain kernel's shared memory; head weights are left to the join
    pass, so only the whole tiles' epilogue reads them."""
    info, plain = compiled_variants[variant], compiled_variants["bf16-d64" if "d64" in variant else f"{variant[:4]}-False-False"]
    assert info["wgmma_wait_1"] > 0 and info["setmaxnreg"] > 0 and info["tma_4d"] > 0
    assert info["shared"] <= plain["shared"] + (1024 if "kg" in variant else 64)
    assert (info["mma_sync"] > 0) == ("kg" in variant)
    assert (info["global_loads"] > 0) == ("hw" in variant or "kg" in variant or "d64" in variant)


@needs_gluon
@pytest.mark.parametrize("variant", ["bf16-d64-split-mult", "bf16-split-mult16"])
def test_block_multiplier_pieces_compile_without_spills(compiled_variants, variant):
    """hopper_attention splits a multiplier call's last wave at head dim 64, and at 128 with
    16-bit values: there its split variant spills no more than the plain split at 128, which
    every plain Flux call runs (triton 3.6, the H100's: 0, 0 and 2; at 128 with fp32 values the
    multiplier's pieces spill 38, NOTES.md 50, 69, 71). Spill counts move between Tritons (3.9:
    45 and 151 for the first and the plain split), so the test compares the two."""
    info = compiled_variants[variant]
    assert info["wgmma_wait_1"] > 0 and info["setmaxnreg"] > 0
    assert info["global_loads"] > 0  # M's tiles, read straight into the score layout
    if variant == "bf16-d64-split-mult":  # fp32 values: two a thread, one 8-byte vector load
        assert info["global_loads_vector"] > 0
    assert info["spills"] <= compiled_variants["bf16-split"]["spills"]
    if variant == "bf16-split-mult16":  # why fp32 values keep whole tiles at 128 (3.6: 38 against 0)
        assert compiled_variants["bf16-split-mult32"]["spills"] > info["spills"]


@needs_gluon
@pytest.mark.parametrize("variant", ["bf16-zero", "bf16-split-zero"])
def test_zeroed_pair_counters_compile_outside_the_schedule(compiled_variants, variant):
    """The counters of the pair statistics' tickets are zeroed by the first program, outside
    the FA3 schedule: same shared memory, no extra loads, a few more global stores."""
    info = compiled_variants[variant]
    plain = compiled_variants["bf16-split" if "split" in variant else "bf16-False-False"]
    assert info["wgmma_wait_1"] == plain["wgmma_wait_1"] and info["setmaxnreg"] == plain["setmaxnreg"]
    assert info["shared"] == plain["shared"] and info["global_loads"] == plain["global_loads"]
    assert info["global_stores"] > plain["global_stores"]
    # Equal on triton 3.6 (the device's); newer Tritons' register allocation may move one.
    assert info["spills"] <= plain["spills"] + 2


# --------------------------------------------------------------------------- TMA eligibility (CPU)
def test_tma_ready_wants_aligned_base_and_strides():
    buf = torch.empty(4 * 16 * 128 + 8, dtype=torch.bfloat16)
    assert hopper_fwd._tma_ready(buf[:4 * 16 * 128].view(4, 16, 128))
    assert not hopper_fwd._tma_ready(buf[1:1 + 4 * 16 * 128].view(4, 16, 128))  # base off by 2 bytes
    odd_rows = torch.empty(16, 136, dtype=torch.float16)[:, :127]  # 272-byte rows: a 16-byte multiple
    assert hopper_fwd._tma_ready(odd_rows)
    assert not hopper_fwd._tma_ready(torch.empty(16, 129, dtype=torch.float16)[:, :128])  # 258-byte rows
    # A dim of size 1 is never stepped, so its stride does not matter.
    assert hopper_fwd._tma_ready(torch.empty(1, 16, 128, dtype=torch.float16).as_strided((1, 16, 128), (3, 128, 1)))
    assert not hopper_fwd.usable(*(torch.randn(1, 2, 64, 128, dtype=torch.bfloat16) for _ in range(3)), "bhnd")


def test_device_index_of_a_bare_cuda_device_is_the_current_one(monkeypatch):
    assert hopper_fwd.device_index(torch.device("cuda", 3)) == 3
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)  # (no GPU needed to check the rule)
    assert hopper_fwd.device_index(torch.device("cuda")) == 5


def test_only_tritons_with_the_gluon_api_it_was_written_for_enable_it():
    assert hopper_fwd.triton_supports_gluon_kernel("3.6.0")
    assert hopper_fwd.triton_supports_gluon_kernel("3.10.0+git1234")
    assert not hopper_fwd.triton_supports_gluon_kernel("3.5.1")
    assert not hopper_fwd.triton_supports_gluon_kernel("2.3.0")
    assert not hopper_fwd.triton_supports_gluon_kernel("unknown")


@needs_gluon
@pytest.mark.parametrize("variant", ["bf16-tags", "fp16-tags", "bf16-tags64", "bf16-tags-all", "bf16-d64",
                                     "bf16-d64-all"])
def test_tag_and_head_dim_64_variants_compile(compiled_variants, variant):
    """Tags (int32 / int64, alone and beside every extra) and head dim 64 build for sm_90
    with the FA3 schedule and within shared memory; tags read their visit list and tag rows."""
    info = compiled_variants[variant]
    assert info["wgmma_wait_1"] > 0 and info["setmaxnreg"] > 0 and info["tma_4d"] > 0
    assert info["shared"] <= 227 * 1024
    assert ("tags" in variant or "all" in variant) == (info["global_loads"] > 0)


# --------------------------------------------------------------------------- routing (CPU)
@pytest.fixture
def hopper_pretend(monkeypatch):
    """Routing as on an H100: the kernel usable, the interpreter off."""
    monkeypatch.setattr(launch, "_INTERPRET", False)
    monkeypatch.setattr(hopper_fwd, "usable", lambda q, k, v, layout, in_kernel_extras=False: True)


def _serves(q, **kw):
    args = dict(tags=None, probes=(), count_tiles=False, kernel_options=None)
    args.update(kw)
    return launch._hopper_serves(q, q, q, "bhnd", **args)


def _value_probe():
    return ValueProbe(torch.randn(1, 64, 2), TG.each(0, 64))


def _map_probe():
    return Probe(TG.each(0, 64), TG.each(0, 10), heads="mean")


def test_plain_calls_and_probes_are_routed_to_the_hopper_kernel(hopper_pretend):
    q = torch.randn(1, 2, 64, 128)
    assert _serves(q)
    assert _serves(q, kernel_options={"poison": True, "PROBE_BLOCK_M": 32})
    # Probes: a key-group one rides in the Hopper main pass, the others in the probe pass after it.
    assert _serves(q, probes=(_map_probe(), Probe(TG.each(0, 64), TG.ids(torch.tensor([0, 1, -1]), 2))))


def test_block_multiplier_calls_are_routed_to_the_hopper_kernel(hopper_pretend, monkeypatch):
    seen = {}
    monkeypatch.setattr(hopper_fwd, "hopper_attention", lambda *args, **kwargs: seen.update(kwargs))
    q = torch.randn(1, 2, 64, 128)
    mult = BlockMultiplier(torch.rand(1, 8, 4), query_start=3, key_start=5)
    iidkern.attention(q, q, q, block_multiplier=mult, backend="triton")
    # values, (batch, head, query, key) strides (heads share the block), [q0, q1) x [k0, k1)
    assert seen["multiplier"].values is mult.values
    assert tuple(seen["multiplier"][1:]) == (32, 0, 4, 1, 3, 11, 5, 9)


def test_short_plain_calls_stay_on_the_triton_kernel_with_small_tiles(hopper_pretend, monkeypatch):
    """Without extras and on fewer than HOPPER_MIN_KEYS keys, a call the Hopper kernel could
    serve runs the Triton kernel with SHORT_KEYS_CONFIG; from that many keys, with an extra,
    or with ``hopper=True`` it goes to the Hopper kernel."""
    monkeypatch.setattr(importlib.import_module("iidkern.attention"), "_REPLAY", False)
    hopper = []

    def fake_hopper(q, k, v, out, **kwargs):  # zeros, so the passes after it read numbers
        hopper.append(kwargs["layout"])
        out.zero_()
        if kwargs.get("lse") is not None:
            kwargs["lse"].zero_()
    monkeypatch.setattr(hopper_fwd, "hopper_attention", fake_hopper)
    g = torch.Generator().manual_seed(7)
    short = launch.HOPPER_MIN_KEYS - 1
    q, k, v = (torch.randn(1, 2, n, 128, generator=g) for n in (70, short, short))
    with fast_launch.recording() as launches:
        out = iidkern.attention(q, k, v, backend="triton")
    assert hopper == [] and [rec[0] for rec in launches] == [launch._ATTN]
    assert {key: launches[0][3][key] for key in launch.SHORT_KEYS_CONFIG} == launch.SHORT_KEYS_CONFIG
    assert_close_rel(out, attention_reference(q, k, v, compute_dtype=torch.float64).out, 1e-4)
    iidkern.attention(q, k, v, backend="triton", kernel_options={"hopper": True})
    iidkern.attention(q, k, v, backend="triton", head_weights=torch.rand(1, 2))
    iidkern.attention(q, k, v, backend="triton", return_lse=True)
    iidkern.attention(q, k, v, backend="triton", tags=(random_tags(1, 70, generator=g), random_tags(1, short, generator=g)))
    iidkern.attention(q, k, v, backend="triton", probes=[_map_probe()])
    q2, k2 = torch.cat([q, q]), torch.cat([k, k])
    iidkern.attention(q2, k2, k2, backend="triton", pair_stats=[(0, 1)])
    long_k = torch.randn(1, 2, launch.HOPPER_MIN_KEYS, 128, generator=g)
    iidkern.attention(q, long_k, long_k, backend="triton")
    assert hopper == ["bhnd"] * 7


# (batch, heads, tokens) -> the config that was fastest on the H100 (132 SMs), paired graph
# ratios against cuDNN (NOTES.md 59): "one" ONE_WAVE_CONFIG, "short" SHORT_KEYS_CONFIG, None the Hopper kernel.
MEASURED_SHORT_ROUTES = {
    (1, 24, 768): "one", (1, 24, 896): "one", (1, 24, 1024): "one", (2, 12, 768): "one", (1, 32, 768): "one",
    (3, 8, 1024): "one", (1, 24, 960): "one", (1, 20, 1024): "one", (1, 48, 512): "one", (1, 24, 832): "one",
    (1, 24, 512): "short", (1, 24, 300): "short", (2, 24, 768): "short", (1, 8, 768): "short",
    (1, 16, 1024): "short", (1, 24, 640): "short", (2, 16, 512): "short",
    (1, 24, 1152): None, (1, 24, 1536): None, (2, 24, 1024): None,
}


@pytest.mark.parametrize("shape, route", MEASURED_SHORT_ROUTES.items(), ids=str)
def test_short_plain_config_is_what_measured_fastest(monkeypatch, shape, route):
    """One wave at three programs an SM where two would need two waves; else the 64 x 64 tiles
    on short keys, the Hopper kernel from SHORT_MAX_KEYS keys or where the tiles need more waves."""
    monkeypatch.setattr(launch, "_device_sms", lambda device: 132)
    b, h, n = shape
    expected = {"one": launch.ONE_WAVE_CONFIG, "short": launch.SHORT_KEYS_CONFIG, None: None}[route]
    assert launch.short_plain_config(b * h, n, n, torch.device("cuda")) == expected


def test_short_plain_config_without_an_sm_count_keeps_the_key_rule():
    """Off CUDA there is no wave to fill: fewer than HOPPER_MIN_KEYS keys take the small tiles."""
    cpu = torch.device("cpu")
    assert launch._device_sms(cpu) == 0
    assert launch.short_plain_config(24, 768, 768, cpu) == launch.SHORT_KEYS_CONFIG
    assert launch.short_plain_config(24, 1024, launch.HOPPER_MIN_KEYS, cpu) is None


def test_one_wave_calls_run_the_triton_kernel_with_its_tiles(hopper_pretend, monkeypatch):
    """A plain call whose grid fills one wave at three programs an SM runs ONE_WAVE_CONFIG
    (interpreted here: the tiles and the key loop of 32-key tiles against the reference)."""
    monkeypatch.setattr(importlib.import_module("iidkern.attention"), "_REPLAY", False)
    monkeypatch.setattr(hopper_fwd, "hopper_attention", lambda *a, **kw: pytest.fail("ran the Hopper kernel"))
    monkeypatch.setattr(launch, "_device_sms", lambda device: 2)  # 2 heads x 3 query tiles: 4 < 6 <= 6
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, n, 128, generator=g) for n in (150, 77, 77))
    with fast_launch.recording() as launches:
        out = iidkern.attention(q, k, v, backend="triton")
    assert {key: launches[0][3][key] for key in launch.ONE_WAVE_CONFIG} == launch.ONE_WAVE_CONFIG
    assert_close_rel(out, attention_reference(q, k, v, compute_dtype=torch.float64).out, 1e-4)


def test_head_dims_served():
    """D=128 always; D=64 only from LONG_MIN_KEYS keys (shorter ones are faster on the Triton
    kernel), or from LONG_EXTRAS_MIN_KEYS with a multiplier or fused key-group probe."""
    assert hopper_fwd.serves_head_dim(128, 1) and hopper_fwd.serves_head_dim(128, 100_000)
    assert not hopper_fwd.serves_head_dim(64, 4429)
    assert not hopper_fwd.serves_head_dim(64, hopper_fwd.LONG_MIN_KEYS - 1)
    assert hopper_fwd.serves_head_dim(64, hopper_fwd.LONG_MIN_KEYS)
    assert hopper_fwd.serves_head_dim(64, 4429, in_kernel_extras=True)
    assert hopper_fwd.serves_head_dim(64, hopper_fwd.LONG_EXTRAS_MIN_KEYS, in_kernel_extras=True)
    assert not hopper_fwd.serves_head_dim(64, hopper_fwd.LONG_EXTRAS_MIN_KEYS - 1, in_kernel_extras=True)
    assert not any(hopper_fwd.serves_head_dim(d, 100_000) for d in (32, 80, 96, 256))
    assert not any(hopper_fwd.serves_head_dim(d, 100_000, in_kernel_extras=True) for d in (32, 80, 96, 256))


@pytest.mark.parametrize("extras, expected", [
    ({}, False), ({"multiplier": True}, True), ({"key_groups": True}, True),
    ({"key_groups": True, "fuse_key_groups": False}, False), ({"map": True}, False),
    ({"multiplier": True, "tags": True}, False), ({"key_groups": True, "tags": True}, False)])
def test_head_dim_64_routing_follows_the_in_kernel_extras(monkeypatch, extras, expected):
    """At head dim 64 and 4429 keys (SD3 1024²) a block multiplier or a fused key-group probe
    takes the Hopper kernel; plain calls, probe-pass probes and tagged calls do not."""
    seen = []
    monkeypatch.setattr(launch, "_INTERPRET", False)
    monkeypatch.setattr(hopper_fwd, "usable", lambda q, k, v, layout, in_kernel_extras=False:
                        seen.append(in_kernel_extras) or hopper_fwd.serves_head_dim(64, 4429, in_kernel_extras))
    n = 4429
    q = torch.empty(1, 2, n, 64)
    groups = TG.segments([(4096, 4200), (4200, n)], n)
    probes = []
    if extras.get("key_groups"):
        probes.append(Probe(TG.each(0, 4096), groups, heads="keep", normalize="keys"))
    if extras.get("map"):
        probes.append(Probe(TG.each(4096, n), TG.each(0, 4096)))
    mult = BlockMultiplier(torch.ones(1, 4096, 333), 0, 4096) if extras.get("multiplier") else None
    tags = (torch.ones(1, n, dtype=torch.int32), torch.ones(1, n, dtype=torch.int32)) if extras.get("tags") else None
    options = {"fuse_key_groups": extras["fuse_key_groups"]} if "fuse_key_groups" in extras else None
    assert launch._hopper_serves(q, q, q, "bhnd", tags, probes, False, options, mult) is expected
    assert seen == [expected]


def test_tag_calls_are_routed_to_the_hopper_kernel(hopper_pretend):
    q = torch.randn(1, 2, 64, 128)
    tags = iidkern.tag_mask(torch.ones(64, dtype=torch.int32), torch.ones(64, dtype=torch.int32))
    assert _serves(q, tags=tags)
    assert _serves(q, tags=tags, probes=(_map_probe(),))
    assert not _serves(q, tags=tags, count_tiles=True)  # tile counts are the Triton kernel's


@pytest.mark.parametrize("extra", ["value_probe", "count_tiles", "hopper=False", "BLOCK_M", "num_warps",
                                   "maxnreg", "warp_specialize", "kg_split", "mult_split", "kg_half_dot"])
def test_tile_level_extras_and_triton_options_keep_the_triton_kernel(hopper_pretend, extra):
    q = torch.randn(1, 2, 64, 128)
    kw = {"value_probe": dict(probes=(_map_probe(), _value_probe())),
          "count_tiles": dict(count_tiles=True),
          "hopper=False": dict(kernel_options={"hopper": False})}.get(extra, dict(kernel_options={extra: 64}))
    assert not _serves(q, **kw)


@needs_gluon
@pytest.mark.parametrize("extras", [False, True])
def test_launch_arguments_line_up_with_the_kernel_parameters(monkeypatch, extras):
    """hopper_attention's launch, placeholders for absent extras included, fills exactly the
    kernel's run-time parameters, in order, and sets each constexpr (the launch itself, and
    the results, are tested on the GPU)."""
    seen = {}

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs)
    monkeypatch.setattr(hopper_fwd, "_ATTN_HOPPER", Recorder())
    b, h, n = 2, 3, 200
    q = torch.randn(b, h, n, 128, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    kw = {}
    if extras:
        values = torch.rand(b, 150, 40)
        q_tags = torch.randint(0, 4, (b, n), dtype=torch.int32)
        k_tags = torch.randint(0, 4, (n,))
        tags = iidkern.tag_mask(q_tags, k_tags)
        kw = dict(head_weights=torch.rand(h), head_weight_strides=(0, 1, 0), lse=torch.empty(b, h, n),
                  key_groups=launch._key_group_args(Probe(TG.each(40, n), TG.segments([(0, 9), (9, 40)], n)),
                                                    b, h, n, q.device, torch.empty),
                  multiplier=MultiplierArgs.of(BlockMultiplier(values, query_start=50, key_start=0)), tags=tags,
                  zero_counters=torch.empty(2, 3, dtype=torch.int32))
    hopper_fwd.hopper_attention(q, q, q, out, layout="bhnd", scale=0.1, **kw)
    params = hopper_fwd.attn_fwd_hopper.params
    runtime = [p.name for p in params if not p.is_constexpr]
    assert len(seen["args"]) == len(runtime)
    assert set(seen["kwargs"]) == {p.name for p in params if p.is_constexpr} | {"num_warps"}
    arg = dict(zip(runtime, seen["args"]))
    assert (arg["n_heads"], arg["n_q"], arg["n_k"]) == (h, n, n)
    assert [seen["kwargs"][f] for f in ("HAS_HW", "STORE_LSE", "HAS_KG", "HAS_MULT", "HAS_TAGS", "ZERO")] == [extras] * 6
    assert arg["n_zero"] == (6 if extras else 0)
    if extras:
        assert arg["zero_ptr"] is kw["zero_counters"]
    if extras:
        # Tags as [B, N] rows (the shared [N] key tags with a zero batch stride) and the
        # visit lists of the kernel's tile shape: a query tile is both warpgroups' rows.
        lists = tags.visit_lists(2 * hopper_fwd.BLOCK_M, hopper_fwd.BLOCK_N, b)
        assert arg["qt_ptr"] is tags.q_tags and arg["qt_sb"] == n and arg["kt_sb"] == 0  # (the mask's copies)
        assert arg["kt_ptr"].data_ptr() == tags.k_tags.data_ptr() and torch.equal(tags.q_tags, q_tags)
        assert arg["vis_ptr"] is lists.index and arg["vis_full_ptr"] is lists.full_count
        assert arg["vis_count_ptr"] is lists.visit_count
        assert lists.index.shape == (b, -(-n // (2 * hopper_fwd.BLOCK_M)), -(-n // hopper_fwd.BLOCK_N))
        assert arg["m_ptr"] is values and (arg["m_q0"], arg["m_q1"], arg["m_k0"], arg["m_k1"]) == (50, 200, 0, 40)
        assert (arg["kg_q0"], arg["kg_q1"], arg["kg_k0"], arg["kg_k1"], arg["n_groups"]) == (40, n, 0, 40, 2)
    else:  # empty ranges: the kernel's span tests reject every tile
        assert arg["m_q1"] == arg["m_q0"] == 0 and arg["kg_q1"] == arg["kg_q0"] == 0


@pytest.mark.parametrize("hw_shape, strides", [("h", (0, 1, 0)), ("bh", (3, 1, 0)), ("bhn", (3 * 40, 40, 1))])
def test_routed_calls_get_head_weights_with_broadcast_strides(monkeypatch, hw_shape, strides):
    """The Hopper kernel reads head weights through the (batch, head, query) strides the
    Triton kernel uses; this checks the hand-over (the kernel itself runs on the GPU tests)."""
    monkeypatch.setattr(launch, "_hopper_serves", lambda *args: True)
    seen = {}
    monkeypatch.setattr(hopper_fwd, "hopper_attention", lambda *args, **kwargs: seen.update(kwargs))
    b, h, n = 2, 3, 40
    q = torch.randn(b, h, n, 128)
    hw = {"h": torch.rand(h), "bh": torch.rand(b, h), "bhn": torch.rand(b, h, n)}[hw_shape]
    iidkern.attention(q, q, q, head_weights=hw, backend="triton")
    assert seen["head_weights"] is hw and seen["head_weight_strides"] == strides
    iidkern.attention(q, q, q, backend="triton", kernel_options={"hopper": True})  # short keys: asked for
    assert seen["head_weights"] is None and seen["head_weight_strides"] == (0, 0, 0)


def _hopper_contract(q, k, v, out, *, layout, scale, head_weights, head_weight_strides, lse, key_groups,
                     multiplier, tags=None, split="auto", zero_counters=None):
    """What hopper_attention promises, in float64 torch: out, LSE, the key-group sums and
    the zeroed counters."""
    if zero_counters is not None:
        zero_counters.zero_()
    qh, kh, vh = (t if layout == "bhnd" else t.transpose(1, 2) for t in (q, k, v))
    scores = scale * qh.double() @ kh.double().transpose(-1, -2)
    if tags is not None:  # a query with no allowed key: zero probabilities, LSE -inf
        q_tags, k_tags = tags.batched(q.shape[0])
        scores = scores.masked_fill(((q_tags[:, :, None] & k_tags[:, None, :]) == 0)[:, None], -float("inf"))
    probs = scores.softmax(-1).nan_to_num(0.0)
    weighted = probs.clone()
    if multiplier is not None:  # read through the strides and ranges it was handed
        values, sb, sh, sq, sk, q0, q1, k0, k1 = multiplier
        b, h = probs.shape[:2]
        m = values.as_strided((b, h, q1 - q0, k1 - k0), (sb, sh, sq, sk)).double()
        weighted[:, :, q0:q1, k0:k1] *= m
    o = weighted @ vh.double()
    if head_weights is not None:
        b, h, n = o.shape[:3]
        o = o * head_weights.as_strided((b, h, n), head_weight_strides).double()[..., None]
    out.copy_(o if layout == "bhnd" else o.transpose(1, 2))
    if lse is not None:
        lse.copy_(scores.logsumexp(-1))
    if key_groups is not None:
        ids, ids_batch_stride, q0, q1, k0, k1, n_groups, sums, column_scale, column_scale_stride = key_groups
        b, n_k = probs.shape[0], probs.shape[-1]
        keys = torch.arange(n_k)
        dense = ids.flatten().as_strided((b, n_k), (ids_batch_stride, 1)).long()
        dense = torch.where((keys >= k0) & (keys < k1), dense, -1)
        one_hot = (dense[..., None] == torch.arange(n_groups)).double()  # [B, Nk, G]
        # each group column times its factor (1 / group size under normalize="keys"), read as handed
        factor = column_scale.flatten().as_strided((b, n_groups), (column_scale_stride, 1)).double()
        sums.copy_(probs[:, :, q0:q1] @ (one_hot * factor[:, None, :])[:, None])


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_pair_stats_tickets_come_zeroed_from_the_hopper_kernel(monkeypatch, layout):
    """On the Hopper path the pair pass's counters are not memset: the Hopper kernel zeroes
    them (here its float64 contract), and every program of each (pair, head) then takes one
    ticket from exactly that tensor; the last one's sums are exact."""
    monkeypatch.setattr(launch, "_hopper_serves", lambda *args: True)
    handed = []

    def contract(*args, zero_counters=None, **kwargs):
        handed.append(zero_counters)
        zero_counters.fill_(-7)  # what torch.empty may hold; the contract's zeroing must undo it
        _hopper_contract(*args, zero_counters=zero_counters, **kwargs)
    monkeypatch.setattr(hopper_fwd, "hopper_attention", contract)
    b, h, n = 3, 2, 40
    pairs = [(0, 1), (2, 0)]
    q, k, v = make_qkv(b, h, n, n, 128, torch.bfloat16, layout, generator=torch.Generator().manual_seed(8))
    res = iidkern.attention(q, k, v, layout=layout, pair_stats=pairs, backend="triton", kernel_options={"poison": True})
    (counters,) = handed
    assert counters.shape == (len(pairs), h) and counters.dtype == torch.int32
    n_progs = launch._pair_stats_programs(-(-n // 16), h, q.device)
    assert torch.equal(counters, torch.full_like(counters, n_progs))
    o = res.out.double() if layout == "bhnd" else res.out.double().transpose(1, 2)
    for p, (b0, b1) in enumerate(pairs):
        torch.testing.assert_close(res.pair_stats.dot[p].double(), (o[b0] * o[b1]).sum((1, 2)), rtol=1e-5, atol=0)
        torch.testing.assert_close(res.pair_stats.norm1_sq[p].double(), (o[b1] ** 2).sum((1, 2)), rtol=1e-5, atol=0)


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("batched_ids", [False, True])
def test_probes_around_the_hopper_kernel_use_its_lse_and_key_group_sums(monkeypatch, layout, batched_ids):
    """The host side of the Hopper path with probes: the key-group probe's sums are handed
    to the kernel and folded into the result, and probe-pass probes read the kernel's LSE.
    The kernel is replaced by its contract in float64 (the kernel runs in the GPU tests)."""
    monkeypatch.setattr(launch, "_hopper_serves", lambda *args: True)
    monkeypatch.setattr(hopper_fwd, "hopper_attention", _hopper_contract)
    g = torch.Generator().manual_seed(5)
    b, h, n_txt, n_img = 2, 3, 13, 40
    n = n_txt + n_img
    q, k, v = make_qkv(b, h, n, n, 128, layout=layout, generator=g)
    instructions = random_key_groups(n, (0, n_txt), 3, g, batched_ids, b)
    iid = Probe(TG.each(n_txt, n), instructions, heads="keep", normalize="keys")
    text_image = Probe(TG.each(n_txt, n), TG.each(0, n_txt), heads="mean")
    grouped_queries = Probe(TG.ids(torch.randint(-1, 4, (b, n), generator=g), 4), instructions, heads="sum")
    probes = [iid, text_image, grouped_queries]
    res = iidkern.attention(q, k, v, layout=layout, probes=probes, backend="triton", return_lse=True,
                            kernel_options={"poison": True})
    ref = attention_reference(q, k, v, layout=layout, probes=probes, compute_dtype=torch.float64)
    assert_lse_equal(res.lse, ref.lse)
    for got, want in zip(res.probes, ref.probes):
        assert got.shape == want.shape
        assert_close_rel(got, want, PROBE_TOL[torch.float32])


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_tags_are_handed_to_the_hopper_kernel(monkeypatch, layout):
    """Tags routed to the Hopper kernel arrive as the validated mask, and the probe-pass
    probes after it are masked too (they read its LSE). The kernel is replaced by its
    float64 contract; the GPU tests check the kernel itself."""
    monkeypatch.setattr(launch, "_hopper_serves", lambda *args: True)
    monkeypatch.setattr(hopper_fwd, "hopper_attention", _hopper_contract)
    g = torch.Generator().manual_seed(17)
    b, h, n = 2, 3, 45
    q, k, v = make_qkv(b, h, n, n, 128, layout=layout, generator=g)
    tags = (random_tags(b, n, generator=g), random_tags(1, n, generator=g, dtype=torch.int32)[0])
    probes = [Probe(TG.each(0, n), TG.each(5, 30), heads="mean"),
              Probe(TG.each(3, n), TG.segments([(0, 4), (10, 20)], n), heads="keep", normalize="keys")]
    res = iidkern.attention(q, k, v, layout=layout, tags=tags, probes=probes, return_lse=True, backend="triton",
                            kernel_options={"poison": True})
    ref = attention_reference(q, k, v, layout=layout, tags=tags, probes=probes, compute_dtype=torch.float64)
    assert torch.isinf(ref.lse).any()  # some queries have no allowed key
    assert_close_rel(res.out, ref.out, OUT_TOL[torch.float32])
    assert_lse_equal(res.lse, ref.lse)
    for got, want in zip(res.probes, ref.probes):
        assert_close_rel(got, want, PROBE_TOL[torch.float32], "probe")


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("per_head", [False, True])
def test_block_multiplier_is_handed_to_the_hopper_kernel(monkeypatch, layout, per_head):
    """A block multiplier routed to the Hopper kernel arrives with strides that read the
    user's values (a transposed view here, shared by heads or per head) and the sub-block's
    ranges. The kernel is replaced by its float64 contract, whose probes see the unweighted
    probabilities by construction; the GPU tests check the kernel itself."""
    monkeypatch.setattr(launch, "_hopper_serves", lambda *args: True)
    monkeypatch.setattr(hopper_fwd, "hopper_attention", _hopper_contract)
    g = torch.Generator().manual_seed(11)
    b, h, n, q0, k0, mq, mk = 2, 3, 37, 11, 4, 20, 9
    q, k, v = make_qkv(b, h, n, n, 128, layout=layout, generator=g)
    values = (0.5 + torch.rand((b, h, mk, mq) if per_head else (b, mk, mq), generator=g)).transpose(-1, -2)
    mult = BlockMultiplier(values, query_start=q0, key_start=k0)
    probes = [Probe(TG.each(0, n), TG.each(k0, k0 + mk), heads="mean"),
              Probe(TG.each(q0, q0 + mq), TG.segments([(0, 3), (k0, k0 + 5)], n), heads="keep")]
    res = iidkern.attention(q, k, v, layout=layout, block_multiplier=mult, probes=probes, backend="triton",
                            kernel_options={"poison": True})
    ref = attention_reference(q, k, v, layout=layout, block_multiplier=mult, probes=probes,
                              compute_dtype=torch.float64)
    assert_close_rel(res.out, ref.out, OUT_TOL[torch.float32])
    for got, want in zip(res.probes, ref.probes):
        assert_close_rel(got, want, PROBE_TOL[torch.float32], "probe")
    # The multiplier changed the output (else the test could not tell it was dropped).
    plain = attention_reference(q, k, v, layout=layout, compute_dtype=torch.float64)
    assert (ref.out - plain.out).abs().max() > 1e-3


def test_interpreter_never_routes_to_gluon():
    q = torch.randn(1, 2, 64, 128)
    assert launch._INTERPRET or not q.is_cuda
    assert not launch._hopper_serves(q, q, q, "bhnd", None, (), False, None)


# --------------------------------------------------------------------------- results (H100)
@pytest.fixture
def hopper_calls(monkeypatch):
    """The layouts of the calls that run the Hopper kernel: through hopper_attention, or as
    a replay of a plain call's recorded Hopper launch (kernels/replay.py). Plain calls on
    short key sequences go to it too (not to the Triton kernel, see launch.short_plain_config):
    these tests are about the Hopper kernel, on small shapes."""
    monkeypatch.setattr(launch, "short_plain_config", lambda *args: None)
    calls = []
    original = hopper_fwd.hopper_attention
    original_replay = replay.LaunchReplay.__call__

    def spy(*args, **kwargs):
        calls.append(kwargs.get("layout"))
        return original(*args, **kwargs)

    def replay_spy(self, *args):
        if self.launcher is hopper_fwd._ATTN_HOPPER:
            calls.append(self.layout)
        return original_replay(self, *args)
    monkeypatch.setattr(hopper_fwd, "hopper_attention", spy)
    monkeypatch.setattr(replay.LaunchReplay, "__call__", replay_spy)
    return calls


def _qkv(b, h, nq, nk, dtype, layout, seed):
    """Fresh random [D=128] q, k, v on the GPU (helpers.make_qkv, seeded)."""
    return make_qkv(b, h, nq, nk, 128, dtype, layout, device="cuda", generator=torch.Generator().manual_seed(seed))


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("b, h, nq, nk", [(1, 3, 128, 128), (2, 5, 1111, 777), (3, 2, 50, 1000),
                                          (1, 4, 4608, 4608), (2, 1, 300, 1), (1, 2, 1, 129)])
def test_matches_reference(hopper_calls, dtype, layout, b, h, nq, nk):
    q, k, v = _qkv(b, h, nq, nk, dtype, layout, seed=nq + nk)
    res = iidkern.attention(q, k, v, layout=layout, return_lse=True, scale=0.07,
                            kernel_options={"poison": True})
    assert hopper_calls == [layout]
    ref = attention_reference(q, k, v, layout=layout, scale=0.07, compute_dtype=torch.float64)
    assert res.out.shape == q.shape and res.out.dtype == dtype
    assert_close_rel(res.out, ref.out, OUT_TOL[dtype])
    assert_lse_equal(res.lse, ref.lse, tol=1e-3)


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("b, h, nq, nk, forced", [
    (1, 24, 1536, 1536, None),  # the planner's own split (Flux 512²: 288 tiles, 2.18 waves)
    (2, 5, 1300, 1300, (7, 3)),
    (1, 3, 1000, 1037, (100, 64)),  # every tile split, one piece per key tile (clamped to 9)
    (3, 2, 700, 2049, (2, 5)),  # the ragged last key tile ends the last piece
    (2, 3, 1400, 1250, (12, 10)),  # uneven pieces of 1 and 2 key tiles
])
def test_tail_split_matches_reference(hopper_calls, monkeypatch, dtype, layout, b, h, nq, nk, forced):
    """The last wave's key split (kernels/tail_split.py): pieces of the last tiles, joined by
    the combine pass, give the reference's output, head-weighted output and LSE; a plain
    call's repeat replays both launches with fresh scratch tensors."""
    opts = {"poison": True}
    if forced:
        opts.update(tail_split_tiles=forced[0], tail_split_pieces=forced[1])
    api = importlib.import_module("iidkern.attention")
    monkeypatch.setattr(api, "_REPLAYS", {})
    for seed in range(4):  # the checked path alone, then a first call that records, then replays (auto only)
        monkeypatch.setattr(api, "_REPLAY", seed > 0)  # (a recording inside the call would hide its launches)
        q, k, v = _qkv(b, h, nq, nk, dtype, layout, seed=seed + nq)
        with fast_launch.recording() as launches:
            out = iidkern.attention(q, k, v, layout=layout, kernel_options=opts)
        if seed == 0:  # the checked path: the split kernel, then the join (auto: if this GPU's plan splits)
            n_tiles, n_key_tiles = -(-nq // (2 * hopper_fwd.BLOCK_M)) * b * h, -(-nk // hopper_fwd.BLOCK_N)
            splits = forced is not None or hopper_fwd.split_plan_for(n_tiles, n_key_tiles, q.device).active
            want = [hopper_fwd._ATTN_HOPPER, hopper_fwd._COMBINE] if splits else [hopper_fwd._ATTN_HOPPER]
            assert [rec[0] for rec in launches] == want
            assert launches[0][3]["SPLIT"] is splits and len(launches.workspaces) == 2 * splits
        ref = attention_reference(q, k, v, layout=layout, compute_dtype=torch.float64)
        assert_close_rel(out, ref.out, OUT_TOL[dtype])
    assert bool(api._REPLAYS) == (forced is None)  # forced counts are not replayed options
    hw = torch.rand(b, h, nq, device="cuda")
    res = iidkern.attention(q, k, v, layout=layout, head_weights=hw, return_lse=True, kernel_options=opts)
    ref = attention_reference(q, k, v, layout=layout, head_weights=hw, compute_dtype=torch.float64)
    assert_close_rel(res.out, ref.out, OUT_TOL[dtype])
    assert_lse_equal(res.lse, ref.lse)
    with fast_launch.recording() as launches:
        off = iidkern.attention(q, k, v, layout=layout, return_lse=True, kernel_options=dict(opts, tail_split=False))
    assert [rec[0] for rec in launches] == [hopper_fwd._ATTN_HOPPER] and launches[0][3]["SPLIT"] is False
    assert_lse_equal(off.lse, ref.lse)


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("forced", [None, (5, 64)])
def test_tail_split_at_head_dim_64(hopper_calls, forced):
    """Long SD3-like calls (head dim 64, from 16384 keys: the Hopper kernel) split as at 128:
    24 query tiles of 129 key tiles leave most of the SMs idle."""
    q, k, v = make_qkv(1, 3, 1000, 16500, 64, torch.bfloat16, "bnhd", device="cuda",
                       generator=torch.Generator().manual_seed(7))
    hw = torch.rand(1, 3, device="cuda")
    opts = {"poison": True}
    if forced:
        opts.update(tail_split_tiles=forced[0], tail_split_pieces=forced[1])
    with fast_launch.recording() as launches:
        res = iidkern.attention(q, k, v, layout="bnhd", head_weights=hw, return_lse=True, kernel_options=opts)
    assert hopper_calls == ["bnhd"]
    splits = forced is not None or hopper_fwd.split_plan_for(8 * 3, -(-16500 // hopper_fwd.BLOCK_N), q.device).active
    assert launches[0][3]["SPLIT"] is splits and launches[0][3]["HEAD_DIM"] == 64
    ref = attention_reference(q, k, v, layout="bnhd", head_weights=hw, compute_dtype=torch.float64)
    assert_close_rel(res.out, ref.out, OUT_TOL[torch.bfloat16])
    assert_lse_equal(res.lse, ref.lse)


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("forced", [None, (7, 3), (14, 35)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim, half_values", [(64, False), (128, True), (128, False)])
def test_tail_split_with_a_block_multiplier(hopper_calls, forced, dtype, head_dim, half_values):
    """A block multiplier call splits its tail too at head dim 64, and at 128 with 16-bit
    values (the pieces weigh (P*M)V, the join is linear); at 128 fp32 values keep whole
    tiles, forced plans included (NOTES.md 50, 71). SD3-like lengths with text last, a
    sub-block crossing piece boundaries and the ragged last key tile, per-head values, head
    weights and LSE; the model's plan, a forced one, and every tile in one piece a key tile."""
    b, h, n = 2, 2, 4096 + 333  # 4 x 35 query tiles of 35 key tiles: the model splits the last 8
    q, k, v = make_qkv(b, h, n, n, head_dim, dtype, "bnhd", device="cuda",
                       generator=torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(9)
    # the split tiles are the grid's last: the last query rows of the last batch row and head
    values = (0.5 + torch.rand(b, h, 1529, 2929, generator=g)).to("cuda", dtype if half_values else torch.float32)
    mult = BlockMultiplier(values, query_start=2900, key_start=1500)
    hw = torch.rand(b, h, generator=g).cuda() + 0.5
    opts = {"poison": True}
    if forced:
        opts.update(tail_split_tiles=forced[0], tail_split_pieces=forced[1])
    with fast_launch.recording() as launches:
        res = iidkern.attention(q, k, v, layout="bnhd", block_multiplier=mult, head_weights=hw, return_lse=True,
                                kernel_options=opts)
    assert hopper_calls == ["bnhd"]
    assert launches[0][3]["SPLIT"] is (head_dim == 64 or half_values) and launches[0][3]["HAS_MULT"] is True
    ref = attention_reference(q, k, v, layout="bnhd", block_multiplier=mult, head_weights=hw,
                              compute_dtype=torch.float64)
    assert_close_rel(res.out, ref.out, OUT_TOL[dtype])
    assert_lse_equal(res.lse, ref.lse)


@pytest.mark.cuda
@needs_hopper
def test_strided_views_of_a_fused_qkv_projection(hopper_calls):
    """diffusers' fused QKV: q, k, v are strided views of one [B, N, 3, H, D] buffer."""
    b, n, h, d = 2, 777, 6, 128
    qkv = torch.randn(b, n, 3, h, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    out = iidkern.attention(q, k, v, layout="bnhd", kernel_options={"poison": True})
    assert hopper_calls == ["bnhd"]
    ref = attention_reference(q, k, v, layout="bnhd", compute_dtype=torch.float64)
    assert_close_rel(out, ref.out, OUT_TOL[torch.bfloat16])
    # The same heads read through a transposed view in the other layout.
    out_t = iidkern.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="bhnd")
    assert_close_rel(out_t.transpose(1, 2), ref.out, OUT_TOL[torch.bfloat16])


@pytest.mark.cuda
@needs_hopper
def test_unaligned_inputs_fall_back_to_the_triton_kernel(hopper_calls):
    b, h, n, d = 1, 2, 200, 128
    buf = torch.randn(3 * b * h * n * d + 1, device="cuda", dtype=torch.float16)
    q, k, v = (buf[1 + i * b * h * n * d: 1 + (i + 1) * b * h * n * d].view(b, h, n, d) for i in range(3))
    out = iidkern.attention(q, k, v)
    assert hopper_calls == []
    assert_close_rel(out, attention_reference(q, k, v, compute_dtype=torch.float64).out, OUT_TOL[torch.float16])


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("hw_shape", ["h", "bh", "bhn"])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_head_weights_and_pair_stats(hopper_calls, hw_shape, layout):
    b, h, n = 2, 5, 1000
    q, k, v = _qkv(b, h, n, n, torch.bfloat16, layout, seed=11)
    hw = {"h": torch.rand(h), "bh": torch.rand(b, h), "bhn": torch.rand(b, h, n)}[hw_shape].cuda() + 0.5
    res = iidkern.attention(q, k, v, layout=layout, head_weights=hw, pair_stats=[(0, 1)],
                            kernel_options={"poison": True})
    assert hopper_calls == [layout]
    ref = attention_reference(q, k, v, layout=layout, head_weights=hw, pair_stats=torch.tensor([[0, 1]]),
                              compute_dtype=torch.float64)
    assert_close_rel(res.out, ref.out, OUT_TOL[torch.bfloat16])
    torch.testing.assert_close(res.pair_stats.dot.double(), ref.pair_stats.dot.double(), rtol=2e-2, atol=1e-2)


def _pair_sums(out, pairs, layout):
    """float64 (dot, |O_b0|^2, |O_b1|^2) per pair and head of the call's own output, [P, H, 3]."""
    o = out.double() if layout == "bhnd" else out.double().transpose(1, 2)
    return torch.stack([torch.stack([(o[b0] * o[b1]).sum((1, 2)), (o[b0] ** 2).sum((1, 2)), (o[b1] ** 2).sum((1, 2))], -1)
                        for b0, b1 in pairs])


def _stats(res):
    return torch.stack([res.pair_stats.dot, res.pair_stats.norm0_sq, res.pair_stats.norm1_sq], -1).double()


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("forced", [None, (3, 4)])
def test_pair_stats_tickets_zeroed_by_the_hopper_kernel(hopper_calls, layout, forced):
    """The pair pass's last program of each head sums its slots (kernels/pair_stats.py); the
    tickets start at zero because the Hopper kernel zeroes them in the same call, whole tiles
    or split. Repeated calls (the counters' memory reused) stay exact."""
    b, h, n = 4, 3, 1000
    pairs = [(0, 1), (2, 3), (3, 0)]
    opts = {"poison": True}
    if forced:
        opts.update(tail_split_tiles=forced[0], tail_split_pieces=forced[1])
    for seed in range(3):
        q, k, v = _qkv(b, h, n, n, torch.bfloat16, layout, seed=40 + seed)
        with fast_launch.recording() as launches:
            res = iidkern.attention(q, k, v, layout=layout, pair_stats=pairs, kernel_options=opts)
        first = launches[0]
        assert first[0] is hopper_fwd._ATTN_HOPPER and first[3]["ZERO"] is True
        assert first[3]["SPLIT"] is (forced is not None)
        assert [rec[0] for rec in launches].count(launch._PAIR_STATS) == len(pairs)
        torch.testing.assert_close(_stats(res), _pair_sums(res.out, pairs, layout), rtol=1e-5, atol=0)
        ref = attention_reference(q, k, v, layout=layout, compute_dtype=torch.float64)
        assert_close_rel(res.out, ref.out, OUT_TOL[torch.bfloat16])
    assert hopper_calls == [layout] * 3


@pytest.mark.cuda
@needs_hopper
def test_pair_stats_in_a_cuda_graph(hopper_calls):
    """Captured pair-statistics calls: every graph replay zeroes the tickets again (in the
    captured Hopper launch), so replays on fresh inputs stay exact."""
    b, h, n, layout = 2, 4, 1100, "bnhd"
    pairs = [(0, 1)]
    q, k, v = _qkv(b, h, n, n, torch.bfloat16, layout, seed=50)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        iidkern.attention(q, k, v, layout=layout, pair_stats=pairs)  # compiled outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        res = iidkern.attention(q, k, v, layout=layout, pair_stats=pairs)
    for round_ in range(3):
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(_stats(res), _pair_sums(res.out, pairs, layout), rtol=1e-5, atol=0)
        assert_close_rel(res.out, attention_reference(q, k, v, layout=layout, compute_dtype=torch.float64).out,
                         OUT_TOL[torch.bfloat16])


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("forced,with_multiplier", [(None, False), ((2, 3), False), (None, True)])
def test_fused_key_group_sums_of_tiny_probabilities_on_the_hopper_kernel(hopper_calls, no_probe_pass, dtype, forced,
                                                                         with_multiplier):
    """The Hopper kernel's key-group sums (fp16 P, scaled by 2^14 before the cast) keep their
    relative precision where P is far below fp16's smallest normal, whole tiles and split.
    With a block multiplier (M = 1 on a corner here, a no-op; such calls keep whole tiles) fp16
    inputs keep P unscaled for P @ V and scale it for the group product alone."""
    gap = 15.0
    g = torch.Generator().manual_seed(71)
    b, h, n = 2, 3, 700
    q, k, v = tiny_group_probabilities(b, h, n, 128, (100, 400), gap, dtype, "bnhd", g, device="cuda")
    probe = Probe(TG.each(0, n), TG.segments([(100, 150), (150, 300), (300, 400)], n), heads="keep")
    mult = BlockMultiplier(torch.ones(b, 5, 7, device="cuda"), query_start=3, key_start=650) \
        if with_multiplier else None
    opts = {"poison": True}
    if forced:
        opts.update(tail_split_tiles=forced[0], tail_split_pieces=forced[1])
    res = iidkern.attention(q, k, v, layout="bnhd", scale=1.0, probes=[probe], block_multiplier=mult,
                            kernel_options=opts)
    assert hopper_calls == ["bnhd"]
    ref = attention_reference(q, k, v, layout="bnhd", scale=1.0, probes=[probe], compute_dtype=torch.float64)
    assert 1e-15 < ref.probes[0].min() and ref.probes[0].max() < math.exp(-gap + 5)
    rel = ((res.probes[0].double() - ref.probes[0]).abs() / ref.probes[0]).max().item()
    assert rel < 2e-3, f"largest per-element relative error {rel:.2e}"  # one fp16 rounding a term


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_tiny_key_group_sums_beside_a_multiplier_on_the_triton_kernel_gpu(no_probe_pass, dtype, head_dim):
    """On the GPU the Triton kernel's group products are tensor-core ones: the fp16 split of
    p * 2^14 (~1e-5 relative precision on groups ~3e-7 of the row max), or beside a
    multiplier on fp16 inputs fp32 products: exact up to head dim 64, tf32 at 128 (~5e-4 a
    term; exact ones do not fit the H100's shared memory there). Both have fp32's range."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator().manual_seed(77)
    b, h, n = 2, 3, 700
    q, k, v = tiny_group_probabilities(b, h, n, head_dim, (100, 400), 15.0, dtype, "bnhd", g, device="cuda")
    probe = Probe(TG.each(0, n), TG.segments([(100, 150), (150, 300), (300, 400)], n), heads="keep")
    mult = BlockMultiplier(torch.ones(b, 5, 7, device="cuda"), query_start=3, key_start=650)
    res = iidkern.attention(q, k, v, layout="bnhd", scale=1.0, probes=[probe], block_multiplier=mult,
                            kernel_options={"poison": True, "hopper": False})
    ref = attention_reference(q, k, v, layout="bnhd", scale=1.0, probes=[probe], compute_dtype=torch.float64)
    assert 1e-9 < ref.probes[0].min() and ref.probes[0].max() < 1e-2
    rel = ((res.probes[0].double() - ref.probes[0]).abs() / ref.probes[0]).max().item()
    tf32 = dtype == torch.float16 and head_dim > 64
    assert rel < (1e-3 if tf32 else 2e-4), f"largest per-element relative error {rel:.2e}"


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_key_groups_beside_a_large_multiplier_stay_finite_on_the_hopper_kernel(hopper_calls, no_probe_pass, dtype):
    """p carries 2^14 with key groups (``_softmax_tile``) except on fp16 with a multiplier,
    where 2^14 * M (M = 8 here) would overflow the P @ V operand."""
    b, h, n = 2, 4, 1100
    q, k, v = _qkv(b, h, n, n, dtype, "bnhd", seed=75)
    probe = Probe(TG.each(0, n), TG.segments([(0, 100), (100, 300), (300, 400)], n), heads="keep")
    mult = BlockMultiplier(torch.full((b, 500, 600), 8.0, device="cuda"), query_start=100, key_start=50)
    res = iidkern.attention(q, k, v, layout="bnhd", probes=[probe], block_multiplier=mult,
                            kernel_options={"poison": True})
    assert hopper_calls == ["bnhd"]
    ref = attention_reference(q, k, v, layout="bnhd", probes=[probe], block_multiplier=mult,
                              compute_dtype=torch.float64)
    assert torch.isfinite(res.out).all()
    assert_close_rel(res.out, ref.out, OUT_TOL[dtype])
    assert_close_rel(res.probes[0], ref.probes[0], PROBE_TOL[dtype])


@pytest.mark.cuda
@needs_hopper
def test_extras_of_the_triton_kernel_and_the_switch_keep_it(hopper_calls):
    b, h, n = 1, 4, 600
    q, k, v = _qkv(b, h, n, n, torch.bfloat16, "bhnd", seed=12)
    plain = iidkern.attention(q, k, v)
    assert hopper_calls == ["bhnd"]
    triton_out = iidkern.attention(q, k, v, kernel_options={"hopper": False})
    iidkern.attention(q, k, v, probes=[ValueProbe(torch.randn(b, n, 2, device="cuda"), TG.each(0, n))])
    iidkern.attention(q, k, v, kernel_options={"BLOCK_M": 64})
    assert hopper_calls == ["bhnd"]
    assert_close_rel(plain, triton_out, OUT_TOL[torch.bfloat16])


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("return_lse", [False, True])
def test_repeat_calls_take_the_cached_launch_with_fresh_descriptors(hopper_calls, monkeypatch, return_lse):
    """The second call of a shape skips Triton's launch path (fast_launch.Launcher): a plain
    call replays the first call's launch (kernels/replay.py), a call with LSE takes the
    launcher's cached kernel with freshly built descriptors; either way its TMA descriptors
    must point at the new tensors."""
    from iidkern.kernels import fast_launch
    slow = []
    launcher = hopper_fwd._ATTN_HOPPER
    kernel = launcher.kernel

    class CountingKernel:
        params = kernel.params

        def __getitem__(self, grid):
            slow.append(grid)
            return kernel[grid]
    monkeypatch.setattr(launcher, "kernel", CountingKernel())
    monkeypatch.setattr(launcher, "_cache", {})
    outs, refs = [], []
    for seed in (21, 22, 23):
        q, k, v = _qkv(2, 3, 999, 640, torch.float16, "bnhd", seed=seed)
        res = iidkern.attention(q, k, v, layout="bnhd", return_lse=return_lse, kernel_options={"poison": True})
        outs.append(res.out if return_lse else res)
        refs.append(attention_reference(q, k, v, layout="bnhd", compute_dtype=torch.float64).out)
    assert len(hopper_calls) == 3
    assert bool(importlib.import_module("iidkern.attention")._REPLAYS) != return_lse
    assert len(slow) == (1 if fast_launch.Launcher(kernel).enabled else 3)
    for out, ref in zip(outs, refs):
        assert_close_rel(out, ref, OUT_TOL[torch.float16])


def _text_image(n_txt, n_img, text_first):
    """(text range, image range) of a joint sequence: Flux puts text first, SD3 last."""
    n = n_txt + n_img
    return ((0, n_txt), (n_txt, n)) if text_first else ((n_img, n), (0, n_img))


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("b, h, n_txt, n_img, text_first, n_groups, batched", [
    (1, 3, 77, 700, True, 3, False),  # Flux-like: instructions inside the first key tile
    (2, 2, 333, 1111, False, 5, True),  # SD3-like: text last, into the ragged last key tile
    (1, 2, 500, 300, True, 17, False),  # groups across key tiles, 32 sum columns
    (2, 1, 128, 128, False, 32, True),  # text = the last whole key tile, the most groups
    (1, 1, 3, 1, True, 1, False),  # one key tile, one image query
])
def test_key_group_probe_rides_in_the_hopper_main_pass(hopper_calls, no_probe_pass, dtype, layout, b, h, n_txt,
                                                       n_img, text_first, n_groups, batched):
    """IID's image x instruction map in the Hopper kernel: no probe pass, float64 oracle."""
    n = n_txt + n_img
    q, k, v = _qkv(b, h, n, n, dtype, layout, seed=n + n_groups)
    txt, img = _text_image(n_txt, n_img, text_first)
    keys = random_key_groups(n, txt, n_groups, torch.Generator().manual_seed(n_groups), batched, b, device="cuda")
    probe = Probe(TG.each(*img), keys, heads="keep", normalize="keys")
    res = iidkern.attention(q, k, v, layout=layout, probes=[probe], kernel_options={"poison": True})
    assert hopper_calls == [layout]
    ref = attention_reference(q, k, v, layout=layout, probes=[probe], compute_dtype=torch.float64)
    assert_close_rel(res.out, ref.out, OUT_TOL[dtype])
    assert res.probes[0].shape == ref.probes[0].shape == (b, h, n_img, n_groups)
    assert_close_rel(res.probes[0], ref.probes[0], PROBE_TOL[dtype], what="key-group probe")
    # Every tile split into key pieces (the last wave's split, forced): the join weighs each
    # piece's group sums like its output.
    with fast_launch.recording() as launches:
        split = iidkern.attention(q, k, v, layout=layout, probes=[probe],
                                  kernel_options={"poison": True, "tail_split_tiles": 2**30, "tail_split_pieces": 3})
    assert launches[0][3]["SPLIT"] is (n > hopper_fwd.BLOCK_N)  # one key tile: nothing to split
    assert_close_rel(split.out, ref.out, OUT_TOL[dtype])
    assert_close_rel(split.probes[0], ref.probes[0], PROBE_TOL[dtype], what="key-group probe, split")


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("query_kind", ["each", "ids"])
@pytest.mark.parametrize("heads", ["mean", "sum", "weights"])
def test_key_group_probe_query_groups_and_head_reductions(hopper_calls, no_probe_pass, query_kind, heads):
    b, h, n = 2, 4, 999
    q, k, v = _qkv(b, h, n, n, torch.bfloat16, "bnhd", seed=31)
    instructions = random_key_groups(n, (0, 200), 4, torch.Generator().manual_seed(32), True, b, device="cuda")
    g = torch.Generator().manual_seed(33)
    queries = TG.each(150, 990) if query_kind == "each" else \
        TG.ids(torch.randint(-1, 6, (b, n), generator=g, dtype=torch.int32).cuda(), 6)
    head_mode = torch.rand(b, h, generator=g).cuda() if heads == "weights" else heads
    probe = Probe(queries, instructions, heads=head_mode, normalize=None)
    hw = torch.rand(h, generator=g).cuda() + 0.5  # head weights beside the probe
    res = iidkern.attention(q, k, v, layout="bnhd", probes=[probe], head_weights=hw, kernel_options={"poison": True})
    assert hopper_calls == ["bnhd"]
    ref = attention_reference(q, k, v, layout="bnhd", probes=[probe], head_weights=hw, compute_dtype=torch.float64)
    assert_close_rel(res.out, ref.out, OUT_TOL[torch.bfloat16])
    assert_close_rel(res.probes[0], ref.probes[0], PROBE_TOL[torch.bfloat16], what="key-group probe")


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("text_first", [True, False])
def test_iid_and_text_image_probes_around_the_hopper_kernel(hopper_calls, probe_pass_calls, text_first):
    """The bench's probe workload: the key-group probe in the Hopper main pass, the text x
    image head-mean map in the probe pass reading the Hopper kernel's LSE."""
    b, h, n_txt, n_img = 1, 3, 154, 1024
    n = n_txt + n_img
    q, k, v = _qkv(b, h, n, n, torch.float16, "bnhd", seed=41)
    txt, img = _text_image(n_txt, n_img, text_first)
    segments = [(txt[0], txt[0] + 50), (txt[0] + 50, txt[0] + 100), (txt[0] + 100, txt[1])]
    iid = Probe(TG.each(*img), TG.segments(segments, n, device="cuda"), heads="keep", normalize="keys")
    text_image = Probe(TG.each(*txt), TG.each(*img), heads="mean")
    res = iidkern.attention(q, k, v, layout="bnhd", probes=[iid, text_image], return_lse=True,
                            kernel_options={"poison": True})
    assert hopper_calls == ["bnhd"] and len(probe_pass_calls) == 1 and probe_pass_calls[0] is text_image
    ref = attention_reference(q, k, v, layout="bnhd", probes=[iid, text_image], compute_dtype=torch.float64)
    assert_close_rel(res.out, ref.out, OUT_TOL[torch.float16])
    assert_lse_equal(res.lse, ref.lse, tol=1e-3)
    for got, want in zip(res.probes, ref.probes):
        assert got.shape == want.shape
        assert_close_rel(got, want, PROBE_TOL[torch.float16], what="probe")


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("b, h, n, q0, mq, k0, mk, per_head, m_dtype", [
    (1, 3, 777, 77, 700, 0, 77, False, torch.float32),  # Flux-like: image queries x text keys in key tile 0
    (2, 2, 1444, 0, 1111, 1111, 333, True, torch.float32),  # SD3-like: text last, into the ragged last tile
    (1, 2, 800, 13, 501, 130, 517, False, torch.bfloat16),  # odd ranges across key tiles: scalar loads
    (1, 2, 4608, 512, 4096, 0, 512, False, torch.float32),  # Flux 1024^2: aligned (vector-load specialization)
    (1, 1, 5, 0, 5, 0, 5, True, torch.float16),  # one key tile holds everything
    # The key loop's three ranges (before, on, after the sub-block's key tiles, NOTES.md 70):
    (1, 2, 1000, 0, 1000, 0, 1000, True, torch.float32),  # every key tile multiplied
    (2, 1, 1000, 64, 900, 896, 104, False, torch.bfloat16),  # the last (ragged) tile only
    (1, 2, 1200, 129, 1000, 256, 384, False, torch.float32),  # middle tiles, whole: none before or after is
])
def test_block_multiplier_in_the_hopper_kernel(hopper_calls, dtype, layout, b, h, n, q0, mq, k0, mk, per_head,
                                               m_dtype):
    """HeadRouter's post-softmax block multiplier: P @ V weighted on the sub-block, the
    normalizer (LSE) not, against the float64 oracle; values in any float dtype."""
    q, k, v = _qkv(b, h, n, n, dtype, layout, seed=n + mk)
    g = torch.Generator().manual_seed(mq)
    values = (2 * torch.rand((b, h, mq, mk) if per_head else (b, mq, mk), generator=g)).to("cuda", m_dtype)
    mult = BlockMultiplier(values, query_start=q0, key_start=k0)
    res = iidkern.attention(q, k, v, layout=layout, block_multiplier=mult, return_lse=True,
                            kernel_options={"poison": True})
    assert hopper_calls == [layout]
    ref = attention_reference(q, k, v, layout=layout, block_multiplier=mult, compute_dtype=torch.float64)
    assert_close_rel(res.out, ref.out, OUT_TOL[dtype])
    assert_lse_equal(res.lse, ref.lse, tol=1e-3)
    # The multiplier moves the output far beyond the tolerance (0.17-0.47 relative here), so
    # a kernel that dropped it could not pass.
    plain = attention_reference(q, k, v, layout=layout, compute_dtype=torch.float64)
    assert rel_err(plain.out, ref.out) > 5 * OUT_TOL[dtype]


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("text_first", [True, False])
def test_block_multiplier_beside_key_groups_head_weights_and_a_map(hopper_calls, probe_pass_calls, text_first):
    """IID's probes and HeadRouter's weights in one call: the multiplier (a strided view)
    weights the output only, the fused key-group sums and the probe-pass map see the
    unweighted probabilities, the head weights scale the weighted output."""
    b, h, n_txt, n_img = 2, 3, 77, 900
    n = n_txt + n_img
    q, k, v = _qkv(b, h, n, n, torch.bfloat16, "bnhd", seed=31)
    txt, img = _text_image(n_txt, n_img, text_first)
    g = torch.Generator().manual_seed(3)
    values = (2 * torch.rand(b, n_txt, n_img, generator=g)).cuda().transpose(1, 2)  # [B, image, text] view
    mult = BlockMultiplier(values, query_start=img[0], key_start=txt[0])
    keys = random_key_groups(n, txt, 3, g, True, b, device="cuda")
    probes = [Probe(TG.each(*img), keys, heads="keep", normalize="keys"),
              Probe(TG.each(*img), TG.each(*txt), heads="mean")]
    hw = 1 + 0.2 * torch.rand(b, h, device="cuda")
    res = iidkern.attention(q, k, v, layout="bnhd", block_multiplier=mult, probes=probes, head_weights=hw,
                            kernel_options={"poison": True})
    assert hopper_calls == ["bnhd"] and len(probe_pass_calls) == 1  # the map; the key groups ride along
    ref = attention_reference(q, k, v, layout="bnhd", block_multiplier=mult, probes=probes, head_weights=hw,
                              compute_dtype=torch.float64)
    assert_close_rel(res.out, ref.out, OUT_TOL[torch.bfloat16])
    for got, want in zip(res.probes, ref.probes):
        assert_close_rel(got, want, PROBE_TOL[torch.bfloat16], what="probe")


# --------------------------------------------------------------------------- tags (H100)
def _gpu_tags(kind, b, nq, nk, seed):
    """(q_tags, k_tags) on the GPU: ``random`` bit sets (int64 [B, N], some tokens with no
    bit), ``shared`` int32 [N] tags, or ``blocks``: 300-token segments that see only
    themselves (whole key tiles skipped) with the 2nd query tile and every 7th query of
    the last batch row left without any allowed key."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return random_tags(b, nq, generator=g).cuda(), random_tags(b, nk, generator=g).cuda()
    if kind == "shared":
        return (random_tags(1, nq, generator=g, dtype=torch.int32)[0].cuda(),
                random_tags(1, nk, generator=g, dtype=torch.int32)[0].cuda())
    qt = (1 << (torch.arange(nq) // 300)).expand(b, nq).contiguous()
    kt = (1 << (torch.arange(nk) // 300)).expand(b, nk).contiguous()
    qt[:, 128:256] = 0
    qt[-1, ::7] = 0
    return qt.cuda(), kt.cuda()


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("kind", ["random", "shared", "blocks"])
@pytest.mark.parametrize("b, h, nq, nk", [(2, 3, 1111, 777), (1, 2, 700, 1500), (3, 1, 50, 1000), (1, 2, 300, 1)])
def test_tags_run_on_the_hopper_kernel(hopper_calls, dtype, layout, kind, b, h, nq, nk):
    """IID's masked attention on the Hopper kernel: full tiles unmasked, partial tiles tag
    masked, skipped tiles never loaded; queries with no allowed key give 0 and LSE -inf."""
    q, k, v = _qkv(b, h, nq, nk, dtype, layout, seed=nq + 3 * nk)
    tags = _gpu_tags(kind, b, nq, nk, seed=nq)
    res = iidkern.attention(q, k, v, layout=layout, tags=tags, return_lse=True, kernel_options={"poison": True})
    assert hopper_calls == [layout]
    ref = attention_reference(q, k, v, layout=layout, tags=tags, compute_dtype=torch.float64)
    assert torch.isfinite(res.out).all()
    assert_close_rel(res.out, ref.out, OUT_TOL[dtype])
    assert_lse_equal(res.lse, ref.lse, tol=1e-3)
    dead = ref.out.abs().amax(-1) == 0  # queries with no allowed key
    assert (res.out[dead] == 0).all()
    if kind == "blocks":
        assert dead.any()


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_tags_beside_every_hopper_extra(hopper_calls, probe_pass_calls, layout):
    """IID tags (with padding tokens that see nothing) with the key-group probe, the text x
    image map (probe pass, masked too), a block multiplier, head weights, LSE and pair stats."""
    b, h, n_txt, n_img = 2, 3, 154, 1000
    n = n_txt + n_img
    q, k, v = _qkv(b, h, n, n, torch.bfloat16, layout, seed=77)
    g = torch.Generator().manual_seed(78)
    instructions = [(0, 40), (40, 90), (90, 140)]  # 140..154: text padding, no tag bit
    regions = torch.rand(b, 3, n_img, generator=g) < 0.4
    tags = iidkern.tag_mask(*iidkern.instruction_tags(n, image=(n_txt, n), instructions=instructions,
                                                      region_masks=regions, device="cuda"))
    iid = Probe(TG.each(n_txt, n), TG.segments(instructions, n, device="cuda"), heads="keep", normalize="keys")
    text_image = Probe(TG.each(0, n_txt), TG.each(n_txt, n), heads="mean")
    mult = BlockMultiplier(0.5 + torch.rand(b, h, 300, 100, generator=g).cuda(), query_start=n_txt + 10, key_start=20)
    hw = torch.rand(b, h, generator=g).cuda() + 0.5
    kw = dict(tags=tags, probes=[iid, text_image], block_multiplier=mult, head_weights=hw)
    res = iidkern.attention(q, k, v, layout=layout, pair_stats=[(0, 1)], return_lse=True,
                            kernel_options={"poison": True}, **kw)
    assert hopper_calls == [layout] and len(probe_pass_calls) == 1
    kw["tags"] = (tags.q_tags, tags.k_tags)  # the reference takes the tag pair
    ref = attention_reference(q, k, v, layout=layout, pair_stats=torch.tensor([[0, 1]]),
                              compute_dtype=torch.float64, **kw)
    assert_close_rel(res.out, ref.out, OUT_TOL[torch.bfloat16])
    assert_lse_equal(res.lse, ref.lse, tol=1e-3)
    assert torch.isinf(res.lse[:, :, 140:154]).all()  # the padding sees nothing
    for got, want in zip(res.probes, ref.probes):
        assert_close_rel(got, want, PROBE_TOL[torch.bfloat16], what="probe")
    torch.testing.assert_close(res.pair_stats.dot.double(), ref.pair_stats.dot.double(), rtol=2e-2, atol=1e-2)


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_head_dim_64_long_sequences_run_on_the_hopper_kernel(hopper_calls, layout):
    """SD3 at 2048² (text last, ragged last key tile): D=64 with >= LONG_MIN_KEYS keys takes
    the Hopper kernel, plain and with tags, both probes and a multiplier; shorter D=64 calls
    keep the Triton kernel."""
    b, h, n_img, n_txt = 1, 2, hopper_fwd.LONG_MIN_KEYS, 333
    n = n_img + n_txt
    g = torch.Generator().manual_seed(91)
    q, k, v = make_qkv(b, h, n, n, 64, torch.bfloat16, layout, device="cuda", generator=g)
    plain = iidkern.attention(q, k, v, layout=layout, return_lse=True, kernel_options={"poison": True})
    ref = attention_reference(q, k, v, layout=layout, compute_dtype=torch.float64)
    assert_close_rel(plain.out, ref.out, OUT_TOL[torch.bfloat16])
    assert_lse_equal(plain.lse, ref.lse, tol=1e-3)
    regions = torch.rand(b, 3, n_img, generator=g) < 0.4
    instructions = [(n_img, n_img + 100), (n_img + 100, n_img + 200), (n_img + 200, n)]
    tags = iidkern.instruction_tags(n, image=(0, n_img), instructions=instructions, region_masks=regions,
                                    device="cuda")
    kw = dict(tags=tags, head_weights=torch.rand(h, generator=g).cuda() + 0.5,
              probes=[Probe(TG.each(0, n_img), TG.segments(instructions, n, device="cuda"), heads="keep"),
                      Probe(TG.each(n_img, n), TG.each(0, n_img), heads="mean")],
              block_multiplier=BlockMultiplier(0.5 + torch.rand(b, 500, 333, generator=g).cuda(), query_start=100,
                                               key_start=n_img))
    res = iidkern.attention(q, k, v, layout=layout, kernel_options={"poison": True}, **kw)
    ref = attention_reference(q, k, v, layout=layout, compute_dtype=torch.float64, **kw)
    assert_close_rel(res.out, ref.out, OUT_TOL[torch.bfloat16])
    for got, want in zip(res.probes, ref.probes):
        assert_close_rel(got, want, PROBE_TOL[torch.bfloat16], what="probe")
    assert hopper_calls == [layout, layout]
    short = make_qkv(1, 2, 4429, 4429, 64, torch.bfloat16, layout, device="cuda", generator=g)
    iidkern.attention(*short, layout=layout)
    assert hopper_calls == [layout, layout]


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_head_dim_64_in_kernel_extras_run_on_the_hopper_kernel(monkeypatch, hopper_calls, dtype, layout):
    """SD3 at 1024²-like lengths (text last, ragged last key tile, fewer than LONG_MIN_KEYS
    keys): a block multiplier or IID's fused key-group probe takes the Hopper kernel at head
    dim 64, alone and together, and matches the float64 oracle; a tagged call does not. Their
    tail splits have at most LIGHT_SPLIT_PIECES pieces a tile (the scratch)."""
    plans = []
    plan_for = hopper_fwd.split_plan_for
    monkeypatch.setattr(hopper_fwd, "split_plan_for", lambda *args: plans.append(plan_for(*args)) or plans[-1])
    b, h, n_img, n_txt = 2, 2, hopper_fwd.LONG_EXTRAS_MIN_KEYS, 333  # 140 tiles: the model would take 12 pieces
    n = n_img + n_txt
    g = torch.Generator().manual_seed(92)
    q, k, v = make_qkv(b, h, n, n, 64, dtype, layout, device="cuda", generator=g)
    instructions = [(n_img, n_img + 100), (n_img + 100, n_img + 200), (n_img + 200, n)]
    iid = Probe(TG.each(0, n_img), TG.segments(instructions, n, device="cuda"), heads="keep", normalize="keys")
    mult = BlockMultiplier(0.5 + torch.rand(b, 700, n_txt, generator=g).cuda(), query_start=50, key_start=n_img)
    for kw in (dict(block_multiplier=mult), dict(probes=[iid]), dict(block_multiplier=mult, probes=[iid])):
        res = iidkern.attention(q, k, v, layout=layout, kernel_options={"poison": True}, **kw)
        ref = attention_reference(q, k, v, layout=layout, compute_dtype=torch.float64, **kw)
        out = res if isinstance(res, torch.Tensor) else res.out
        assert_close_rel(out, ref.out, OUT_TOL[dtype])
        for got, want in zip(getattr(res, "probes", ()), ref.probes):
            assert_close_rel(got, want, PROBE_TOL[dtype], what="probe")
    assert hopper_calls == [layout] * 3
    assert plans and all(p.active and p.pieces <= hopper_fwd.LIGHT_SPLIT_PIECES for p in plans), plans
    tags = (torch.ones(b, n, dtype=torch.int32, device="cuda"), torch.ones(b, n, dtype=torch.int32, device="cuda"))
    iidkern.attention(q, k, v, layout=layout, tags=tags, block_multiplier=mult)
    assert hopper_calls == [layout] * 3


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("b, h, nq, nk", [(1, 24, 768, 768), (2, 3, 333, 1000), (3, 2, 1100, 1023),
                                          (1, 32, 768, 1024), (1, 16, 1000, 1024), (2, 24, 333, 700)])
def test_short_plain_calls_run_the_triton_kernel_on_the_gpu(monkeypatch, dtype, layout, b, h, nq, nk):
    """Plain calls on short key sequences (Flux 256² among them) run the Triton kernel's small
    tiles, the one-wave tiles where those fill the GPU in one wave (launch.short_plain_config),
    checked path and replays alike, and match the reference; from SHORT_MAX_KEYS + 1 keys the
    Hopper kernel takes them."""
    expected = launch.short_plain_config(b * h, nq, nk, torch.device("cuda"))
    assert expected is not None
    api = importlib.import_module("iidkern.attention")
    hopper, replayed = [], []
    original, original_replay = hopper_fwd.hopper_attention, replay.LaunchReplay.__call__
    monkeypatch.setattr(hopper_fwd, "hopper_attention", lambda *a, **kw: hopper.append(1) or original(*a, **kw))
    monkeypatch.setattr(replay.LaunchReplay, "__call__",
                        lambda self, *a: replayed.append(self.launcher) or original_replay(self, *a))
    for seed in range(3):  # the checked path alone, then the first call of the signature and a replay
        monkeypatch.setattr(api, "_REPLAY", seed > 0)
        q, k, v = _qkv(b, h, nq, nk, dtype, layout, seed=seed)
        with fast_launch.recording() as launches:
            out = iidkern.attention(q, k, v, layout=layout)
        if seed == 0:
            assert [rec[0] for rec in launches] == [launch._ATTN]
            assert {key: launches[0][3][key] for key in expected} == expected
        ref = attention_reference(q, k, v, layout=layout, compute_dtype=torch.float64).out
        assert_close_rel(out, ref, OUT_TOL[dtype])
    assert hopper == [] and replayed and all(launcher is launch._ATTN for launcher in replayed)
    q, k, v = _qkv(b, h, nq, launch.SHORT_MAX_KEYS + 1, dtype, layout, seed=9)
    out = iidkern.attention(q, k, v, layout=layout, kernel_options={"poison": True})
    assert hopper == [1]
    assert_close_rel(out, attention_reference(q, k, v, layout=layout, compute_dtype=torch.float64).out, OUT_TOL[dtype])
