"""The Hopper (sm_90) Gluon kernel of kernels/hopper_fwd.py and the routing to it.

Gluon does not run under Triton's interpreter, so on CPU this file compiles the kernel for
sm_90 (it must build on every Triton the package supports) and tests which calls are routed
to it; its results are tested on an H100 against the float64 reference (``cuda`` tests).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import iidkern
from iidkern import BlockMultiplier, Probe, TokenGroups as TG
from iidkern.kernels import hopper_fwd, launch
from iidkern.reference import attention_reference
from helpers import OUT_TOL, assert_close_rel, assert_lse_equal, make_qkv

needs_gluon = pytest.mark.skipif(not hopper_fwd.AVAILABLE, reason="this Triton has no Gluon warp_specialize")


def _on_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and hopper_fwd.AVAILABLE


needs_hopper = pytest.mark.skipif(not _on_hopper(), reason="needs an sm_90 GPU (H100) and Triton's Gluon")


# --------------------------------------------------------------------------- compiles (CPU)
@pytest.fixture(scope="module")
def compiled_variants():
    """Every kernel variant compiled for sm_90 in a non-interpreting child process."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "hopper_compile.py")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


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


def test_only_tritons_with_the_gluon_api_it_was_written_for_enable_it():
    assert hopper_fwd.triton_supports_gluon_kernel("3.6.0")
    assert hopper_fwd.triton_supports_gluon_kernel("3.10.0+git1234")
    assert not hopper_fwd.triton_supports_gluon_kernel("3.5.1")
    assert not hopper_fwd.triton_supports_gluon_kernel("2.3.0")
    assert not hopper_fwd.triton_supports_gluon_kernel("unknown")


# --------------------------------------------------------------------------- routing (CPU)
@pytest.fixture
def hopper_pretend(monkeypatch):
    """Routing as on an H100: the kernel usable, the interpreter off."""
    monkeypatch.setattr(launch, "_INTERPRET", False)
    monkeypatch.setattr(hopper_fwd, "usable", lambda q, k, v, layout: True)


def _serves(q, **kw):
    args = dict(tags=None, probes=(), block_multiplier=None, count_tiles=False, kernel_options=None)
    args.update(kw)
    return launch._hopper_serves(q, q, q, "bhnd", **args)


def test_plain_calls_are_routed_to_the_hopper_kernel(hopper_pretend):
    q = torch.randn(1, 2, 64, 128)
    assert _serves(q)
    assert _serves(q, kernel_options={"poison": True, "PROBE_BLOCK_M": 32})


@pytest.mark.parametrize("extra", ["tags", "probes", "block_multiplier", "count_tiles", "hopper=False",
                                   "BLOCK_M", "num_warps", "maxnreg", "warp_specialize"])
def test_tile_level_extras_and_triton_options_keep_the_triton_kernel(hopper_pretend, extra):
    q = torch.randn(1, 2, 64, 128)
    kw = {"tags": dict(tags=object()), "probes": dict(probes=(object(),)),
          "block_multiplier": dict(block_multiplier=object()), "count_tiles": dict(count_tiles=True),
          "hopper=False": dict(kernel_options={"hopper": False})}.get(extra, dict(kernel_options={extra: 64}))
    assert not _serves(q, **kw)


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
    iidkern.attention(q, q, q, backend="triton")
    assert seen["head_weights"] is None and seen["head_weight_strides"] == (0, 0, 0)


def test_interpreter_never_routes_to_gluon():
    q = torch.randn(1, 2, 64, 128)
    assert launch._INTERPRET or not q.is_cuda
    assert not launch._hopper_serves(q, q, q, "bhnd", None, (), None, False, None)


# --------------------------------------------------------------------------- results (H100)
@pytest.fixture
def hopper_calls(monkeypatch):
    """Counts the calls that run the Hopper kernel."""
    calls = []
    original = hopper_fwd.hopper_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("layout"))
        return original(*args, **kwargs)
    monkeypatch.setattr(hopper_fwd, "hopper_attention", spy)
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


@pytest.mark.cuda
@needs_hopper
def test_extras_of_the_triton_kernel_and_the_switch_keep_it(hopper_calls):
    b, h, n = 1, 4, 600
    q, k, v = _qkv(b, h, n, n, torch.bfloat16, "bhnd", seed=12)
    plain = iidkern.attention(q, k, v)
    assert hopper_calls == ["bhnd"]
    triton_out = iidkern.attention(q, k, v, kernel_options={"hopper": False})
    iidkern.attention(q, k, v, probes=[Probe(TG.each(0, 100), TG.each(100, n), heads="mean")])
    iidkern.attention(q, k, v, block_multiplier=BlockMultiplier(torch.rand(b, 50, 60, device="cuda"), 0, 100))
    iidkern.attention(q, k, v, kernel_options={"BLOCK_M": 64})
    assert hopper_calls == ["bhnd"]
    assert_close_rel(plain, triton_out, OUT_TOL[torch.bfloat16])


@pytest.mark.cuda
@needs_hopper
def test_repeat_calls_take_the_cached_launch_with_fresh_descriptors(hopper_calls, monkeypatch):
    """The second call of a shape skips Triton's launch path (fast_launch.Launcher); its TMA
    descriptors must still point at the new tensors."""
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
        outs.append(iidkern.attention(q, k, v, layout="bnhd", kernel_options={"poison": True}))
        refs.append(attention_reference(q, k, v, layout="bnhd", compute_dtype=torch.float64).out)
    assert len(hopper_calls) == 3
    assert len(slow) == (1 if fast_launch.Launcher(kernel).enabled else 3)
    for out, ref in zip(outs, refs):
        assert_close_rel(out, ref, OUT_TOL[torch.float16])
