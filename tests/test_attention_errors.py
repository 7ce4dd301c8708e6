"""Bad input: a clear ValueError / TypeError naming the argument, never a Triton crash."""
import pytest
import torch

import iidkern
from iidkern import BlockMultiplier, Probe, TokenGroups as TG, ValueProbe
from helpers import assert_raises_naming

B, H, N, D = 2, 3, 10, 16


def qkv(**over):
    t = dict(q=torch.randn(B, H, N, D), k=torch.randn(B, H, N, D), v=torch.randn(B, H, N, D))
    t.update(over)
    return t


def call(backend="triton", **kw):
    args = qkv(**{k: kw.pop(k) for k in ("q", "k", "v") if k in kw})
    return iidkern.attention(args["q"], args["k"], args["v"], backend=backend, **kw)


CASES = [
    # (id, kwargs, exception type, words the message must contain)
    ("q-not-tensor", dict(q=[[1.0]]), TypeError, ["q", "torch.Tensor"]),
    ("q-3d", dict(q=torch.randn(B, N, D)), ValueError, ["q", "4-D", "(2, 10, 16)"]),
    ("int-dtype", dict(q=torch.ones(B, H, N, D, dtype=torch.int32)), TypeError, ["q", "int32"]),
    ("float64", dict(v=torch.randn(B, H, N, D, dtype=torch.float64)), TypeError, ["v", "float64"]),
    ("mixed-dtype", dict(k=torch.randn(B, H, N, D).half()), TypeError, ["share a dtype", "float16"]),
    ("batch-mismatch", dict(k=torch.randn(B + 1, H, N, D), v=torch.randn(B + 1, H, N, D)), ValueError,
     ["batch", "q=2", "k=3"]),
    ("head-mismatch", dict(v=torch.randn(B, H + 1, N, D)), ValueError, ["head counts", "v=4"]),
    ("kv-length", dict(v=torch.randn(B, H, N + 1, D)), ValueError, ["same number of tokens", "k=10", "v=11"]),
    ("head-dim-mismatch", dict(k=torch.randn(B, H, N, 8)), ValueError, ["head dims", "k=8"]),
    ("head-dim-too-large", dict(q=torch.randn(1, 1, 2, 300), k=torch.randn(1, 1, 2, 300),
                                v=torch.randn(1, 1, 2, 300)), ValueError, ["q, k, v head dim", "256", "300"]),
    ("last-dim-strided", dict(q=torch.randn(B, H, N, 2 * D)[..., ::2]), ValueError, ["q", "contiguous last"]),
    ("layout", dict(layout="nhd"), ValueError, ["layout", "'nhd'"]),
    ("backend", dict(backend="cuda"), ValueError, ["backend", "'cuda'"]),
    ("scale-negative", dict(scale=-1.0), ValueError, ["scale", "-1.0"]),
    ("scale-type", dict(scale="big"), ValueError, ["scale"]),
    ("tags-not-pair", dict(tags=torch.ones(B, N, dtype=torch.int64)), TypeError, ["tags", "pair"]),
    ("tags-float", dict(tags=(torch.ones(B, N), torch.ones(B, N))), TypeError, ["q_tags", "int32 or int64"]),
    ("tags-shape", dict(tags=(torch.ones(B, N + 1, dtype=torch.int64), torch.ones(B, N, dtype=torch.int64))),
     ValueError, ["q_tags", "[2, 10]", "(2, 11)"]),
    ("tags-batch", dict(tags=(torch.ones(B, N, dtype=torch.int64), torch.ones(5, N, dtype=torch.int64))),
     ValueError, ["k_tags", "(5, 10)"]),
    ("head-weights-shape", dict(head_weights=torch.ones(H + 1)), ValueError, ["head_weights", "[3]", "(4,)"]),
    ("head-weights-int", dict(head_weights=torch.ones(H, dtype=torch.int64)), TypeError, ["head_weights"]),
    ("probe-type", dict(probes=["map"]), TypeError, ["probes[0]", "Probe"]),
    ("probe-range", dict(probes=[Probe(TG.each(0, N + 5), TG.each(0, 3))]), ValueError,
     ["probes[0].queries", "exceeds", "10"]),
    ("probe-ids-shape", dict(probes=[Probe(TG.each(0, 3), TG.ids(torch.zeros(N + 2, dtype=torch.int32), 1,
                                                                  span=(0, N + 2)))]),
     ValueError, ["probes[0].keys", "(12,)"]),
    ("probe-head-weights", dict(probes=[Probe(TG.each(0, 3), TG.each(0, 3), heads=torch.ones(7))]), ValueError,
     ["probes[0]", "heads (per-head weights)", "(7,)"]),
    ("value-probe-x", dict(probes=[ValueProbe(torch.randn(B, N + 1, 2), TG.each(0, 3))]), ValueError,
     ["probes[0].x", "(2, 11, 2)"]),
    ("multiplier-type", dict(block_multiplier=torch.ones(B, 2, 2)), TypeError, ["block_multiplier", "BlockMultiplier"]),
    ("multiplier-range", dict(block_multiplier=BlockMultiplier(torch.ones(B, 4, 4), query_start=8)), ValueError,
     ["block_multiplier query range", "[8, 12)"]),
    ("multiplier-batch", dict(block_multiplier=BlockMultiplier(torch.ones(B + 1, 2, 2))), ValueError,
     ["block_multiplier.values", "(3, 2, 2)"]),
    ("pairs-range", dict(pair_stats=[(0, 5)]), ValueError, ["pair_stats", "[0, 2)"]),
    ("pairs-shape", dict(pair_stats=[(0, 1, 1)]), ValueError, ["pair_stats", "(1, 3)"]),
    ("count-tiles-reference", dict(count_tiles=True, backend="reference"), ValueError, ["count_tiles"]),
    ("kernel-options", dict(kernel_options=[("BLOCK_M", 16)]), TypeError, ["kernel_options"]),
    ("kernel-option-unknown", dict(kernel_options={"BLOCK_Q": 32}), ValueError, ["kernel_options", "'BLOCK_Q'", "BLOCK_M"]),
    ("kernel-option-tile", dict(kernel_options={"BLOCK_M": 24}), ValueError, ["kernel_options['BLOCK_M']", "power of two", "24"]),
    ("kernel-option-zero", dict(kernel_options={"BLOCK_N": 0}), ValueError, ["kernel_options['BLOCK_N']", "0"]),
    ("kernel-option-str", dict(kernel_options={"PROBE_BLOCK_M": "32"}), ValueError, ["PROBE_BLOCK_M", "'32'"]),
    ("kernel-option-flag", dict(kernel_options={"poison": 1}), ValueError, ["kernel_options['poison']", "bool"]),
    ("pairs-float", dict(pair_stats=[(0, 1.7)]), TypeError, ["pair_stats", "integer"]),
    ("pairs-flat", dict(pair_stats=(0, 1)), TypeError, ["pair_stats", "[(b0, b1)]", "(0, 1)"]),
    ("pairs-ragged", dict(pair_stats=[(0, 1), (1,)]), ValueError, ["pair_stats", "two batch indices"]),
    ("return-lse-str", dict(return_lse="yes"), TypeError, ["return_lse", "bool", "'yes'"]),
    ("count-tiles-str", dict(count_tiles="no"), TypeError, ["count_tiles", "bool", "'no'"]),
    ("q-sparse", dict(q=torch.randn(B, H, N, D).to_sparse()), TypeError, ["q", "dense (strided)", "sparse_coo"]),
    ("tags-sparse", dict(tags=(torch.ones(B, N, dtype=torch.int64).to_sparse(), torch.ones(B, N, dtype=torch.int64))),
     TypeError, ["q_tags", "dense (strided)"]),
    ("head-weights-sparse", dict(head_weights=torch.ones(H).to_sparse()), TypeError, ["head_weights", "dense"]),
    ("head-weights-meta", dict(head_weights=torch.ones(H, device="meta")), ValueError, ["head_weights", "meta"]),
    ("multiplier-sparse", dict(block_multiplier=BlockMultiplier(torch.ones(B, 2, 2).to_sparse())), TypeError,
     ["block_multiplier.values", "dense"]),
    ("pairs-meta", dict(pair_stats=torch.tensor([[0, 1]], device="meta")), ValueError, ["pair_stats", "meta"]),
    ("triton-on-meta", dict(q=torch.randn(B, H, N, D, device="meta"), k=torch.randn(B, H, N, D, device="meta"),
                            v=torch.randn(B, H, N, D, device="meta")), ValueError, ["backend='triton'", "q", "meta"]),
    ("tags-batch-1-q-ok-k-bad", dict(tags=(torch.ones(1, N, dtype=torch.int64), torch.ones(3, N, dtype=torch.int64))),
     ValueError, ["k_tags", "[1, 10]", "(3, 10)"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(case):
    _, kwargs, exc, words = case
    assert_raises_naming(exc, words, call, **kwargs)


SPEC_CASES = [
    ("each-empty", lambda: TG.each(5, 5), ValueError, ["start < stop"]),
    ("ids-float", lambda: TG.ids(torch.zeros(4)), TypeError, ["integer dtype"]),
    ("ids-none-probed", lambda: TG.ids(torch.full((4,), -1)), ValueError, ["at least one group"]),
    ("segments-overlap", lambda: TG.segments([(0, 3), (2, 4)], 5), ValueError, ["overlaps"]),
    ("segments-none", lambda: TG.segments([], 5), ValueError, ["TokenGroups.segments", "at least one"]),
    ("ids-meta", lambda: TG.ids(torch.zeros(4, dtype=torch.int32, device="meta")), ValueError,
     ["TokenGroups.ids: group_ids", "meta"]),
    ("value-probe-sparse", lambda: ValueProbe(torch.randn(4, 2).to_sparse(), TG.each(0, 2)), TypeError,
     ["ValueProbe: x", "dense"]),
    ("probe-heads-sparse", lambda: Probe(TG.each(0, 2), TG.each(0, 2), heads=torch.ones(3).to_sparse()), TypeError,
     ["heads", "dense"]),
    ("probe-heads", lambda: Probe(TG.each(0, 2), TG.each(0, 2), heads="max"), ValueError, ["heads", "'max'"]),
    ("probe-normalize", lambda: Probe(TG.each(0, 2), TG.each(0, 2), normalize="rows"), ValueError, ["normalize"]),
    ("value-probe-channels", lambda: ValueProbe(torch.randn(4, 17), TG.each(0, 2)), ValueError, ["1..16", "C=17"]),
    ("instruction-tags-masks", lambda: iidkern.instruction_tags(10, image=(4, 10), instructions=[(0, 2), (2, 4)],
                                                              region_masks=torch.ones(3, 6, dtype=torch.bool)),
     ValueError, ["region_masks", "(3, 6)"]),
    ("router-stats", lambda: iidkern.router_weights(torch.ones(3)), TypeError, ["PairStats"]),
    ("ids-over-count", lambda: TG.ids(torch.arange(8, dtype=torch.int32) % 4, num_groups=2, span=(0, 8)),
     ValueError, ["num_groups=2", "[0, 3]"]),
    ("ids-below-minus-one", lambda: TG.ids(torch.tensor([0, -2, 1]), num_groups=2), ValueError, ["[-1,", "-2"]),
    ("ids-outside-span", lambda: TG.ids(torch.tensor([0, 1, -1, 1]), num_groups=2, span=(0, 2)), ValueError,
     ["outside span=(0, 2)"]),
    ("multiplier-float-start", lambda: BlockMultiplier(torch.ones(1, 2, 2), query_start=3.0), TypeError,
     ["BlockMultiplier.query_start", "integer", "3.0"]),
    ("multiplier-tensor-start", lambda: BlockMultiplier(torch.ones(1, 2, 2), key_start=torch.tensor(1.5)), TypeError,
     ["BlockMultiplier.key_start"]),
]


def test_integer_like_multiplier_starts_become_ints():
    import numpy as np
    m = BlockMultiplier(torch.ones(1, 2, 2), query_start=np.int64(3), key_start=torch.tensor(2))
    assert (m.query_start, m.key_start) == (3, 2) and type(m.query_start) is int and type(m.key_start) is int


def test_device_group_ids_out_of_range_are_not_probed_by_every_backend():
    """Ids that a check would have to synchronize for (on a GPU; here a CPU stand-in made
    past the constructor's check) mean "not probed" on every backend, on either side."""
    from dataclasses import replace
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    ok = TG.ids(torch.arange(N, dtype=torch.int32) % 2, num_groups=2, span=(0, N))
    wild_ids = torch.arange(N, dtype=torch.int32) % 4  # 2 and 3 are out of range
    wild = replace(ok, group_ids=wild_ids)
    tamed = replace(ok, group_ids=torch.where(wild_ids < 2, wild_ids, -1))
    x = torch.randn(N, 2, generator=g)

    def probes(groups):
        return [Probe(groups, groups, heads="keep", normalize="both"), ValueProbe(x, groups, normalize="queries")]
    want = iidkern.attention(q, k, v, probes=probes(tamed), backend="reference")
    for backend in ("triton", "reference"):
        got = iidkern.attention(q, k, v, probes=probes(wild), backend=backend)
        for a, b in zip(got.probes, want.probes):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_bad_specs_raise_clear_error(case):
    _, build, exc, words = case
    assert_raises_naming(exc, words, build)


def test_device_mismatch_is_reported():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to build a cross-device call")
    q = torch.randn(1, 1, 4, 16, device="cuda")
    with pytest.raises(ValueError, match="one device"):
        iidkern.attention(q, torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16))
    with pytest.raises(ValueError, match="tags"):
        iidkern.attention(q, q, q, tags=(torch.ones(1, 4, dtype=torch.int64), torch.ones(1, 4, dtype=torch.int64)))


def test_triton_outputs_refuse_a_backward_instead_of_dropping_gradients():
    """The kernels have no backward: with grad mode on and inputs that require grad, every
    output is in the graph and backward raises, rather than silently giving no gradient."""
    q, k, v = (t.requires_grad_() for t in qkv().values())
    res = iidkern.attention(q, k, v, backend="triton", return_lse=True, pair_stats=[(0, 1)],
                            probes=[Probe(TG.each(0, N), TG.each(0, 4))])
    for t in (res.out, res.lse, res.probes[0], res.pair_stats.dot):
        assert t.requires_grad
        with pytest.raises(RuntimeError, match="forward-only"):
            t.sum().backward()
    out = iidkern.attention(q, k, v, backend="triton")  # a plain call too (not replayed)
    with pytest.raises(RuntimeError, match="forward-only"):
        out.sum().backward()
    with torch.no_grad():
        assert not iidkern.attention(q, k, v, backend="triton").requires_grad
    iidkern.attention(q, k, v, backend="reference").sum().backward()  # the reference has gradients
    assert q.grad is not None and q.grad.abs().sum() > 0
    out = iidkern.attention(q, k, v, backend="triton")
    out.mul_(2)  # callers may change the output in place (a custom Function's view may not be)


@pytest.mark.parametrize("extra", ["head_weights", "multiplier", "value_probe", "probe_head_weights"])
def test_triton_outputs_refuse_a_backward_for_any_input_that_asks_for_gradients(extra):
    """Not only q, k, v: head weights, multiplier values, a value probe's x and a probe's
    per-head weights that require grad put the outputs in the graph too (backward raises)."""
    q, k, v = qkv().values()
    w = torch.rand(H).requires_grad_()
    kw = {"head_weights": dict(head_weights=w),
          "multiplier": dict(block_multiplier=BlockMultiplier(torch.rand(B, 3, 4).requires_grad_(), query_start=2)),
          "value_probe": dict(probes=[ValueProbe(torch.randn(B, N, 2).requires_grad_(), TG.each(0, 4))]),
          "probe_head_weights": dict(probes=[Probe(TG.each(0, N), TG.each(0, 4), heads=w)])}[extra]
    res = iidkern.attention(q, k, v, backend="triton", return_lse=True, **kw)
    for t in (res.out, *res.probes):
        assert t.requires_grad
        with pytest.raises(RuntimeError, match="forward-only"):
            t.sum().backward()
    with torch.no_grad():
        assert not iidkern.attention(q, k, v, backend="triton", return_lse=True, **kw).out.requires_grad


def test_spec_builders_refuse_floats_where_they_take_token_indices():
    """int() would truncate 0.5 to 0 and 3.7 to 3: every token index, count and bit set
    must be an integer (as BlockMultiplier starts and pair_stats already must)."""
    from iidkern import instruction_tags, tags_from_segments
    cases = [lambda: TG.each(0.5, 3), lambda: TG.each(0, 3.7), lambda: TG.segments([(0.9, 2.9)], 4),
             lambda: TG.segments([(0, 2)], 4.0), lambda: TG.single(0, 2, 4.5),
             lambda: TG.ids(torch.zeros(4, dtype=torch.int32), num_groups=2.9),
             lambda: TG.ids(torch.zeros(4, dtype=torch.int32), 1, span=(0, 3.5)),
             lambda: tags_from_segments(4, [(0, 2, 1.5)]), lambda: tags_from_segments(4, [(0.5, 2, 1)]),
             lambda: instruction_tags(8, image=(0, 4.0), instructions=[(4, 8)], region_masks=torch.ones(1, 4, dtype=torch.bool)),
             lambda: instruction_tags(8, image=(0, 4), instructions=[(4, 7.5)], region_masks=torch.ones(1, 4, dtype=torch.bool))]
    for i, make in enumerate(cases):
        with pytest.raises(TypeError, match="must be an integer"):
            make()
            pytest.fail(f"case {i} accepted a float")


def test_spec_builders_refuse_degenerate_input_with_value_and_type_errors():
    from iidkern import instruction_tags, tags_from_segments
    with pytest.raises(ValueError, match="group_ids.*N >= 1"):
        TG.ids(torch.zeros(0, dtype=torch.int32))
    with pytest.raises(TypeError, match="region_masks.*Tensor"):
        instruction_tags(10, image=(0, 6), instructions=[(6, 10)], region_masks=[[True] * 6])
    with pytest.raises(ValueError, match="overlaps the image"):
        instruction_tags(10, image=(0, 6), instructions=[(5, 10)], region_masks=torch.ones(1, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="64 bits"):
        tags_from_segments(4, [(0, 2, 2 ** 64)])
    # A bit set written as an unsigned 64-bit number is the int64 with the same bits.
    assert tags_from_segments(4, [(0, 2, 2 ** 63)])[0, 0].item() == -(2 ** 63)
    assert tags_from_segments(4, [(0, 2, 2 ** 64 - 1)])[0, 1].item() == -1


def test_integer_like_kernel_options_and_bool_pairs():
    import numpy as np
    out = call(kernel_options={"BLOCK_M": np.int64(16), "BLOCK_N": 32, "poison": True})
    assert torch.isfinite(out).all()
    with pytest.raises(TypeError, match="pair_stats"):
        call(pair_stats=[(0, True)])
    with pytest.raises(ValueError, match="BLOCK_N"):
        call(kernel_options={"BLOCK_N": True})
    from iidkern.validate import check_kernel_options
    checked = check_kernel_options({"BLOCK_M": np.int64(16), "num_stages": torch.tensor(2), "poison": True})
    assert checked == {"BLOCK_M": 16, "num_stages": 2, "poison": True} and type(checked["BLOCK_M"]) is int


def test_the_interpreter_needs_triton_imported_after_iidkern_or_the_variable_set():
    """Without CUDA, importing iidkern sets TRITON_INTERPRET=1; Triton builds its helpers
    when first imported, so if something (diffusers, torch._inductor) imported it before,
    the interpreter cannot run the kernels: backend='triton' then raises a ValueError that
    says what to do (the reference backend still works), instead of failing inside a kernel."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    script = """
import sys
if sys.argv[1] == "triton-first":
    import triton.language
import torch, iidkern
q = torch.randn(1, 2, 16, 16)
iidkern.attention(q, q, q)  # the reference backend works either way
try:
    iidkern.attention(q, q, q, backend="triton")
    print("ran")
except ValueError as e:
    print("ValueError:", e)
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = {order: subprocess.run([sys.executable, "-c", script, order], env=env, cwd=root, capture_output=True,
                                  text=True, timeout=300) for order in ("iidkern-first", "triton-first")}
    assert runs["iidkern-first"].stdout.strip() == "ran", runs["iidkern-first"].stderr[-2000:]
    second = runs["triton-first"].stdout
    assert "ValueError" in second and "TRITON_INTERPRET=1" in second and "import iidkern first" in second, \
        runs["triton-first"].stderr[-2000:]


def test_reference_pair_stats_are_those_of_the_returned_output():
    """Pair statistics are taken on the output as returned (rounded to bf16 here) by both
    backends, as the README says, not on the reference's fp32 output before rounding."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 32, generator=g).to(torch.bfloat16) for _ in range(3))
    for backend in ("reference", "triton"):
        res = iidkern.attention(q, k, v, pair_stats=[(0, 1)], backend=backend)
        o = res.out.double()
        want = (o[0] * o[1]).sum((1, 2))
        torch.testing.assert_close(res.pair_stats.dot.double(), want[None], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(res.pair_stats.norm0_sq.double(), (o[0] * o[0]).sum((1, 2))[None], rtol=1e-6, atol=0)


def test_scale_computed_by_numpy_or_torch_is_a_scale():
    """A scale from numpy (float32 included) or a 0-d tensor is taken as its float; a tensor
    of several values, a bool and a complex number are refused, naming the scale."""
    import numpy as np
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=g) for _ in range(3))
    want = iidkern.attention(q, k, v, scale=0.5, backend="triton")
    for scale in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float16)):
        torch.testing.assert_close(iidkern.attention(q, k, v, scale=scale, backend="triton"), want)
    for scale in (torch.tensor([0.5, 0.5]), np.bool_(True), 1j, np.float32(-0.5), torch.tensor(float("inf")),
                  np.array("0.5"), np.datetime64("2020"), 10 ** 400, torch.tensor(True),
                  torch.tensor(0.5, device="meta")):  # a meta tensor has no value (it raised a RuntimeError)
        with pytest.raises(ValueError, match="scale must be a positive finite number or None"):
            iidkern.attention(q, k, v, scale=scale, backend="triton")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_scales_the_kernels_cannot_hold_are_refused(backend):
    """The kernels multiply the scale by log2(e) in float32: 1e-300 became 0 there, and 0 times a
    masked score (-inf) made NaN rows (a ragged last key tile, or tags); 3e38 became inf. Such
    scales are a ValueError naming the range; its ends still give finite outputs."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 1, 20, 16, generator=g) for _ in range(3))  # 20 keys: a ragged tile
    for scale in (1e-300, 5e-39, 3e38, 1e300):
        with pytest.raises(ValueError, match=r"scale \* log2\(e\) a normal float32 number.*\[8.15e-39, 2.36e\+38\]"):
            iidkern.attention(q, k, v, scale=scale, backend=backend)
    out = iidkern.attention(q, k, v, scale=1e-38, backend=backend)  # near-uniform attention
    torch.testing.assert_close(out, v.mean(2, keepdim=True).expand_as(v), rtol=1e-4, atol=1e-5)


def test_probes_none_is_no_probes():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=g) for _ in range(3))
    res = iidkern.attention(q, k, v, probes=None, return_lse=True, backend="triton")
    assert res.probes == () and torch.equal(res.out, iidkern.attention(q, k, v, backend="triton"))
