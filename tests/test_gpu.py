"""The engine suite at real sizes on a CUDA GPU (compiled Triton, not the interpreter).

Skipped on CPU. Reference: the dense oracle on the same GPU in float32/float64.
"""
import pytest
import torch

import iidkern
from iidkern import BlockMultiplier, Probe, TokenGroups as TG, ValueProbe
from iidkern.kernels import launch
from iidkern.kernels.launch import default_config
from iidkern.reference import attention_reference
from helpers import GPU_PROBE_TOL, OUT_TOL, PROBE_TOL, assert_close_rel, assert_lse_equal, random_tags
from oracle import tiles_visited

pytestmark = pytest.mark.cuda


def qkv(b, h, nq, nk, d, dtype, layout, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def one(n):
        shape = (b, h, n, d) if layout == "bhnd" else (b, n, h, d)
        return torch.randn(shape, generator=g, device="cuda", dtype=torch.float32).to(dtype)
    return one(nq), one(nk), one(nk)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("d", [64, 128, 96, 200])
def test_plain(dtype, layout, d):
    q, k, v = qkv(2, 4, 1111, 777, d, dtype, layout, seed=d)
    res = iidkern.attention(q, k, v, layout=layout, return_lse=True, kernel_options={"poison": True})
    ref = attention_reference(q, k, v, layout=layout, compute_dtype=torch.float64)
    tol = OUT_TOL[dtype] if dtype != torch.float32 else 1e-4
    assert_close_rel(res.out, ref.out, tol)
    assert_lse_equal(res.lse, ref.lse, tol=1e-3)


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_tags_and_tile_skipping(layout):
    b, h, n = 2, 4, 1500
    q, k, v = qkv(b, h, n, n, 128, torch.bfloat16, layout, seed=1)
    seg = torch.arange(n, device="cuda") // 300
    qt = (1 << seg).expand(b, n).contiguous()
    kt = qt.clone()
    qt[1, ::7] = 0  # rows with no allowed key
    res = iidkern.attention(q, k, v, layout=layout, tags=(qt, kt), return_lse=True, count_tiles=True,
                            kernel_options={"poison": True})
    ref = attention_reference(q, k, v, layout=layout, tags=(qt, kt))
    assert_close_rel(res.out, ref.out, OUT_TOL[torch.bfloat16])
    assert_lse_equal(res.lse, ref.lse, tol=1e-3)
    expected = tiles_visited(iidkern.allowed_pairs(qt, kt), *res.tile_shape)
    assert torch.equal(res.tiles_visited, expected[:, None].expand_as(res.tiles_visited).int())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("extras", ["none", "mult", "probe"])
def test_tags_with_nothing_listed(dtype, d, extras):
    """Block-diagonal tags on tile boundaries over a ragged key count (SD3's 333 text tokens
    after 1024 image tokens): every visited tile is in the run or is the full-but-ragged one,
    so the Triton kernel runs without its list loops (tiles.TileLists.has_lists). Exact
    against float64 alone, with head weights and a block multiplier over the ragged tile
    (which then runs inline), and with a fused key-group probe (in a one-tile loop)."""
    b, h, n = 2, 3, 1357
    q, k, v = qkv(b, h, n, n, d, dtype, "bnhd", seed=54 + d)
    seg = (torch.arange(n, device="cuda") >= 1024).long()
    tags = iidkern.tag_mask((1 << seg).expand(b, n), (1 << seg).expand(b, n))
    kw = dict(tags=tags)
    if extras == "mult":
        kw.update(head_weights=torch.rand(b, h, device="cuda") + 0.5,
                  block_multiplier=BlockMultiplier(0.5 + torch.rand(b, 1024, 333, device="cuda"), query_start=0,
                                                   key_start=1024))
    if extras == "probe":
        instructions = TG.segments([(1024, 1135), (1135, 1246), (1246, 1357)], n, device="cuda")
        kw.update(head_weights=torch.rand(b, h, device="cuda") + 0.5,
                  probes=[Probe(TG.each(0, 1024), instructions, heads="keep", normalize="keys")])
    from iidkern.kernels import fast_launch, launch
    with fast_launch.recording() as launches:
        res = iidkern.attention(q, k, v, layout="bnhd", backend="triton", return_lse=True, count_tiles=True,
                                kernel_options={"poison": True, "hopper": False}, **kw)  # the Triton kernel at D=128 too
    assert [kwargs["HAS_LISTS"] for fn, _, _, kwargs in launches if fn is launch._ATTN] == [False]
    ref = attention_reference(q, k, v, layout="bnhd", compute_dtype=torch.float64,
                              **{**kw, "tags": (tags.q_tags, tags.k_tags)})
    assert_close_rel(res.out, ref.out, OUT_TOL[dtype])
    assert_lse_equal(res.lse, ref.lse, tol=1e-3)
    for got, want in zip(res.probes, ref.probes):
        assert_close_rel(got, want, GPU_PROBE_TOL, "probe")


def test_tuple_tags_keep_the_list_loops_on_a_gpu():
    """A call's own (q_tags, k_tags) do not read has_lists back (a synchronization per call):
    the same list-free tags run with the loops, exactly."""
    from iidkern.kernels import fast_launch, launch
    b, h, n, d = 1, 2, 333 + 256, 64
    seg = (torch.arange(n, device="cuda") >= 256).long()
    q, k, v = qkv(b, h, n, n, d, torch.bfloat16, "bhnd", seed=58)
    flags = []
    for tags in ((1 << seg)[None], (1 << seg)[None]), iidkern.tag_mask((1 << seg)[None], (1 << seg)[None]):
        with fast_launch.recording() as launches:
            out = iidkern.attention(q, k, v, backend="triton", tags=tags)
        flags += [kwargs["HAS_LISTS"] for fn, _, _, kwargs in launches if fn is launch._ATTN]
        ref = attention_reference(q, k, v, tags=((1 << seg)[None], (1 << seg)[None]), compute_dtype=torch.float64)
        assert_close_rel(out, ref.out, OUT_TOL[torch.bfloat16])
    assert flags == [True, False]


def test_tags_first_used_inside_a_graph_capture():
    """A tag mask first used while a CUDA graph is captured: the graph builds its own lists
    (without reading them back, which a capture cannot), replays right on fresh inputs, and
    keeps none in the mask, whose eager calls (before any replay too) build their own."""
    b, h, n, d = 1, 2, 333 + 256, 64
    seg = (torch.arange(n, device="cuda") >= 256).long()
    tags = iidkern.tag_mask((1 << seg)[None], (1 << seg)[None])
    q, k, v = qkv(b, h, n, n, d, torch.bfloat16, "bhnd", seed=55)
    iidkern.attention(q, k, v, backend="triton")  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = iidkern.attention(q, k, v, backend="triton", tags=tags)
    assert not tags._lists  # nothing kept from inside the capture
    q2, k2, v2 = qkv(b, h, n, n, d, torch.bfloat16, "bhnd", seed=59)
    eager = iidkern.attention(q2, k2, v2, backend="triton", tags=tags)  # before any replay
    ref = attention_reference(q2, k2, v2, tags=(tags.q_tags, tags.k_tags), compute_dtype=torch.float64)
    assert_close_rel(eager, ref.out, OUT_TOL[torch.bfloat16])
    for seed in (56, 57):
        for dst, src in zip((q, k, v), qkv(b, h, n, n, d, torch.bfloat16, "bhnd", seed=seed)):
            dst.copy_(src)
        graph.replay()
        ref = attention_reference(q, k, v, tags=(tags.q_tags, tags.k_tags), compute_dtype=torch.float64)
        assert_close_rel(out, ref.out, OUT_TOL[torch.bfloat16])


@pytest.mark.parametrize("normalize", [None, "keys"])
def test_fused_probe_factors_first_made_inside_a_graph_capture(monkeypatch, normalize):
    """The fused key-group probe's column factors (1 / group size, or the shared unit row)
    first made while a CUDA graph is captured serve that graph but are not kept: eager calls
    before any replay make their own (a kept one would hold unset memory until the replay)."""
    b, h, n, d = 1, 2, 700, 128
    q, k, v = qkv(b, h, n, n, d, torch.bfloat16, "bhnd", seed=61)
    ranges = [(0, 8), (8, 20), (20, 77)]
    warm = Probe(TG.each(77, n), TG.segments(ranges, n, device="cuda"), heads="keep", normalize=normalize)
    iidkern.attention(q, k, v, backend="triton", probes=[warm])  # compile outside the capture
    torch.cuda.synchronize()
    monkeypatch.setattr(launch, "_UNIT_SCALES", {})  # as if no unnormalized probe had run yet
    groups = TG.segments(ranges, n, device="cuda")  # a new object: no factors made yet
    probe = Probe(TG.each(77, n), groups, heads="keep", normalize=normalize)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        res = iidkern.attention(q, k, v, backend="triton", probes=[probe])
    assert launch._UNIT_SCALES == {} and not groups.__dict__.get("_inverse_cache")
    q2, k2, v2 = qkv(b, h, n, n, d, torch.bfloat16, "bhnd", seed=62)
    eager = iidkern.attention(q2, k2, v2, backend="triton", probes=[probe])  # before any replay
    ref = attention_reference(q2, k2, v2, probes=[probe], compute_dtype=torch.float64)
    assert_close_rel(eager.probes[0], ref.probes[0], PROBE_TOL[torch.bfloat16])
    for dst, src in zip((q, k, v), qkv(b, h, n, n, d, torch.bfloat16, "bhnd", seed=63)):
        dst.copy_(src)
    graph.replay()
    ref = attention_reference(q, k, v, probes=[probe], compute_dtype=torch.float64)
    assert_close_rel(res.probes[0], ref.probes[0], PROBE_TOL[torch.bfloat16])


def test_random_tags_large():
    b, h, n = 2, 3, 2049
    q, k, v = qkv(b, h, n, n, 64, torch.float16, "bnhd", seed=2)
    g = torch.Generator().manual_seed(3)
    qt, kt = random_tags(b, n, generator=g).cuda(), random_tags(b, n, generator=g).cuda()
    out = iidkern.attention(q, k, v, layout="bnhd", tags=(qt, kt))
    assert_close_rel(out, attention_reference(q, k, v, layout="bnhd", tags=(qt, kt)).out, OUT_TOL[torch.float16])


def test_flux_shape_probes_and_extras():
    """Flux 1024^2: 24 heads, 512 text + 4096 image tokens, D=128, bf16, [B, N, H, D]."""
    b, h, nt, ni, d = 1, 24, 512, 4096, 128
    n = nt + ni
    q, k, v = qkv(b, h, n, n, d, torch.bfloat16, "bnhd", seed=4)
    instr = torch.full((n,), -1, dtype=torch.int32, device="cuda")
    instr[0:100], instr[100:250], instr[250:300] = 0, 1, 2
    probes = [Probe(TG.each(nt, n), TG.ids(instr, 3, span=(0, 300)), heads="keep", normalize="keys"),
              Probe(TG.each(0, nt), TG.each(nt, n), heads="mean"),
              Probe(TG.single(nt, n, n), TG.each(nt, n), heads="mean"),
              ValueProbe(torch.randn(b, n, 4, device="cuda"), TG.each(nt, n))]
    hw = torch.rand(b, h, device="cuda") + 0.5
    mult = BlockMultiplier(torch.rand(b, ni, nt, device="cuda") * 2, query_start=nt, key_start=0)
    res = iidkern.attention(q, k, v, layout="bnhd", probes=probes, head_weights=hw, block_multiplier=mult,
                            kernel_options={"poison": True})
    ref = attention_reference(q, k, v, layout="bnhd", probes=probes, head_weights=hw, block_multiplier=mult,
                              compute_dtype=torch.float32)
    assert_close_rel(res.out, ref.out, OUT_TOL[torch.bfloat16])
    for i, (got, want) in enumerate(zip(res.probes, ref.probes)):
        assert_close_rel(got, want, GPU_PROBE_TOL, what=f"probe {i}")


@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 128), (torch.float16, 64), (torch.float32, 128)])
@pytest.mark.parametrize("extra", ["none", "multiplier", "tags"])
def test_fused_key_group_probe_at_size(no_probe_pass, dtype, d, extra):
    """IID's image x instruction map rides in the main pass (compiled tiles, all three
    key-range modes: branch-free split, per-tile test beside a multiplier, tag lists)."""
    b, h, nt, ni = 2, 8, 333, 1500
    n = nt + ni
    q, k, v = qkv(b, h, n, n, d, dtype, "bnhd", seed=9)
    instr = torch.full((b, n), -1, dtype=torch.int32, device="cuda")
    instr[:, 7:100], instr[:, 100:250], instr[:, 250:333] = 0, 1, 2
    instr[1, 120:140] = -1
    probe = Probe(TG.each(nt, n), TG.ids(instr, 3, span=(7, 333)), heads="keep", normalize="keys")
    kw = {}
    if extra == "multiplier":
        kw["block_multiplier"] = BlockMultiplier(torch.rand(b, ni, nt, device="cuda") * 2, query_start=nt, key_start=0)
    if extra == "tags":
        kw["tags"] = iidkern.instruction_tags(n, image=(nt, n), instructions=[(7, 100), (100, 250), (250, 333)],
                                              region_masks=torch.rand(b, 3, ni, device="cuda") > 0.5,
                                              always_visible=[(0, 7)], device="cuda")
    res = iidkern.attention(q, k, v, layout="bnhd", probes=[probe], kernel_options={"poison": True}, **kw)
    ref = attention_reference(q, k, v, layout="bnhd", probes=[probe], compute_dtype=torch.float64, **kw)
    assert_close_rel(res.out, ref.out, OUT_TOL[dtype] if dtype != torch.float32 else 1e-4)
    assert_close_rel(res.probes[0], ref.probes[0], GPU_PROBE_TOL, what="fused probe")


@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 64), (torch.float16, 64), (torch.bfloat16, 128)])
@pytest.mark.parametrize("n_img", [4096, 4083])
def test_key_group_probe_in_image_first_layout(probe_pass_calls, dtype, d, n_img):
    """SD3's [image; text] order: the instruction keys come last. 333 + 4096 tokens leave a
    ragged last key tile holding text keys (summed in the kernel's one-tile tail loop; the
    old tail code gave an illegal address or NaN sums here, NOTES.md 25); 333 + 4083 =
    4416 tokens end on a whole tile. Both ride in the main pass."""
    b, h, nt = 1, 4, 333
    n = n_img + nt
    q, k, v = qkv(b, h, n, n, d, dtype, "bhnd", seed=10)
    instr = torch.full((n,), -1, dtype=torch.int32, device="cuda")
    instr[n_img:n_img + 111], instr[n_img + 111:n_img + 222], instr[n_img + 222:] = 0, 1, 2
    probes = [Probe(TG.each(0, n_img), TG.ids(instr, 3, span=(n_img, n)), heads="keep", normalize="keys"),
              Probe(TG.each(n_img, n), TG.each(0, n_img), heads="mean")]
    res = iidkern.attention(q, k, v, probes=probes, kernel_options={"poison": True})
    ref = attention_reference(q, k, v, probes=probes, compute_dtype=torch.float64)
    assert not any(p is probes[0] for p in probe_pass_calls)  # fused, ragged last tile or not
    assert_close_rel(res.out, ref.out, OUT_TOL[dtype])
    for i, (got, want) in enumerate(zip(res.probes, ref.probes)):
        assert_close_rel(got, want, GPU_PROBE_TOL, what=f"probe {i}")


@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 64), (torch.bfloat16, 128)])
def test_value_probe_with_a_ragged_last_key_tile(dtype, d):
    """The value probe's accumulator is also updated in the ragged last key tile (a one-tile
    loop of its own, NOTES.md 25): 4429 tokens, image first, signal on the text keys."""
    b, h, nt, ni = 1, 4, 333, 4096
    n = ni + nt
    q, k, v = qkv(b, h, n, n, d, dtype, "bhnd", seed=11)
    x = torch.zeros(b, n, 3, device="cuda")
    x[:, ni:] = torch.rand(b, nt, 3, device="cuda")
    probes = [ValueProbe(x, TG.each(0, ni), heads="keep")]
    res = iidkern.attention(q, k, v, probes=probes, kernel_options={"poison": True})
    ref = attention_reference(q, k, v, probes=probes, compute_dtype=torch.float64)
    assert_close_rel(res.out, ref.out, OUT_TOL[dtype])
    assert_close_rel(res.probes[0], ref.probes[0], GPU_PROBE_TOL, what="value probe")


def test_pair_stats_large():
    q, k, v = qkv(2, 24, 1000, 1000, 128, torch.bfloat16, "bnhd", seed=5)
    res = iidkern.attention(q, k, v, layout="bnhd", pair_stats=[(0, 1)])
    o = res.out.double()
    dot = (o[0] * o[1]).sum((0, 2))
    assert torch.allclose(res.pair_stats.dot[0].double(), dot, rtol=1e-4, atol=1e-3)


def test_default_config_is_used():
    cfg = default_config(128, torch.bfloat16)
    q, k, v = qkv(1, 1, 300, 300, 128, torch.bfloat16, "bhnd", seed=6)
    res = iidkern.attention(q, k, v, count_tiles=True)
    assert res.tile_shape == (cfg["BLOCK_M"], cfg["BLOCK_N"])


def test_cuda_extension_matches_torch_tile_classification():
    from iidkern._ext import cuda_ext
    from iidkern.kernels.tiles import classify_tiles

    if cuda_ext is None:
        pytest.skip("the optional CUDA extension (csrc/) is not built here")
    g = torch.Generator().manual_seed(9)
    qt, kt = random_tags(3, 1000, generator=g).cuda(), random_tags(3, 777, generator=g).cuda()
    for bm, bn in [(128, 64), (64, 64), (16, 32)]:
        skip, full = cuda_ext.classify_tiles(qt, kt, bm, bn)
        ref_skip, ref_full = classify_tiles(qt, kt, bm, bn)
        assert torch.equal(skip, ref_skip) and torch.equal(full, ref_full)


def test_fast_launch_matches_triton_launch_path(monkeypatch):
    """The cached compiled-kernel launch (kernels/fast_launch.py) gives bit-identical results
    to Triton's own launch path, also when a later call's tensors are not 16-byte aligned
    (a different specialization, which must not reuse the aligned kernel)."""
    from iidkern.kernels import launch
    b, h, n, d = 1, 4, 700, 128
    buf = torch.randn(3 * b * n * h * d + 8, device="cuda", dtype=torch.bfloat16)
    size = b * n * h * d

    def views(offset):
        return [buf[offset + i * size: offset + (i + 1) * size].view(b, n, h, d) for i in range(3)]
    instr = torch.full((n,), -1, dtype=torch.int32, device="cuda")
    instr[:50], instr[50:90] = 0, 1
    kw = dict(layout="bnhd", probes=[Probe(TG.each(100, n), TG.ids(instr, 2, span=(0, 90)), heads="keep"),
                                     Probe(TG.each(0, 100), TG.each(100, n), heads="mean")],
              pair_stats=None, return_lse=True)
    for offset in (0, 1):  # aligned, then 2-byte offset views with the same shapes and strides
        q, k, v = views(offset)
        assert (q.data_ptr() % 16 == 0) == (offset == 0)
        fast = [iidkern.attention(q, k, v, **kw) for _ in range(2)]  # 2nd call takes the cached kernel
        for wrapped in (launch._ATTN, launch._PROBE):
            monkeypatch.setattr(wrapped, "enabled", False)
        slow = iidkern.attention(q, k, v, **kw)
        for wrapped in (launch._ATTN, launch._PROBE):
            monkeypatch.setattr(wrapped, "enabled", True)
        for got in fast:
            assert torch.equal(got.out, slow.out) and torch.equal(got.lse, slow.lse)
            for a, c in zip(got.probes, slow.probes):
                assert torch.equal(a, c)
        ref = attention_reference(q, k, v, layout="bnhd", probes=kw["probes"], compute_dtype=torch.float64)
        assert_close_rel(fast[1].out, ref.out, OUT_TOL[torch.bfloat16])
    assert launch._ATTN._cache, "the fast path was never taken"


def _views_at(b, h, n, d, dtype, layout, offset, seed):
    """q, k, v as views into one buffer, ``offset`` elements past a 16-byte boundary."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    size = b * h * n * d
    buf = torch.randn(3 * size + offset, generator=g, device="cuda", dtype=torch.float32).to(dtype)
    shape = (b, h, n, d) if layout == "bhnd" else (b, n, h, d)
    return tuple(buf[offset + i * size: offset + (i + 1) * size].view(shape) for i in range(3))


@pytest.mark.parametrize("d, dtype, options", [(128, torch.bfloat16, None), (128, torch.float16, {"hopper": False}),
                                               (64, torch.bfloat16, None), (64, torch.float16, None),
                                               (96, torch.float32, None)])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("offset", [0, 1])
def test_replayed_plain_calls_match_the_checked_path(monkeypatch, d, dtype, options, layout, offset):
    """Repeat plain calls replay the first call's launch (kernels/replay.py) on the Hopper
    kernel (D=128 on an H100, from launch.HOPPER_MIN_KEYS keys) or the Triton kernel, aligned
    or not: fresh inputs each call, results against the reference and bit-identical to the
    checked path on the same tensors."""
    import importlib
    api = importlib.import_module("iidkern.attention")
    b, h, n = 2, 3, 1100
    for seed in range(3):
        q, k, v = _views_at(b, h, n, d, dtype, layout, offset, seed)
        assert (q.data_ptr() % 16 == 0) == (offset == 0)
        out = iidkern.attention(q, k, v, layout=layout, kernel_options=options)
        ref = attention_reference(q, k, v, layout=layout, compute_dtype=torch.float64).out
        assert_close_rel(out, ref, OUT_TOL[dtype] if dtype != torch.float32 else 1e-4)
    assert len(api._REPLAYS) == 1
    monkeypatch.setattr(api, "_REPLAY", False)
    assert torch.equal(out, iidkern.attention(q, k, v, layout=layout, kernel_options=options))


@pytest.mark.parametrize("d, n", [(128, 600), (128, 1100), (64, 600)])
def test_replays_inside_a_cuda_graph(d, n):
    """Replayed calls captured in a CUDA graph read the captured inputs on every graph replay
    (D=128 at 600 keys: the Triton kernel's short-key tiles; at 1100: the Hopper kernel on an H100)."""
    b, h, layout = 1, 4, "bnhd"
    sets = [qkv(b, h, n, n, d, torch.bfloat16, layout, seed=s) for s in range(2)]
    iidkern.attention(*sets[0], layout=layout)  # recorded here; the captured calls are replays
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for s in sets:
            iidkern.attention(*s, layout=layout)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [iidkern.attention(*s, layout=layout) for s in sets]
    for round_ in range(2):
        if round_:
            for s in sets:
                for t in s:
                    t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        for s, out in zip(sets, outs):
            ref = attention_reference(*s, layout=layout, compute_dtype=torch.float64).out
            assert_close_rel(out, ref, OUT_TOL[torch.bfloat16])


def test_inside_torch_compile():
    """A compiled function (inductor) around ``iidkern.attention``: the call is opaque to
    dynamo and runs eagerly at a graph break; plain calls (recorded, then replayed) and a probe
    call give the eager results."""
    q, k, v = qkv(2, 4, 1500, 1500, 128, torch.bfloat16, "bnhd", seed=5)
    probe = Probe(TG.each(100, 1500), TG.segments([(0, 50), (50, 100)], 1500, device="cuda"), heads="keep")

    def f(q, k, v):
        out = iidkern.attention(q * 0.5, k, v, layout="bnhd")
        res = iidkern.attention(q, k, v, layout="bnhd", probes=[probe])
        return out + 1, res.probes[0]
    compiled = torch.compile(f)
    for _ in range(3):
        out, probe_map = compiled(q, k, v)
        want_out, want_map = f(q, k, v)
        assert_close_rel(out, want_out, 1e-3)  # inductor's "+ 1" may round unlike eager's
        assert torch.equal(probe_map, want_map)
    torch._dynamo.reset()


def test_autocast_does_not_change_results():
    """Under CUDA autocast a call computes exactly as outside it (the fp32 steps around the
    kernels, value-probe and query-group folding, are not rounded to 16 bits)."""
    q, k, v = qkv(2, 4, 1200, 1100, 128, torch.bfloat16, "bhnd", seed=9)
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(2, 1100, 5, generator=g, device="cuda")
    probes = [Probe(TG.each(100, 1200), TG.segments([(0, 40), (40, 100)], 1100, device="cuda"), heads="keep"),
              Probe(TG.segments([(0, 300), (300, 1200)], 1200, device="cuda"), TG.each(0, 100), heads="mean"),
              ValueProbe(x, TG.segments([(0, 600), (600, 1200)], 1200, device="cuda"))]
    plain = iidkern.attention(q, k, v, probes=probes, return_lse=True)
    with torch.autocast("cuda", dtype=torch.float16):
        auto = iidkern.attention(q, k, v, probes=probes, return_lse=True)
    assert torch.equal(auto.out, plain.out) and torch.equal(auto.lse, plain.lse)
    for a, p in zip(auto.probes, plain.probes):
        assert torch.equal(a, p)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_probe_results_are_bitwise_repeatable(dtype):
    """Probe results are deterministic: the same call twice gives the same bits, for every
    kind (fused key groups with grouped queries, the probe pass, value probes), whose host
    folding of query groups must not add in the order atomics land."""
    q, k, v = qkv(2, 4, 1200, 1100, 128 if dtype != torch.float32 else 64, dtype, "bnhd", seed=21)
    g = torch.Generator(device="cuda").manual_seed(5)
    qgroups = TG.ids(torch.randint(-1, 7, (2, 1200), generator=g, device="cuda", dtype=torch.int32), 7, span=(0, 1200))
    probes = [Probe(qgroups, TG.segments([(0, 40), (40, 100)], 1100, device="cuda"), heads="keep"),
              Probe(qgroups, TG.each(100, 1100), heads="mean"),
              ValueProbe(torch.randn(2, 1100, 5, generator=g, device="cuda"), qgroups, normalize="queries")]
    first = iidkern.attention(q, k, v, layout="bnhd", probes=probes, pair_stats=[(0, 1)])
    for _ in range(3):
        again = iidkern.attention(q, k, v, layout="bnhd", probes=probes, pair_stats=[(0, 1)])
        assert torch.equal(again.out, first.out)
        for a, b in zip(again.probes, first.probes):
            assert torch.equal(a, b)
        assert torch.equal(again.pair_stats.dot, first.pair_stats.dot)
