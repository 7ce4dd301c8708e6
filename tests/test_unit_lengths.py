"""Sequence lengths of 1. Triton compiles an integer argument that equals 1 as a constant, a
code path that no other length takes: with triton 3.6 on an H200 the main pass compiled for
one key read shared memory out of bounds beside a value probe and a fused key-group probe, and
the Gluon kernel with a fused key-group probe failed to compile (bench/NOTES.md 80). Such
launches take each kernel's generic twin (``fast_launch.generic_twin``); these tests check the
route on CPU and, on a GPU, unit-length calls with in-kernel extras against the float64 oracle."""
import pytest
import torch

import iidkern
from iidkern import BlockMultiplier, Probe, TokenGroups, ValueProbe
from iidkern.kernels import fast_launch, hopper_fwd, launch
from test_attention_fuzz_extras import check_call
from test_unit_arguments import base_call


def generic_names(kernel):
    """The parameters a kernel (compiled or interpreted) does not specialize."""
    return list(getattr(kernel, "do_not_specialize", None) or getattr(kernel, "kwargs", {}).get("do_not_specialize")
                or [])


def launched(nq, nk):
    """The launchers a call with a probe of each kind (probe pass, fused) and pair statistics uses."""
    g = torch.Generator().manual_seed(nq * 100 + nk)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for n in (nq, nk, nk))
    probes = [Probe(TokenGroups.each(0, nq), TokenGroups.each(0, nk)),
              Probe(TokenGroups.each(0, nq), TokenGroups.ids(torch.zeros(nk, dtype=torch.int32)))]
    with fast_launch.recording() as launches:
        iidkern.attention(q, k, v, backend="triton", probes=probes, pair_stats=[(0, 0)])
    return [launcher for launcher, *_ in launches]


@pytest.mark.parametrize("nq,nk", [(1, 1), (1, 9), (9, 1)])
def test_unit_lengths_take_the_generic_twins(nq, nk):
    got = launched(nq, nk)
    assert got[0] is launch._ATTN._twin and got[1] is launch._PROBE._twin
    assert got[2] is (launch._PAIR_STATS._twin if nq == 1 else launch._PAIR_STATS)
    # Other lengths keep the kernels that specialize them.
    assert launched(9, 9) == [launch._ATTN, launch._PROBE, launch._PAIR_STATS]


def test_generic_twins_keep_the_kernels_own_unspecialized_parameters():
    assert generic_names(launch._ATTN._twin.kernel) == ["n_q", "n_k"]
    assert generic_names(launch._PROBE._twin.kernel) == ["n_q", "n_k"]
    # pair_stats_kernel already keeps its batch rows unspecialized; the twin adds the length.
    assert generic_names(launch._PAIR_STATS._twin.kernel) == ["b0", "b1", "n_tokens"]
    assert launch._ATTN._twin._twin is None  # the twin does not route again
    if hopper_fwd.AVAILABLE:
        assert generic_names(hopper_fwd._ATTN_HOPPER._twin.kernel) == ["n_q", "n_k"]
        assert generic_names(hopper_fwd._COMBINE._twin.kernel) == ["n_q"]


def test_compiled_twins_leave_the_unit_lengths_unspecialized(compile_script):
    """As compiled Triton sees them (a child process without the interpreter): the kernels
    specialize their lengths, the twins do not (and keep the kernels' own exceptions)."""
    got = compile_script("unit_twins.py")
    want = {"attn": ["n_q", "n_k"], "probe": ["n_q", "n_k"], "pair_stats": ["n_tokens"], "hopper": ["n_q", "n_k"],
            "combine": ["n_q"]}
    for name, kernel in got.items():
        assert kernel["kind"] == kernel["twin_kind"] and kernel["kind"] in ("JITFunction", "GluonJITFunction")
        own = ["b0", "b1"] if name == "pair_stats" else []
        assert kernel["primary"] == own, name
        assert sorted(kernel["twin"]) == sorted(own + want[name]), name
    assert {"attn", "probe", "pair_stats"} <= set(got)


def test_generic_when_one_names_run_time_parameters():
    with pytest.raises(TypeError, match=r"generic_when_one names \['n_keys'\]"):
        fast_launch.Launcher(launch.attn_fwd_kernel, generic_when_one=("n_keys",))
    with pytest.raises(TypeError, match="not run-time parameters"):
        fast_launch.Launcher(launch.attn_fwd_kernel, generic_when_one=("BLOCK_M",))


def test_compiled_runner_hands_unit_lengths_to_the_twin():
    """A replay asks the primary launcher for its compiled kernel; for unit lengths the twin
    answers (here nothing is compiled, so both say None, but the twin is the one asked)."""
    asked = []
    twin = launch._ATTN._twin
    original = type(twin).compiled_runner

    def spy(self, grid, args, kwargs):
        asked.append(self)
        return original(self, grid, args, kwargs)
    type(twin).compiled_runner = spy
    try:
        args = [0] * 80
        args[launch._ATTN._one_pos[1]] = 1
        launch._ATTN.compiled_runner((1,), tuple(args), {})
    finally:
        type(twin).compiled_runner = original
    assert asked == [launch._ATTN, twin]


def unit_call(form, nq, nk, d, seed):
    """Calls whose extras run inside the main pass: 'value' (a value probe beside a fused
    key-group probe: the Triton kernel), 'groups' (a fused key-group probe and the LSE: the
    Hopper kernel on an H100/H200 at head dim 128), 'one_group' (IID with one instruction),
    'everything' (tags, a block multiplier, both probe kinds, pair statistics, tile counts)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, 2, (nk,), generator=g, dtype=torch.int32)
    ids[-1] = 1
    one = torch.where(ids >= 0, 0, -1).to(torch.int32)
    call = base_call(seed, b=2, h=2, nq=nq, nk=nk, d=d)
    call["head_weights"] = torch.rand(2, generator=g) + 0.5
    if form == "value":
        call["probes"] = [ValueProbe(torch.randn(nk, 3, generator=g), TokenGroups.each(0, 1), heads="mean"),
                          Probe(TokenGroups.each(0, nq), TokenGroups.ids(ids), heads="mean")]
    elif form in ("groups", "one_group"):
        call["probes"] = [Probe(TokenGroups.each(0, nq), TokenGroups.ids(ids if form == "groups" else one),
                                heads="mean")]
        call["return_lse"] = True
    else:
        bits = torch.tensor([1, 2, 4])
        call["tags"] = ("bn", (torch.randint(1, 8, (2, nq), generator=g)),
                        (torch.randint(0, 8, (2, nk), generator=g) | bits[torch.arange(nk) % 3]))
        call["block_multiplier"] = BlockMultiplier(torch.rand(2, nq, nk, generator=g) * 2)
        call["probes"] = [Probe(TokenGroups.each(0, nq), TokenGroups.ids(ids), heads="mean"),
                          Probe(TokenGroups.each(0, nq), TokenGroups.each(0, nk), heads="sum")]
        call.update(pair_stats=[(0, 1)], return_lse=True, count_tiles=True)
    return call


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("form", ["value", "groups", "one_group", "everything"])
@pytest.mark.parametrize("nq,nk", [(1, 1), (1, 77), (77, 1), (2, 1)])
def test_unit_lengths_with_in_kernel_extras(dev, form, nq, nk):
    d = 128 if dev == "cuda" else 32
    with fast_launch.recording() as launches:
        check_call(unit_call(form, nq, nk, d, seed=7000 + 10 * nq + nk), torch.device(dev))
    launchers = [launcher for launcher, *_ in launches]
    if dev == "cuda" and form in ("groups", "one_group") and hopper_fwd.on_hopper(torch.device(dev)):
        assert launchers[0] is hopper_fwd._ATTN_HOPPER._twin  # the Gluon kernel's unit-length path
    elif dev == "cuda" and form in ("value", "everything"):
        assert launchers[0] is launch._ATTN._twin
