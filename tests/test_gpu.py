"""The engine suite at real sizes on a CUDA GPU (compiled Triton, not the interpreter).

Skipped on CPU. Reference: the dense oracle on the same GPU in float32/float64.
"""
import pytest
import torch

import iidkern
from iidkern import BlockMultiplier, Probe, TokenGroups as TG, ValueProbe
from iidkern.kernels.launch import default_config
from iidkern.reference import attention_reference
from helpers import OUT_TOL, assert_close_rel, assert_lse_equal, random_tags

pytestmark = pytest.mark.cuda
GPU_PROBE_TOL = 2e-3  # probe recompute uses bf16/fp16 tensor-core products like the main pass


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
    bm, bn = res.tile_shape
    allowed = iidkern.allowed_pairs(qt, kt)
    mt, nt = -(-n // bm), -(-n // bn)
    pad = torch.zeros(b, mt * bm, nt * bn, dtype=torch.bool, device="cuda")
    pad[:, :n, :n] = allowed
    expected = pad.view(b, mt, bm, nt, bn).any(4).any(2).sum(-1)
    assert torch.equal(res.tiles_visited, expected[:, None].expand_as(res.tiles_visited).int())


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
