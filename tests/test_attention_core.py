"""Flash attention forward through the Triton kernel (interpreter on CPU) vs the float64 oracle."""
import math

import pytest
import torch

import iidkern
from iidkern.reference import attention_reference
from helpers import OUT_TOL, assert_close_rel, assert_lse_equal, make_qkv

POISON = {"poison": True}

SHAPES = [  # (B, H, Nq, Nk, D): odd lengths, N = 1, Nq != Nk, several batch/head counts
    (1, 1, 1, 1, 32),
    (2, 3, 17, 17, 64),
    (1, 2, 130, 33, 32),
    (2, 1, 5, 333, 16),
    (3, 2, 45, 29, 96),
]


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_plain_fp32_matches_reference(shape, layout):
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    q, k, v = make_qkv(*shape, layout=layout, generator=g)
    res = iidkern.attention(q, k, v, layout=layout, backend="triton", return_lse=True, kernel_options=POISON)
    ref = attention_reference(q, k, v, layout=layout)
    assert res.out.shape == q.shape and res.out.dtype == q.dtype
    assert_close_rel(res.out, ref.out, OUT_TOL[torch.float32])
    assert_lse_equal(res.lse, ref.lse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_half_dtypes(dtype, layout):
    g = torch.Generator().manual_seed(7)
    q, k, v = make_qkv(2, 2, 37, 51, 64, dtype=dtype, layout=layout, generator=g)
    res = iidkern.attention(q, k, v, layout=layout, backend="triton", return_lse=True, kernel_options=POISON)
    ref = attention_reference(q, k, v, layout=layout)
    assert res.out.dtype == dtype
    assert_close_rel(res.out, ref.out, OUT_TOL[dtype])
    assert_lse_equal(res.lse, ref.lse, tol=1e-3)


@pytest.mark.parametrize("d", [1, 24, 40, 128, 200, 256])
def test_head_dims_padded(d):
    g = torch.Generator().manual_seed(d)
    q, k, v = make_qkv(1, 2, 19, 23, d, generator=g)
    out = iidkern.attention(q, k, v, backend="triton", kernel_options=POISON)
    assert_close_rel(out, attention_reference(q, k, v).out, OUT_TOL[torch.float32])


def test_custom_scale_and_strided_views():
    """Inputs that are views into a fused projection (non-contiguous except the last dim)."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 41, 3, 4, 32, generator=g)  # [B, N, 3, H, D] like a fused qkv projection
    q, k, v = qkv.unbind(2)  # each [B, N, H, D] with token stride 3*H*D
    assert not q.is_contiguous()
    out = iidkern.attention(q, k, v, layout="bnhd", scale=0.3, backend="triton", kernel_options=POISON)
    ref = attention_reference(q, k, v, layout="bnhd", scale=0.3)
    assert_close_rel(out, ref.out, OUT_TOL[torch.float32])


def test_kernel_tile_shapes_agree():
    g = torch.Generator().manual_seed(11)
    q, k, v = make_qkv(1, 2, 70, 90, 32, generator=g)
    a = iidkern.attention(q, k, v, backend="triton", kernel_options={"BLOCK_M": 16, "BLOCK_N": 32, "poison": True})
    b = iidkern.attention(q, k, v, backend="triton", kernel_options={"BLOCK_M": 32, "BLOCK_N": 16, "poison": True})
    assert_close_rel(a, b, 1e-5)
    want = attention_reference(q, k, v, compute_dtype=torch.float64).out
    assert_close_rel(a, want, OUT_TOL[torch.float32])


def test_auto_backend_on_cpu_is_reference():
    g = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(1, 2, 9, 9, 16, generator=g)
    out = iidkern.attention(q, k, v)  # backend="auto"
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert_close_rel(out, ref, 1e-5)


def test_reference_backend_matches_sdpa_both_layouts():
    g = torch.Generator().manual_seed(6)
    q, k, v = make_qkv(2, 3, 12, 14, 8, layout="bnhd", generator=g)
    out = iidkern.attention(q, k, v, layout="bnhd", backend="reference")
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert_close_rel(out, ref.transpose(1, 2), 1e-5)


def test_plain_call_returns_tensor_extras_return_result():
    q, k, v = make_qkv(1, 1, 4, 4, 16)
    out = iidkern.attention(q, k, v, backend="triton", kernel_options={"poison": True})
    assert isinstance(out, torch.Tensor)
    assert_close_rel(out, attention_reference(q, k, v, compute_dtype=torch.float64).out, OUT_TOL[torch.float32])
    res = iidkern.attention(q, k, v, backend="triton", return_lse=True, kernel_options={"poison": True})
    assert isinstance(res, iidkern.AttentionResult) and res.lse.shape == (1, 1, 4)
    assert res.lse.dtype == torch.float32
    expected = torch.logsumexp((q @ k.transpose(-1, -2)) / math.sqrt(16), -1)
    assert torch.allclose(res.lse, expected, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_autocast_does_not_change_results(backend):
    """Under autocast (a 16-bit region of a caller's model) a call computes exactly as outside
    it: fp32 inputs keep fp32 math, also in the fp32 steps around the kernels (the reference
    backend, probe folding, value probes), which autocast would otherwise round to bf16."""
    from iidkern import Probe, TokenGroups as TG, ValueProbe
    g = torch.Generator().manual_seed(8)
    q, k, v = make_qkv(2, 3, 70, 61, 16, generator=g)
    x = torch.randn(2, 61, 5, generator=g)
    probes = [Probe(TG.each(20, 70), TG.segments([(0, 10), (10, 20)], 61), heads="keep"),
              Probe(TG.segments([(20, 45), (45, 70)], 70), TG.each(0, 20), heads="mean"),
              ValueProbe(x, TG.segments([(0, 30), (30, 70)], 70))]
    kw = dict(probes=probes, backend=backend, return_lse=True, head_weights=1 + torch.rand(2, 3, generator=g))
    plain = iidkern.attention(q, k, v, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = iidkern.attention(q, k, v, **kw)
    assert torch.equal(auto.out, plain.out) and torch.equal(auto.lse, plain.lse)
    for a, p in zip(auto.probes, plain.probes):
        assert torch.equal(a, p)


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_float32_score_overflow_gives_non_finite_rows(backend, dev):
    """README: scores are float32; a row with a score past float32's range gets NaN or ±inf in its
    output and LSE on every backend (as SDPA does), and the other rows are right. Where the products
    are rounded before the row maximum is taken (the reference, the interpreter), every finite row
    is right; the GPU kernels' fused multiply-add makes no such promise for huge scores (README)."""
    g = torch.Generator().manual_seed(77)
    q, k = torch.randn(1, 2, 9, 16, generator=g), torch.randn(1, 2, 7, 16, generator=g)
    q[:, :, 3:] *= 1e38  # rows 3-8: scores of ~1e38, most past float32's range
    v = torch.randn(1, 2, 7, 16, generator=g)
    res = iidkern.attention(q.to(dev), k.to(dev), v.to(dev), backend=backend, return_lse=True)
    out, lse = res.out.cpu(), res.lse.cpu()
    scores = q.double() @ k.double().transpose(-1, -2) / 4.0
    past = (scores.abs() > torch.finfo(torch.float32).max).any(-1)
    assert past[..., 3:].any() and not past[..., :3].any()
    finite = torch.isfinite(out).all(-1) & torch.isfinite(lse)
    assert not finite[past].any()
    want = torch.softmax(scores, -1) @ v.double()
    err = (out.double() - want).norm(dim=-1) / want.norm(dim=-1)
    assert finite[..., :3].all() and (err[..., :3] < 1e-5).all(), err
    if dev == "cpu":
        assert (err[finite] < 1e-5).all(), err
