"""Tensors on a GPU other than the current one (``cuda:1`` under a current ``cuda:0``).

Triton launches on the current device's current stream whatever device the pointers are on,
so without a device guard such a call would run on the wrong GPU. Needs two GPUs; each call
is checked against the dense float64 oracle on the tensors' own GPU, and the current device
and the other GPU's streams must be left as they were.
"""
import pytest
import torch

import iidkern
from iidkern import BlockMultiplier, Probe, TokenGroups as TG
from iidkern.reference import attention_reference
from helpers import OUT_TOL, assert_close_rel, assert_lse_equal, random_tags

needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


def test_guard_is_taken_only_for_another_gpu(monkeypatch):
    """(CPU) The launches run under ``torch.cuda.device`` exactly when the tensors' GPU is
    not the current one; CPU tensors (the interpreter) and the current GPU need no switch."""
    from iidkern.attention import _on_device
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    guard = _on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(_on_device(torch.device("cuda", 0)), torch.cuda.device)
    assert not isinstance(_on_device(torch.device("cpu")), torch.cuda.device)


def qkv(dev, b, h, n, d, dtype, layout, seed):
    g = torch.Generator(device=dev).manual_seed(seed)
    shape = (b, h, n, d) if layout == "bhnd" else (b, n, h, d)
    return tuple(torch.randn(shape, generator=g, device=dev).to(dtype) for _ in range(3))


@pytest.fixture
def other_gpu():
    """cuda:1 while cuda:0 is current; afterwards cuda:0 must still be current."""
    before = torch.cuda.current_device()
    torch.cuda.set_device(0)
    yield torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0, "the call changed the current device"
    torch.cuda.set_device(before)


@pytest.mark.cuda
@needs_two_gpus
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("n,hopper", [(700, False), (1500, None)])  # Triton kernel; Gluon kernel on sm_90
def test_plain_on_other_gpu(other_gpu, layout, n, hopper):
    q, k, v = qkv(other_gpu, 2, 3, n, 128, torch.bfloat16, layout, seed=n)
    ref = attention_reference(q, k, v, layout=layout, compute_dtype=torch.float64)
    options = {"poison": True} if hopper is None else {"poison": True, "hopper": hopper}
    for _ in range(3):  # the first call records its launches, the next ones replay them
        out = iidkern.attention(q, k, v, layout=layout, kernel_options=options)
        assert out.device == other_gpu
        assert_close_rel(out, ref.out, OUT_TOL[torch.bfloat16])


@pytest.mark.cuda
@needs_two_gpus
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_extras_on_other_gpu(other_gpu, dtype):
    b, h, n, d = 2, 4, 1100, 128 if dtype != torch.float32 else 64
    q, k, v = qkv(other_gpu, b, h, n, d, dtype, "bnhd", seed=7)
    g = torch.Generator().manual_seed(3)
    qt, kt = random_tags(b, n, generator=g).to(other_gpu), random_tags(b, n, generator=g).to(other_gpu)
    hw = (1 + 0.2 * torch.rand(b, h, generator=g)).to(other_gpu)
    mult = BlockMultiplier((2 * torch.rand(b, n - 100, 100, generator=g)).to(other_gpu), 100, 0)
    probes = [Probe(TG.each(100, n), TG.segments([(0, 40), (40, 100)], n, device=other_gpu), heads="keep",
                    normalize="keys"),
              Probe(TG.each(0, 100), TG.each(100, n), heads="mean")]
    kw = dict(layout="bnhd", tags=(qt, kt), head_weights=hw, probes=probes, block_multiplier=mult)
    res = iidkern.attention(q, k, v, **kw, pair_stats=[(0, 1)], return_lse=True, kernel_options={"poison": True})
    ref = attention_reference(q, k, v, **kw, pair_stats=torch.tensor([[0, 1]]), compute_dtype=torch.float64)
    tol = OUT_TOL[dtype] if dtype != torch.float32 else 1e-4
    assert res.out.device == other_gpu
    assert_close_rel(res.out, ref.out, tol)
    assert_lse_equal(res.lse, ref.lse, tol=1e-3)
    for got, want in zip(res.probes, ref.probes):
        assert got.device == other_gpu
        assert_close_rel(got, want, 2e-3, what="probe")
    assert_close_rel(res.pair_stats.dot, ref.pair_stats.dot, 2e-2, what="pair dot")


@pytest.mark.cuda
@needs_two_gpus
def test_other_gpu_stream_order(other_gpu):
    """The launches go on the tensors' GPU's current stream: work queued there before the
    call (a long wait, then v doubled) is done before the kernels read v, as for a torch op."""
    q, k, v = qkv(other_gpu, 1, 8, 4096, 128, torch.bfloat16, "bhnd", seed=11)
    ref = attention_reference(q, k, 2 * v, compute_dtype=torch.float64)
    for _ in range(3):  # recorded, then replayed
        with torch.cuda.device(other_gpu):
            torch.cuda._sleep(50_000_000)  # tens of ms of GPU time on cuda:1's stream
        v2 = v * 2
        out = iidkern.attention(q, k, v2)
        assert_close_rel(out, ref.out, OUT_TOL[torch.bfloat16])


@pytest.mark.cuda
@needs_two_gpus
def test_iid_pipeline_on_other_gpu(other_gpu):
    """The tiny IID pipeline (probes at step S, tag masks after it) with its model on cuda:1
    matches the reference backend there."""
    from iidkern.edit.codec import demo_picture
    from iidkern.edit.iid import IIDConfig
    from iidkern.edit.models import EditModel
    from iidkern.edit.pipeline import iid_edit

    cfg = IIDConfig(sigma=0.0, threshold="top", threshold_value=0.3)
    out = {}
    for backend in ("triton", "reference"):
        model = EditModel.tiny("concat", device=other_gpu, backend=backend)
        out[backend] = iid_edit(model, demo_picture(128), ["make the sky red", "add a tree"], num_steps=6, seed=1,
                                config=cfg, progress=False)
    err = (out["triton"].latents - out["reference"].latents).norm() / out["reference"].latents.norm()
    assert err < 1e-3, f"triton vs reference latents on cuda:1 differ by {err:.2e}"


@pytest.mark.cuda
@needs_two_gpus
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_branch_pair_stats_on_other_gpu(other_gpu, layout):
    """HeadRouter's pair pass over an output on cuda:1 (the same-call DTR's weighted output)
    runs there and equals the PyTorch statistics."""
    from iidkern.edit.headrouter import branch_pair_stats
    out = qkv(other_gpu, 3, 4, 300, 128, torch.bfloat16, layout, seed=9)[0]
    pairs = ((0, 1), (2, 0))
    got = branch_pair_stats(out, pairs, layout, backend="triton")
    expected = branch_pair_stats(out, pairs, layout, backend="reference")
    for name in ("dot", "norm0_sq", "norm1_sq"):
        assert getattr(got, name).device == other_gpu
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=1e-5, atol=1e-3)
