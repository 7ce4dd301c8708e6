"""Replayed plain calls (kernels/replay.py, the signature in iidkern/attention.py).

The first plain call of a signature runs the checked path and records its one launch; later
calls with that signature replay it on their own tensors. On CPU the replays run the Triton
kernel under the interpreter; the Hopper route is checked argument by argument with a
stand-in kernel (its results are tested on the H100 in test_hopper_fwd.py / test_gpu.py).
"""
import gc
import importlib
import threading
import weakref

import pytest
import torch

import iidkern
from iidkern import Probe, TokenGroups as TG
from iidkern.kernels import fast_launch, hopper_fwd, launch, replay
from iidkern.reference import attention_reference
from helpers import OUT_TOL, assert_close_rel, make_qkv, random_tags

api = importlib.import_module("iidkern.attention")
TOL = {torch.float32: 1e-5, torch.float16: OUT_TOL[torch.float16], torch.bfloat16: OUT_TOL[torch.bfloat16]}


@pytest.fixture
def checked_calls(monkeypatch):
    """How many calls reached the kernels' checked host path (launch.triton_attention)."""
    calls = []
    original = launch.triton_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("layout"))
        return original(*args, **kwargs)
    monkeypatch.setattr(launch, "triton_attention", spy)
    monkeypatch.setattr(importlib.import_module("iidkern.kernels"), "triton_attention", spy)
    return calls


def _call(q, k, v, **kw):
    return iidkern.attention(q, k, v, backend="triton", **{"kernel_options": {"poison": True}, **kw})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("b, h, nq, nk, d", [(1, 1, 17, 17, 16), (2, 3, 45, 29, 24), (3, 2, 1, 50, 8)])
def test_repeat_plain_calls_replay_the_first_launch(checked_calls, dtype, layout, b, h, nq, nk, d):
    g = torch.Generator().manual_seed(nq * 100 + nk)
    for i in range(3):  # fresh inputs each time: a replay must read this call's tensors
        q, k, v = make_qkv(b, h, nq, nk, d, dtype, layout, generator=g)
        out = _call(q, k, v, layout=layout, scale=0.3)
        ref = attention_reference(q, k, v, layout=layout, scale=0.3, compute_dtype=torch.float64).out
        assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
        assert_close_rel(out, ref, TOL[dtype])
    assert checked_calls == [layout]  # the 2nd and 3rd calls were replays
    assert len(api._REPLAYS) == 1


def _views(kind, dtype=torch.float32):
    """q, k, v of shape [2, 3, 40, 16] in bhnd layout, laid out in several ways."""
    if kind == "contiguous":
        return make_qkv(2, 3, 40, 40, 16, dtype)
    if kind == "transposed":  # [B, N, H, D] storage read as bhnd
        return tuple(t.transpose(1, 2) for t in make_qkv(2, 3, 40, 40, 16, dtype, layout="bnhd"))
    if kind == "unaligned":  # one element past a 16-byte boundary
        buf = torch.randn(3 * 2 * 3 * 40 * 16 + 1, dtype=dtype)
        size = 2 * 3 * 40 * 16
        return tuple(buf[1 + i * size: 1 + (i + 1) * size].view(2, 3, 40, 16) for i in range(3))
    if kind == "self":  # one tensor as q, k and v
        q = make_qkv(2, 3, 40, 40, 16, dtype)[0]
        return q, q, q
    raise ValueError(kind)


@pytest.mark.parametrize("first, second", [("contiguous", "transposed"), ("contiguous", "unaligned"),
                                           ("self", "contiguous"), ("contiguous", "self")])
def test_a_different_layout_in_memory_or_aliasing_is_a_new_signature(checked_calls, first, second):
    for kind in (first, second, first, second):
        q, k, v = _views(kind)
        ref = attention_reference(q, k, v, compute_dtype=torch.float64).out
        assert_close_rel(_call(q, k, v), ref, TOL[torch.float32])
    assert len(checked_calls) == 2 and len(api._REPLAYS) == 2


@pytest.mark.parametrize("change", ["dtype", "n_keys", "heads", "layout", "scale", "scale_type", "poison", "hopper",
                                    "backend"])
def test_every_argument_is_part_of_the_signature(checked_calls, change):
    q, k, v = make_qkv(2, 3, 33, 33, 16)
    kw = dict(layout="bhnd", scale=0.25, backend="triton", kernel_options={"poison": True})
    iidkern.attention(q, k, v, **kw)
    if change == "dtype":
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    elif change == "n_keys":
        k, v = k[:, :, :20], v[:, :, :20]
    elif change == "heads":
        q, k, v = (t[:, :2] for t in (q, k, v))
    elif change == "layout":
        kw["layout"] = "bnhd"  # [2, 3, 33, 16] read as B=2, N=3, H=33
    elif change == "scale":
        kw["scale"] = 0.5
    elif change == "scale_type":
        kw["scale"] = 1
        iidkern.attention(q, k, v, **{**kw, "scale": 1.0})
    elif change == "poison":
        kw["kernel_options"] = {"poison": False}
    elif change == "hopper":
        kw["kernel_options"] = {"poison": True, "hopper": False}
    else:
        kw["backend"] = "auto"  # the reference on CPU: no replay
    out = iidkern.attention(q, k, v, **kw)
    ref = attention_reference(q, k, v, layout=kw["layout"], scale=kw["scale"], compute_dtype=torch.float64).out
    assert_close_rel(out, ref, TOL[q.dtype])
    if change == "backend":
        assert len(checked_calls) == 1 and len(api._REPLAYS) == 1
    else:
        assert len(checked_calls) == 2 + (change == "scale_type") and len(api._REPLAYS) == len(checked_calls)


@pytest.mark.parametrize("bad, error, words", [
    ("v_dtype", TypeError, "share a dtype"),
    ("k_head_dim", ValueError, "head dims differ"),
    ("scale_bool", ValueError, "scale must be"),
    ("scale_nan", ValueError, "scale must be"),
    ("layout", ValueError, "layout must be"),
    ("q_not_a_tensor", TypeError, "q must be a torch.Tensor"),
    ("option", TypeError, "kernel_options must be a dict"),
    ("layout_list", ValueError, "layout must be"),  # unhashable: must not fail in the signature lookup
    ("backend_list", ValueError, "backend must be"),
    ("scale_list", ValueError, "scale must be"),
])
def test_bad_inputs_are_still_rejected_once_a_signature_replays(bad, error, words):
    q, k, v = make_qkv(1, 2, 30, 30, 16)
    for _ in range(2):
        iidkern.attention(q, k, v, backend="triton", scale=1.0)
    assert len(api._REPLAYS) == 1
    kw = dict(backend="triton", scale=1.0)
    if bad == "v_dtype":
        v = v.half()
    elif bad == "k_head_dim":
        k = torch.randn(1, 2, 30, 8)
    elif bad == "scale_bool":
        kw["scale"] = True  # equal to 1.0 and hashes like it
    elif bad == "scale_nan":
        kw["scale"] = float("nan")
    elif bad == "layout":
        kw["layout"] = "nhd"
    elif bad == "q_not_a_tensor":
        q = q.numpy()
    elif bad == "layout_list":
        kw["layout"] = ["bhnd"]
    elif bad == "backend_list":
        kw["backend"] = ["triton"]
    elif bad == "scale_list":
        kw["scale"] = [1.0]
    else:
        kw["kernel_options"] = [("poison", True)]
    with pytest.raises(error, match=words):
        iidkern.attention(q, k, v, **kw)


def test_tensor_subclasses_take_the_checked_path(checked_calls):
    q, k, v = make_qkv(1, 2, 30, 30, 16)
    params = [torch.nn.Parameter(t, requires_grad=False) for t in (q, k, v)]
    for _ in range(2):
        out = iidkern.attention(*params, backend="triton")
    assert_close_rel(out, attention_reference(q, k, v, compute_dtype=torch.float64).out, TOL[torch.float32])
    assert len(checked_calls) == 2 and not api._REPLAYS


@pytest.mark.parametrize("extra", ["return_lse", "head_weights", "probes", "probe_alone", "tags", "count_tiles",
                                   "pair_stats", "block_option"])
def test_calls_with_extras_are_never_replayed(checked_calls, extra):
    b, h, n = 2, 2, 32
    q, k, v = make_qkv(b, h, n, n, 16)
    kw = {"return_lse": dict(return_lse=True), "head_weights": dict(head_weights=torch.rand(h)),
          "probes": dict(probes=[Probe(TG.each(0, 8), TG.each(8, n))]),
          "probe_alone": dict(probes=Probe(TG.each(0, 8), TG.each(8, n))),
          "tags": dict(tags=(random_tags(b, n), random_tags(b, n))), "count_tiles": dict(count_tiles=True),
          "pair_stats": dict(pair_stats=[(0, 1)]), "block_option": dict(kernel_options={"BLOCK_M": 16})}[extra]
    for _ in range(2):
        iidkern.attention(q, k, v, backend="triton", **kw)
    assert len(checked_calls) == 2 and not api._REPLAYS


def test_function_transforms_take_the_checked_path():
    """torch.func's wrapper tensors have no storage (no data pointer): no signature, and the
    reference backend still serves them."""
    q = torch.randn(3, 1, 2, 20, 8)
    out = torch.vmap(lambda x: iidkern.attention(x, x, x, backend="reference"))(q)
    ref = torch.stack([attention_reference(x, x, x).out for x in q])
    torch.testing.assert_close(out, ref)
    assert not api._REPLAYS


# --------------------------------------------------------------------------- recorded launches
class _StandInKernel:
    """Accepts any launch and runs nothing (a ``JITFunction`` stand-in)."""
    params = ()

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _same_argument(a, b, tensors_a, tensors_b):
    """``a`` (one call's argument) matches ``b`` (another's) once each call's own tensors
    (q, k, v, out) are paired up."""
    if isinstance(a, torch.Tensor):
        own = [i for i, t in enumerate(tensors_a) if a is t]
        return (b is tensors_b[own[0]]) if own else (b is a)
    if replay._is_descriptor(a):
        return _same_argument(a.base, b.base, tensors_a, tensors_b) and type(a) is type(b) and \
            {f: x for f, x in vars(a).items() if f != "base"} == {f: x for f, x in vars(b).items() if f != "base"}
    return type(a) is type(b) and a == b


@pytest.fixture(params=["triton", "hopper"])
def route(request, monkeypatch):
    """Plain calls routed to the Triton kernel (interpreted) or, with a stand-in kernel, to the
    Hopper kernel's launch (its host side is plain Python)."""
    if request.param == "hopper":
        if not hopper_fwd.AVAILABLE:
            pytest.skip("this Triton has no Gluon warp_specialize")
        monkeypatch.setattr(launch, "_INTERPRET", False)
        monkeypatch.setattr(hopper_fwd, "usable", lambda q, k, v, layout, in_kernel_extras=False: True)
        monkeypatch.setattr(launch, "short_plain_config", lambda *args: None)  # short calls too (small shapes)
        stand_in = fast_launch.Launcher(_StandInKernel())
        monkeypatch.setattr(hopper_fwd, "_ATTN_HOPPER", stand_in)
        return stand_in, torch.bfloat16, 128
    return launch._ATTN, torch.float32, 16


def test_a_replay_keeps_no_reference_to_the_first_calls_tensors(route):
    launcher, dtype, d = route
    q, k, v = make_qkv(1, 2, 30, 30, d, dtype)
    out = iidkern.attention(q, k, v, backend="triton")
    (rep,) = api._REPLAYS.values()
    assert rep.launcher is launcher
    alive = [weakref.ref(t) for t in (q, k, v, out)]
    del q, k, v, out
    gc.collect()
    assert all(r() is None for r in alive)


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_replayed_launch_equals_a_freshly_built_one(route, layout, monkeypatch):
    """Argument for argument, a replay launches what the checked path builds for its tensors."""
    launcher, dtype, d = route
    g = torch.Generator().manual_seed(3)
    first = make_qkv(2, 3, 70, 45, d, dtype, layout, generator=g)
    iidkern.attention(*first, layout=layout, backend="triton")
    (signature, rep), = api._REPLAYS.items()
    assert rep.launcher is launcher and rep.layout == layout
    q, k, v = make_qkv(2, 3, 70, 45, d, dtype, layout, generator=g)
    with fast_launch.recording() as replayed:
        out = iidkern.attention(q, k, v, layout=layout, backend="triton")
    monkeypatch.setattr(api, "_REPLAY", False)
    with fast_launch.recording() as fresh:
        fresh_out = iidkern.attention(q, k, v, layout=layout, backend="triton")
    (l_a, grid_a, args_a, kw_a), = replayed
    (l_b, grid_b, args_b, kw_b), = fresh
    assert l_a is l_b is launcher and grid_a == grid_b and kw_a == kw_b and len(args_a) == len(args_b)
    for a, b in zip(args_a, args_b):
        assert _same_argument(a, b, (q, k, v, out), (q, k, v, fresh_out))
    assert any(a is out for a in args_a)


def test_records_that_cannot_be_replayed_exactly_give_none():
    q, k, v = make_qkv(1, 2, 30, 30, 16)
    out = torch.empty_like(q)
    placeholder, stray = torch.empty(1), torch.empty(1)
    launcher = launch._ATTN
    one = (launcher, (1, 2), (q, k, v, out, placeholder, 7), {"BLOCK": 16})
    make = lambda launches, o=out: replay.LaunchReplay.of(launches, q, k, v, o, (placeholder,), torch.empty, "bhnd")
    assert make([one]) is not None
    assert make([]) is None
    assert make([one, one]) is not None  # a second kernel replays too, after the first
    assert make([(launcher, (1, 2), (q, k, v, out, stray, 7), {})]) is None  # a tensor of this call only
    assert make([one, (launcher, (1, 2), (q, k, v, out, stray, 7), {})]) is None  # in any launch
    assert make([one], torch.empty(30, 16, 2).transpose(0, 2)) is None  # an output that is not contiguous

    class SlotsDescriptor:  # a descriptor class without a __dict__ to copy
        __slots__ = ("base", "block_shape")

        def __init__(self, base):
            self.base, self.block_shape = base, [16, 16]
    assert replay._is_descriptor(SlotsDescriptor(q))
    assert make([(launcher, (1, 2), (SlotsDescriptor(q), k, v, out), {})]) is None

    class Descriptor:
        def __init__(self, base):
            self.base, self.block_shape = base, [16, 16]
    assert make([(launcher, (1, 2), (Descriptor(q), k, v, out), {})]) is not None
    assert make([(launcher, (1, 2), (Descriptor(stray), k, v, out), {})]) is None  # over a tensor of this call only


def test_recording_notes_this_threads_launches_only():
    launcher = fast_launch.Launcher(_StandInKernel())
    x = torch.zeros(4)
    with fast_launch.recording() as launches:
        other = threading.Thread(target=lambda: launcher[(1,)](x, 2))
        other.start()
        other.join()
        with fast_launch.recording() as inner:
            launcher[(3,)](x, 5)
        launcher[(2,)](x, 1)
    assert [grid for _, grid, _, _ in inner] == [(3,)]
    assert [(grid, args[1]) for _, grid, args, _ in launches] == [((2,), 1)]


def test_scratch_tensors_of_a_call_are_made_afresh_by_each_replay():
    """A call whose launches share a scratch tensor (``fast_launch.workspace``, as the last
    wave's key split does) replays both launches in order, each replay with its own scratch
    tensor of the recorded shape and dtype in the recorded slots; a tensor made otherwise gives
    no replay."""
    seen = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append((grid, args, kwargs))
    first, second = fast_launch.Launcher(Kernel()), fast_launch.Launcher(Kernel())
    q, k, v = make_qkv(1, 2, 30, 30, 16)
    out = torch.empty_like(q)
    with fast_launch.recording() as launches:
        scratch = fast_launch.workspace((4, 3), torch.float16, q.device)
        first[(5,)](q, k, v, out, scratch, 2, BLOCK=16)
        second[(6, 2)](scratch, out, 3, ROWS=8)
    assert launches.workspaces == [scratch]
    rep = replay.LaunchReplay.of(launches, q, k, v, out, (), torch.empty, "bhnd")
    assert rep is not None and rep.launcher is first
    seen.clear()
    q2, k2, v2 = make_qkv(1, 2, 30, 30, 16)
    out2 = rep(q2, k2, v2)
    out3 = rep(q2, k2, v2)
    assert [grid for grid, _, _ in seen] == [(5,), (6, 2), (5,), (6, 2)]
    (_, a1, kw1), (_, b1, kw2), (_, a2, _), (_, b2, _) = seen
    assert a1[:4] == (q2, k2, v2, out2) and a1[5] == 2 and kw1 == {"BLOCK": 16} and kw2 == {"ROWS": 8}
    s1, s2 = a1[4], a2[4]
    assert s1.shape == (4, 3) and s1.dtype == torch.float16 and s1 is not scratch and s2 is not s1
    assert b1[0] is s1 and b1[1] is out2 and b2[0] is s2 and b2[1] is out3 and b1[2] == 3
    # A scratch tensor is noted by this thread's innermost recording only.
    with fast_launch.recording() as outer:
        with fast_launch.recording() as inner:
            fast_launch.workspace((2,), torch.float32, q.device)
        other = threading.Thread(target=lambda: fast_launch.workspace((3,), torch.float32, q.device))
        other.start()
        other.join()
    assert [tuple(w.shape) for w in inner.workspaces] == [(2,)] and outer.workspaces == []
    with fast_launch.recording() as launches:
        stray = torch.empty(4, 3)
        first[(5,)](q, k, v, out, stray, 2, BLOCK=16)
    assert launches.workspaces == []
    assert replay.LaunchReplay.of(launches, q, k, v, out, (), torch.empty, "bhnd") is None
