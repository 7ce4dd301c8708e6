"""IID as policies: the allow table of the masked steps, branch isolation, the phase sequence,
and region containment on a tiny model."""
import warnings

import pytest
import torch

from iidkern.edit.iid import (BranchIsolationPolicy, IIDConfig, IIDMapPolicy, IIDMaskPolicy, IIDPolicy,
                              default_map_step)
from iidkern.mmdit.flux import FluxConfig, FluxTransformer, image_ids
from iidkern.attention import attention
from iidkern.policy import AttentionSite, attend
from iidkern.specs import allowed_pairs
from helpers import assert_raises_naming


def random_masks(n_instr, n_img, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n_instr, n_img, generator=g) < 0.35


def dense_allow_table(n, text, image, instructions, masks, background, visible):
    """The IID allow table (METHODS.md, IID step 5) written out token pair by token pair."""
    def instr_of(tok):
        for i, (a, b) in enumerate(instructions):
            if text[0] + a <= tok < text[0] + b:
                return i
        return None

    def in_image(tok):
        return image[0] <= tok < image[1]

    def is_visible(tok):
        return any(a <= tok < b for a, b in visible)

    allow = torch.zeros(n, n, dtype=torch.bool)
    for qi in range(n):
        for kj in range(n):
            if is_visible(qi) or is_visible(kj):
                allow[qi, kj] = True
                continue
            iq, ik = instr_of(qi), instr_of(kj)
            if iq is not None:  # P_i sees P_i and every image token
                allow[qi, kj] = (ik == iq) or in_image(kj)
            elif in_image(qi):
                regions = [i for i in range(len(instructions)) if masks[i, qi - image[0]]]
                if in_image(kj):
                    allow[qi, kj] = True
                elif ik is not None:
                    allow[qi, kj] = ik in regions or (not regions and background == "all")
    return allow


@pytest.mark.parametrize("background", ["none", "all"])
@pytest.mark.parametrize("layout", ["text_first", "image_first", "kontext"])
def test_mask_tags_equal_the_allow_table(background, layout):
    n_text, n_img, n_src = 9, 16, 6
    instructions = [(0, 2), (2, 5), (6, 8)]  # token 5 and 8: shared text outside every instruction
    extra = ()
    if layout == "text_first":
        text, image = (0, n_text), (n_text, n_text + n_img)
    elif layout == "image_first":
        image, text = (0, n_img), (n_img, n_img + n_text)
    else:
        text, image = (0, n_text), (n_text, n_text + n_img)
        extra = (("source", (n_text + n_img, n_text + n_img + n_src)),)
    site = AttentionSite(block=0, block_kind="double", text=text, image=image, step=7, num_steps=10, extra=extra)
    masks = random_masks(3, n_img, seed=11)
    policy = IIDMaskPolicy(instructions, masks, IIDConfig(background=background), from_step=6)
    assert policy.request(AttentionSite(**{**site.__dict__, "step": 5})) is None  # before the window
    req = policy.request(site)
    n = site.seq_len
    got = allowed_pairs(req.tags.q_tags.view(1, -1), req.tags.k_tags.view(1, -1))[0]
    shared = [(text[0] + 5, text[0] + 6), (text[0] + 8, text[0] + 9)]  # text outside every instruction
    expected = dense_allow_table(n, text, image, instructions, masks, background, [r for _, r in extra] + shared)
    assert torch.equal(got, expected)
    again = policy.request(AttentionSite(**{**site.__dict__, "block": 3, "block_kind": "single", "step": 9}))
    assert again.tags is req.tags  # one tag_mask reused by every block and step
    hidden = IIDMaskPolicy(instructions, masks, IIDConfig(background=background, shared_text="hidden")).request(site)
    got = allowed_pairs(hidden.tags.q_tags.view(1, -1), hidden.tags.k_tags.view(1, -1))[0]
    expected = dense_allow_table(n, text, image, instructions, masks, background, [r for _, r in extra])
    for a, b in shared:  # hidden shared text: seen by nobody (what it sees is of no consequence)
        expected[:, a:b] = False
        expected[a:b] = got[a:b]
    assert torch.equal(got, expected)


def test_masked_rows_leave_the_other_rows_of_the_batch_unmasked():
    """A guidance batch [uncond; cond; ...]: the rows flagged in ``masked_rows`` take the
    instruction masks, the others attend unmasked; outputs row by row equal the masked and
    the unmasked call of that row alone. No flagged row: no request."""
    g = torch.Generator().manual_seed(29)
    instructions, text, image = [(0, 2), (2, 5)], (0, 7), (7, 19)
    site = AttentionSite(block=0, block_kind="double", text=text, image=image, step=4, num_steps=6)
    masks = random_masks(2, 12, seed=5)
    flags = [False, True, False]
    policy = IIDMaskPolicy(instructions, masks, masked_rows=flags)
    tags = policy.request(site).tags
    allow = allowed_pairs(tags.q_tags, tags.k_tags)  # [3, N, N]
    alone = IIDMaskPolicy(instructions, masks).request(site).tags
    alone_allow = allowed_pairs(alone.q_tags.view(1, -1), alone.k_tags.view(1, -1))[0]
    assert not alone_allow.all()  # the masks restrict something
    assert allow[0].all() and allow[2].all() and torch.equal(allow[1], alone_allow)
    q, k, v = (torch.randn(3, 2, site.seq_len, 8, generator=g) for _ in range(3))
    got = attention(q, k, v, tags=tags, backend="reference")
    torch.testing.assert_close(got[[0, 2]], attention(q[[0, 2]], k[[0, 2]], v[[0, 2]], backend="reference"))
    torch.testing.assert_close(got[1:2], attention(q[1:2], k[1:2], v[1:2], tags=alone, backend="reference"))
    per_row = IIDMaskPolicy(instructions, masks.expand(3, -1, -1), masked_rows=flags).request(site).tags
    assert torch.equal(allowed_pairs(per_row.q_tags, per_row.k_tags), allow)
    assert IIDMaskPolicy(instructions, masks, masked_rows=[False, False]).request(site) is None
    late = IIDPolicy(instructions, (3, 4), masks=masks, masked_rows=flags).request(site)
    assert torch.equal(allowed_pairs(late.tags.q_tags, late.tags.k_tags), allow)


def test_masking_only_the_first_forward_of_each_step():
    """``forwards="first"`` (diffusers' true CFG: the positive prompt's forward, then the
    negative one's): a step's first forward is masked at every layer, a later forward that
    repeats its layers runs unmasked; a new step, a call without a step, and IIDPolicy's
    reset of a run with precomputed masks start over. ``"all"`` masks every forward."""
    instructions, n_layers = [(0, 2), (2, 5)], 3
    masks = random_masks(2, 12, seed=6)

    def site(step, layer, num_layers=n_layers):
        return AttentionSite(block=layer, block_kind="double", text=(0, 7), image=(7, 19), step=step, num_steps=8,
                             layer=layer, num_layers=num_layers)

    def masked_calls(policy, step, forwards=2):
        return [[policy.request(site(step, layer)) is not None for layer in range(n_layers)] for _ in range(forwards)]

    first = IIDMaskPolicy(instructions, masks, forwards="first")
    everything = IIDMaskPolicy(instructions, masks)
    for step in (3, 4):
        assert masked_calls(first, step) == [[True] * n_layers, [False] * n_layers]
        assert masked_calls(everything, step) == [[True] * n_layers] * 2
    assert masked_calls(first, 4, forwards=1) == [[False] * n_layers]  # a third forward of step 4
    assert masked_calls(first, 5, forwards=1) == [[True] * n_layers]  # the next step starts over
    assert all(first.request(site(None, 0)) is not None for _ in range(2))  # no step: always masked
    with pytest.raises(ValueError, match="forwards='first' needs AttentionSite.num_layers"):
        first.request(site(6, 0, num_layers=0))
    late = IIDPolicy(instructions, (3, 4), masks=masks, forwards="first")
    assert masked_calls(late, 6) == [[True] * n_layers, [False] * n_layers]
    late.reset()  # a new run at the same step: its first forward is masked again
    assert masked_calls(late, 6, forwards=1) == [[True] * n_layers]


def test_isolation_rows_hide_other_instructions():
    instructions = [(0, 2), (2, 4)]
    site = AttentionSite(block=0, block_kind="double", text=(0, 5), image=(5, 13), step=0, num_steps=4)
    policy = BranchIsolationPolicy(instructions, [0, 1, None])
    tags = policy.request(site).tags
    allow = allowed_pairs(tags.q_tags, tags.k_tags)  # [3, N, N]
    assert allow[2].all()  # combined row: no restriction
    assert not allow[0][:, 2:4].any() and allow[0][:, :2].all() and allow[0][:, 4:].all()
    assert not allow[1][:, 0:2].any() and allow[1][:, 2:].all()


def test_isolated_branch_equals_a_run_without_the_other_instruction():
    """Row 0 of an isolated batch gives the same image output as a sequence that never held P_1."""
    g = torch.Generator().manual_seed(3)
    h, d = 2, 8
    n_text, n_img = 6, 10
    q, k, v = (torch.randn(1, n_text + n_img, h, d, generator=g) for _ in range(3))
    instructions = [(0, 3), (3, 6)]
    site = AttentionSite(block=0, block_kind="double", text=(0, n_text), image=(n_text, n_text + n_img), step=0,
                         num_steps=2)
    policy = BranchIsolationPolicy(instructions, [0, None])
    out = attend(*(torch.cat([t, t]) for t in (q, k, v)), site, policy, backend="reference")
    keep = torch.cat([torch.arange(0, 3), torch.arange(n_text, n_text + n_img)])
    alone = attend(q[:, keep], k[:, keep], v[:, keep], site, None, backend="reference")
    assert torch.allclose(out[0, n_text:], alone[0, 3:], atol=1e-5)
    full = attend(q, k, v, site, None, backend="reference")
    assert torch.allclose(out[1], full[0], atol=1e-5)
    assert not torch.allclose(out[0, n_text:], full[0, n_text:], atol=1e-3)


def test_iid_policy_phases():
    """Isolation up to S, one capture at (S, penultimate layer), masked tags after S."""
    g = torch.Generator().manual_seed(4)
    grid, n_text = (4, 4), 6
    n = n_text + 16
    instructions = [(0, 3), (3, 6)]
    policy = IIDPolicy(instructions, grid, IIDConfig(map_step=1, sigma=0.0), row_instruction=[0, 1, None])
    q, k, v = (torch.randn(3, n, 2, 8, generator=g) for _ in range(3))

    def site(step, layer):
        return AttentionSite(block=layer, block_kind="joint", text=(0, n_text), image=(n_text, n), step=step,
                             num_steps=4, layer=layer, num_layers=3)

    for step in (0, 1):
        for layer in range(3):
            req = policy.request(site(step, layer))
            assert req.tags.q_tags.shape == (3, n)  # isolation tags for the 3 branch rows
            assert bool(req.probes) == (step == 1 and layer == 1)
            attend(q, k, v, site(step, layer), policy, backend="reference")
    assert policy.masks is not None and policy.masks.shape == (2, 16)
    req = policy.request(site(2, 0))
    assert req.tags.q_tags.shape == (n,) and not req.probes  # one shared tag set for the blended run
    with pytest.raises(ValueError, match="text"):
        IIDPolicy(instructions, grid, IIDConfig(map_step=0), row_instruction=[0, None]).request(
            AttentionSite(block=0, block_kind="joint", text=(0, 2), image=(2, 18), step=0, num_steps=4, layer=1,
                          num_layers=3))


def test_iid_policy_without_capture_refuses_late_steps():
    policy = IIDPolicy([(0, 2)], (2, 2), IIDConfig(map_step=0, map_layer=5))
    site = AttentionSite(block=0, block_kind="joint", text=(0, 2), image=(2, 6), step=1, num_steps=3, layer=0,
                         num_layers=2)
    with pytest.raises(RuntimeError, match="no masks"):
        policy.request(site)


def test_default_map_step_scales_the_public_choice():
    assert default_map_step(50) == 26  # the 27th step, 0-based
    assert 0 <= default_map_step(4) < 4 and default_map_step(1) == 0


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="map_source"):
        IIDConfig(map_source="pixels")
    with pytest.raises(ValueError, match="threshold"):
        IIDConfig(threshold="mean")
    with pytest.raises(ValueError, match="background"):
        IIDConfig(background="some")
    with pytest.raises(ValueError, match="masks"):
        IIDMaskPolicy([(0, 2), (2, 4)], torch.ones(3, 16, dtype=torch.bool))


@pytest.mark.parametrize("kwargs,field", [
    (dict(sigma=float("nan")), "sigma"), (dict(sigma=float("inf")), "sigma"), (dict(sigma=-0.5), "sigma"),
    (dict(sigma=1e9), "sigma"),  # a kernel of 6e9 taps at step S
    (dict(threshold="fixed", threshold_value=2.0), "threshold_value"),
    (dict(threshold="fixed", threshold_value=float("nan")), "threshold_value"),
    (dict(threshold="top", threshold_value=0.0), "threshold_value"),
    (dict(threshold="top", threshold_value=float("nan")), "threshold_value"),
    (dict(kernel_size=4), "kernel_size"), (dict(map_step=-1), "map_step"),
    (dict(map_layer=()), "map_layer"), (dict(map_layer=1.5), "map_layer"),
])
def test_config_refuses_values_outside_their_range(kwargs, field):
    """Refused when built, naming the field and the given value (not later, in the kernel size or
    binarize after sampling up to S)."""
    with pytest.raises(ValueError, match=field) as info:
        IIDConfig(**kwargs)
    assert f"got {list(kwargs.values())[-1]}" in str(info.value)
    IIDConfig(threshold="otsu", threshold_value=7.0)  # Otsu ignores the value
    IIDConfig(sigma=0.0, threshold="top", threshold_value=1.0, map_layer=(0, -1))


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(map_step="3"), TypeError, ["map_step", "'3'"]), (dict(map_step=1.5), TypeError, ["map_step", "1.5"]),
    (dict(kernel_size=3.0), TypeError, ["kernel_size"]), (dict(sigma="1"), TypeError, ["sigma", "'1'"]),
    (dict(threshold_value="0.5"), TypeError, ["threshold_value"]), (dict(mask_until=-1), ValueError, ["mask_until"]),
    (dict(map_row="last"), TypeError, ["map_row", "'last'"]),
    (dict(visible_ranges="source"), TypeError, ["visible_ranges", "('source',)"]),
    (dict(image_key_range=("source",)), TypeError, ["image_key_range"]),
])
def test_config_refuses_wrong_types_when_built(kwargs, exc, words):
    """A string or float where an int or names are expected is refused when built, naming the
    field; a bare string of names would otherwise be read letter by letter (no range matches)."""
    assert_raises_naming(exc, words, IIDConfig, **kwargs)
    assert IIDConfig(visible_ranges=["source"]).visible_ranges == ("source",)
    import numpy as np
    c = IIDConfig(map_step=np.int64(2), sigma=np.array(0.5), threshold_value=torch.tensor(0.25), kernel_size=torch.tensor(3))
    assert (c.map_step, c.sigma, c.threshold_value, c.kernel_size) == (2, 0.5, 0.25, 3)
    assert IIDPolicy([(0, 2)], torch.tensor([2, 3])).capture.grid == (2, 3)


@pytest.mark.parametrize("build,exc,words", [
    (lambda: IIDPolicy([(0, 2)], (0, 2)), ValueError, ["grid rows", ">= 1"]),
    (lambda: IIDPolicy([(0, 2)], "2x2"), TypeError, ["grid", "'2x2'"]),
    (lambda: IIDPolicy([(0, 3), (2, 6)], (2, 2)), ValueError, ["overlap", "(0, 3)", "(2, 6)"]),
    (lambda: IIDPolicy([(0, 2.5)], (2, 2)), TypeError, ["instructions", "2.5"]),
    (lambda: IIDMaskPolicy([(0, 3)], [[True]]), TypeError, ["masks", "bool"]),
    (lambda: IIDMaskPolicy([(0, 3)], torch.rand(1, 4)), TypeError, ["masks", "bool", "float32"]),
    (lambda: IIDPolicy([(0, 3)], (2, 2), masks=torch.rand(1, 4)), TypeError, ["masks", "bool"]),
    (lambda: IIDPolicy([(0, 2)], (3, 3), masks=torch.ones(1, 5, dtype=torch.bool)), ValueError,
     ["IIDPolicy: masks", "grid (3, 3) = 9 columns", "(1, 5)"]),
    (lambda: IIDPolicy([(0, 2)], (2, 2), row_instruction="01"), TypeError, ["row_instruction", "'01'"]),
    (lambda: IIDPolicy([(0, 2)], (2, 2), row_instruction=0), TypeError, ["IIDPolicy: row_instruction", "0"]),
    (lambda: BranchIsolationPolicy([(0, 2)], [0, 1.5]), TypeError, ["row_instruction", "1.5"]),
    (lambda: BranchIsolationPolicy([(0, 2)], 0), TypeError, ["row_instruction", "0"]),
    (lambda: BranchIsolationPolicy([(0, 2)], [0], until_step="a"), TypeError, ["until_step", "'a'"]),
    (lambda: IIDMaskPolicy([(0, 3)], torch.ones(1, 4, dtype=torch.bool), from_step="a"), TypeError,
     ["from_step", "'a'"]),
    (lambda: IIDMaskPolicy([(0, 3)], torch.ones(1, 4, dtype=torch.bool), until_step=-2), ValueError,
     ["until_step", ">= 0"]),
    (lambda: IIDMaskPolicy([(0, 3)], torch.ones(1, 4, dtype=torch.bool), masked_rows="10"), TypeError,
     ["masked_rows", "'10'"]),
    (lambda: IIDMaskPolicy([(0, 3)], torch.ones(1, 4, dtype=torch.bool), masked_rows=[0, 1]), TypeError,
     ["masked_rows", "bool", "0"]),
    (lambda: IIDMaskPolicy([(0, 3)], torch.ones(1, 4, dtype=torch.bool), masked_rows=[]), ValueError,
     ["masked_rows", "at least one"]),
    (lambda: IIDMaskPolicy([(0, 3)], torch.ones(2, 1, 4, dtype=torch.bool), masked_rows=[True]), ValueError,
     ["masked_rows", "B=2", "1 flags"]),
    (lambda: IIDPolicy([(0, 3)], (2, 2), masked_rows=(True, "no")), TypeError, ["IIDPolicy: masked_rows", "'no'"]),
    (lambda: IIDMaskPolicy([(0, 3)], torch.ones(1, 4, dtype=torch.bool), forwards="second"), ValueError,
     ["IIDMaskPolicy: forwards", "'all', 'first'", "'second'"]),
    (lambda: IIDPolicy([(0, 3)], (2, 2), forwards=None), ValueError, ["IIDPolicy: forwards", "None"]),
    (lambda: IIDConfig(propagation_signal=[[1.0]] * 9), TypeError, ["propagation_signal", "torch.Tensor", "list"]),
    (lambda: IIDConfig(propagation_signal=torch.ones(9)), ValueError, ["propagation_signal", "2-D", "(9,)"]),
    # 63 instructions: one int64 tag bit each runs out (bit 62 marks image tokens)
    (lambda: IIDMaskPolicy([(i, i + 1) for i in range(63)], torch.ones(63, 4, dtype=torch.bool)), ValueError,
     ["at most 62 instructions", "got 63"]),
    (lambda: IIDPolicy([(i, i + 1) for i in range(63)], (2, 2)), ValueError, ["at most 62 instructions", "got 63"]),
    (lambda: IIDConfig(map_step=3, mask_until=3), ValueError, ["mask_until must be > map_step", "map_step=3",
                                                               "mask_until=3"]),
])
def test_policies_refuse_bad_arguments_when_built(build, exc, words):
    """Not at step S, after sampling up to it; a soft map is not silently made a mask."""
    assert_raises_naming(exc, words, build)


def test_62_instructions_are_masked_and_a_capture_takes_more():
    """The bound is the masks' (tag bits), not the maps': 62 masked instructions build, and a
    map capture alone takes 63."""
    IIDMaskPolicy([(i, i + 1) for i in range(62)], torch.ones(62, 4, dtype=torch.bool))
    IIDPolicy([(i, i + 1) for i in range(62)], (2, 2))
    IIDMapPolicy([(i, i + 1) for i in range(63)], (2, 2))
    IIDConfig(map_step=3, mask_until=4)


@pytest.mark.parametrize("map_source,kwargs,words", [
    ("text", dict(), ["IIDConfig: map_row 3", "batch of 2 rows", "step 0, layer 0"]),
    ("image_colmean", dict(branch_rows=[0, 2]), ["IIDMapPolicy: branch_rows (0, 2)", "batch of 2 rows"]),
])
def test_map_rows_outside_the_batch_are_named(map_source, kwargs, words):
    """A row the call's batch lacks is a ValueError naming it at step S (not an IndexError)."""
    config = IIDConfig(map_step=0, map_layer=0, map_row=3, map_source=map_source)
    policy = IIDMapPolicy([(0, 2), (2, 3)], (2, 2), config, **kwargs)
    q, k, v = (torch.randn(2, 7, 2, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    site = AttentionSite(block=0, block_kind="double", text=(0, 3), image=(3, 7), step=0, num_steps=2, layer=0,
                         num_layers=1)
    assert_raises_naming(ValueError, words, attend, q, k, v, site, policy, backend="reference")


def test_map_layers_outside_the_model_are_refused():
    g = torch.Generator().manual_seed(13)
    n = int(torch.randint(2, 9, (1,), generator=g))
    assert IIDConfig(map_layer=(-n, n - 1)).map_layers(n) == (0, n - 1)
    for layer in (n, -n - 1, 100):
        with pytest.raises(ValueError, match=rf"map_layer {layer} is out of range .* {n} attention layers"):
            IIDConfig(map_layer=layer).map_layers(n)
    assert IIDConfig(map_layer=100).map_layers(0) == (100,)  # layer count unknown: nothing to check against


def test_an_unknown_image_key_range_lists_the_ranges_of_the_site():
    policy = IIDMapPolicy([(0, 2)], (2, 2), IIDConfig(map_source="image_colmean", image_key_range="source",
                                                       map_step=3), branch_rows=[0])
    site = AttentionSite(block=0, block_kind="joint", text=(0, 2), image=(2, 6), step=0, num_steps=4, layer=0,
                         num_layers=2)
    with pytest.raises(ValueError, match=r"image_key_range='source'.*\('text', 'image'\)"):
        policy.request(site)  # at the first call, not at step S
    kontext = AttentionSite(block=0, block_kind="joint", text=(0, 2), image=(2, 6), step=0, num_steps=4, layer=0,
                            num_layers=2, extra=(("source", (6, 10)),))
    assert policy.request(kontext) is None


# --------------------------------------------------------------------------- reuse across runs
def reuse_model_and_run():
    cfg = FluxConfig.tiny(num_layers=2, num_single_layers=1)
    model = FluxTransformer.random(cfg, seed=int(torch.randint(0, 1000, (1,))))

    def run(policy, seed, num_steps=3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(3, 12, cfg.in_channels, generator=g)
        text = torch.randn(3, 5, cfg.joint_attention_dim, generator=g)
        pooled = torch.randn(3, cfg.pooled_projection_dim, generator=g)
        with torch.no_grad():
            return [model(x, text, pooled, 0.5, img_ids=image_ids(3, 4), guidance=3.5, policy=policy, step=step,
                          num_steps=num_steps, backend="reference") for step in range(num_steps)]

    return run


def assert_same_run(reused, fresh, out_reused, out_fresh):
    assert torch.equal(reused.per_head_maps, fresh.per_head_maps)
    assert torch.equal(reused.masks, fresh.masks) and torch.equal(reused.capture.masks, fresh.capture.masks)
    for a, b in zip(out_reused, out_fresh):
        assert torch.equal(a, b)


def test_a_reused_policy_gives_run_b_what_a_fresh_policy_gives():
    """Run A then run B on one IIDPolicy == a fresh policy on B: maps, masks, and the masked
    steps after S (steps going back to 0 start a new run)."""
    run = reuse_model_and_run()
    seed_a = int(torch.randint(0, 10_000, (1,)))
    seed_b = seed_a + 1  # two different runs
    cfg = IIDConfig(map_step=1, sigma=0.0, threshold="top", threshold_value=0.5)

    def policy():
        return IIDPolicy([(0, 2), (2, 5)], (3, 4), cfg, row_instruction=[0, 1, None])

    reused, fresh = policy(), policy()
    run(reused, seed_a)
    maps_a = reused.per_head_maps.clone()
    out_reused, out_fresh = run(reused, seed_b), run(fresh, seed_b)
    assert not torch.equal(maps_a, fresh.per_head_maps)  # the two runs do differ
    assert_same_run(reused, fresh, out_reused, out_fresh)


def test_reset_starts_a_new_run_where_the_steps_cannot_tell():
    """One-step runs restart at the step they stopped at: reset() is what separates them;
    precomputed masks survive it."""
    run = reuse_model_and_run()
    seed_a = int(torch.randint(0, 10_000, (1,)))
    seed_b = seed_a + 1  # two different runs
    cfg = IIDConfig(map_step=0, sigma=0.0)
    reused, fresh = (IIDPolicy([(0, 2), (2, 5)], (3, 4), cfg, row_instruction=[0, 1, None]) for _ in range(2))
    run(reused, seed_a, num_steps=1)
    reused.reset()
    assert reused.masks is None and reused.per_head_maps is None
    assert_same_run(reused, fresh, run(reused, seed_b, num_steps=1), run(fresh, seed_b, num_steps=1))
    given = random_masks(2, 12, seed_b)
    pre = IIDPolicy([(0, 2), (2, 5)], (3, 4), cfg, masks=given)
    pre.reset()
    assert torch.equal(pre.masks, given)


# --------------------------------------------------------------------------- tiny model
def tiny_flux_inputs(seed=0, grid=(4, 6)):
    g = torch.Generator().manual_seed(seed)
    cfg = FluxConfig.tiny(num_single_layers=0)  # one double block: influence can only travel through P_i
    model = FluxTransformer.random(cfg, seed=seed)
    n_img = grid[0] * grid[1]
    x = torch.randn(1, n_img, cfg.in_channels, generator=g)
    text = torch.randn(1, 8, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    return model, x, text, pooled, image_ids(*grid)


def test_an_instruction_cannot_change_tokens_outside_its_region():
    model, x, text, pooled, ids = tiny_flux_inputs()
    instructions = [(0, 3), (3, 6)]  # tokens 6, 7: shared text
    masks = torch.zeros(2, 24, dtype=torch.bool)
    masks[0, :10] = True
    masks[1, 8:18] = True  # overlaps region 0 on tokens 8, 9; tokens 18.. are background
    policy = IIDMaskPolicy(instructions, masks)
    perturbed = text.clone()
    perturbed[:, 3:6] += torch.randn(1, 3, text.shape[-1], generator=torch.Generator().manual_seed(9))

    def run(txt, pol):
        return model(x, txt, pooled, 0.6, img_ids=ids, guidance=3.5, policy=pol, step=5, num_steps=8,
                     backend="reference")

    base, moved = run(text, policy), run(perturbed, policy)
    only_region0 = torch.zeros(24, dtype=torch.bool)
    only_region0[:8] = True
    background = ~(masks[0] | masks[1])
    assert torch.allclose(base[0, only_region0], moved[0, only_region0], atol=1e-6)
    assert torch.allclose(base[0, background], moved[0, background], atol=1e-6)
    assert not torch.allclose(base[0, masks[1]], moved[0, masks[1]], atol=1e-4)  # P_1 does act in M_1
    free_base, free_moved = run(text, None), run(perturbed, None)
    assert not torch.allclose(free_base[0, only_region0], free_moved[0, only_region0], atol=1e-4)


# --------------------------------------------------------------------------- image x image sources
@pytest.mark.parametrize("source", ["image_colmean", "image_propagation"])
def test_image_x_image_map_sources_equal_dense(source):
    """OmniGen-style sources: per single-instruction branch row, a map from image x image attention."""
    g = torch.Generator().manual_seed(8)
    grid, n_text, h, d = (3, 4), 4, 2, 8
    n_img = grid[0] * grid[1]
    n = n_text + n_img
    q, k, v = (torch.randn(3, n, h, d, generator=g) for _ in range(3))
    signal = torch.rand(n_img, 2, generator=g) if source == "image_propagation" else None
    cfg = IIDConfig(map_step=0, map_layer=0, map_source=source, sigma=0.0, propagation_signal=signal)
    policy = IIDPolicy([(0, 2), (2, 4)], grid, cfg, row_instruction=[0, 1, None])
    site = AttentionSite(block=0, block_kind="joint", text=(0, n_text), image=(n_text, n), step=0, num_steps=2,
                         layer=0, num_layers=1)
    attend(q, k, v, site, policy, backend="reference")
    # Dense: the isolation tags hide P_1 from row 0 and P_0 from row 1.
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / d ** 0.5
    hide = torch.zeros(3, n, dtype=torch.bool)
    hide[0, 2:4], hide[1, 0:2] = True, True
    probs = torch.softmax(scores.masked_fill(hide[:, None, None, :], float("-inf")), dim=-1)
    img = slice(n_text, n)
    if source == "image_colmean":
        per_row = probs[:, :, img, img].mean(2)  # [B, H, N_img]: column mean over image queries
    else:
        per_row = (probs[:, :, img, img] @ signal.double()).mean(-1)  # [B, H, N_img]: A_h @ x, channel mean
    expected = per_row[:2].permute(1, 2, 0)  # branch rows -> [H, N_img, N]
    assert torch.allclose(policy.per_head_maps.double(), expected, atol=1e-5)
    assert policy.masks.shape == (2, n_img)


def test_image_sources_need_branch_rows():
    with pytest.raises(ValueError, match="branch_rows"):
        IIDPolicy([(0, 2), (2, 4)], (2, 2), IIDConfig(map_source="image_colmean"), row_instruction=[0, None])


def test_a_second_forward_at_the_capture_step_is_not_probed():
    """True CFG runs the model twice per step (the positive prompt, then the negative one):
    only the first forward at step S gives maps. A second forward's sites get no probe, the
    maps and masks equal those of the first forward alone, and the next run probes again."""
    g = torch.Generator().manual_seed(61)
    grid, n_text, heads = (2, 3), 4, 2
    n = n_text + grid[0] * grid[1]
    cfg = IIDConfig(map_step=1, map_layer=(0, 1), sigma=0.0, threshold="top", threshold_value=0.5)

    def forward(policy, step, q, k, v):
        for layer in range(2):
            site = AttentionSite(block=layer, block_kind="joint", text=(0, n_text), image=(n_text, n), step=step,
                                 num_steps=3, layer=layer, num_layers=2)
            req = policy.request(site)
            if req is not None:
                policy.receive(site, attention(q[layer], k[layer], v[layer], layout="bhnd", backend="reference",
                                               probes=req.probes))

    def qkv():
        return [torch.randn(2, 1, heads, n, 8, generator=g) for _ in range(3)]

    positive, negative = qkv(), qkv()
    twice, once = (IIDMapPolicy([(0, 2), (2, 4)], grid, cfg) for _ in range(2))
    for step in range(3):
        forward(twice, step, *positive)
        forward(twice, step, *negative)
        forward(once, step, *positive)
    assert len(twice._captured) == len(once._captured) == 2  # two map layers, one forward
    assert torch.equal(twice.per_head_maps, once.per_head_maps) and torch.equal(twice.masks, once.masks)
    only_negative = IIDMapPolicy([(0, 2), (2, 4)], grid, cfg)
    for step in range(3):
        forward(only_negative, step, *negative)
    assert not torch.allclose(only_negative.per_head_maps, once.per_head_maps)  # the forwards do differ
    for step in range(3):  # a new run (the steps go back) probes its first forward again
        forward(twice, step, *negative)
    assert torch.equal(twice.per_head_maps, only_negative.per_head_maps)


def test_an_empty_instruction_mask_warns_when_the_masks_are_taken_into_use():
    """An instruction whose map is below another's everywhere has nothing left after the
    heads' differencing: a flat map, an empty Otsu mask, so it would edit nothing after S.
    That is said (a RuntimeWarning naming it) once the captured masks are used, after step S
    (not per map layer: a later layer's maps can still fill it); the other mask stands."""
    from types import SimpleNamespace
    g = torch.Generator().manual_seed(63)
    grid, heads = (3, 4), 2
    site = AttentionSite(block=0, block_kind="joint", text=(0, 4), image=(4, 16), step=1, num_steps=3,
                         layer=0, num_layers=2)
    strong = torch.rand(1, heads, 12, 1, generator=g) + 1.0
    flat_second = torch.cat([strong, strong - 1.0 - torch.rand(1, heads, 12, 1, generator=g)], -1)  # [1, H, N_img, 2]
    for maps, empty in ((flat_second, True), (torch.rand(1, heads, 12, 2, generator=g), False)):
        policy = IIDPolicy([(0, 2), (2, 4)], grid, IIDConfig(map_step=1, sigma=0.0))
        policy.request(site)  # step 1 = S: the capture phase
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            policy.capture.receive(site, SimpleNamespace(probes=[maps]))  # the capture itself is silent
        later = AttentionSite(**{**site.__dict__, "step": 2})
        if empty:
            with pytest.warns(RuntimeWarning, match=r"instruction\(s\) \[1\] captured at step 1 is empty"):
                assert policy.request(later) is not None
            assert not policy.masks[1].any() and policy.masks[0].any()
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert policy.request(later) is not None
            assert policy.masks.any(-1).all()


def test_without_row_instruction_the_maps_come_from_the_last_batch_row():
    """``IIDPolicy`` without ``row_instruction`` on a CFG batch ``[uncond; cond]`` (the
    runner's and diffusers' SD3 order) takes the maps from the last (cond) row, as
    ``IIDConfig.map_row = -1`` says; with ``row_instruction`` from its last combined row."""
    g = torch.Generator().manual_seed(62)
    grid, n_text, heads = (2, 3), 4, 2
    n = n_text + grid[0] * grid[1]
    cfg = IIDConfig(map_step=0, map_layer=0, sigma=0.0, threshold="top", threshold_value=0.5)
    site = AttentionSite(block=0, block_kind="joint", text=(0, n_text), image=(n_text, n), step=0, num_steps=2,
                         layer=0, num_layers=1)
    q, k, v = (torch.randn(2, n, heads, 8, generator=g) for _ in range(3))  # [B, N, H, D]
    probs = torch.softmax(q.transpose(1, 2) @ k.permute(0, 2, 3, 1) / 8 ** 0.5, -1)  # [B, H, N, N]
    for rows, want_row in ((None, 1), ([None, 0, 1], 0)):
        policy = IIDPolicy([(0, 2), (2, 4)], grid, cfg, row_instruction=rows)
        qs, ks, vs = (t if rows is None else torch.cat([t, t[:1]]) for t in (q, k, v))
        attend(qs, ks, vs, site, policy, backend="reference")
        image_to_first = probs[want_row, :, n_text:, 0:2].mean(-1)  # [H, N_img], instruction 0 (keys 0..1)
        torch.testing.assert_close(policy.per_head_maps[..., 0], image_to_first, rtol=1e-5, atol=1e-6)


def test_masks_set_after_construction_are_precomputed_and_apply_without_a_step():
    """set_masks later is as masks given to the constructor: no capture at S, kept by reset
    (also the automatic one of a new run); precomputed masks mask a call with no step number."""
    site = AttentionSite(block=0, block_kind="double", text=(0, 5), image=(5, 9), step=2, num_steps=4,
                         layer=0, num_layers=2)
    policy = IIDPolicy([(0, 2), (2, 4)], (2, 2))
    assert policy.request(AttentionSite(**{**site.__dict__, "step": None})) is None  # nothing to apply yet
    masks = torch.tensor([[True, True, False, False], [False, False, True, True]])
    policy.set_masks(masks)
    policy.reset()
    assert torch.equal(policy.masks, masks)
    early = policy.request(site)  # step 2 <= S: isolation only, no capture probes
    assert early is None or not early.probes
    late = policy.request(AttentionSite(**{**site.__dict__, "step": None}))
    assert late is not None and late.tags is not None


def test_branch_rows_of_a_cfg_doubled_batch_are_the_conditional_half():
    """[uncond; cond] rows: the branches, like the combined row of the text maps, are the last."""
    policy = IIDPolicy([(0, 2), (2, 4)], (2, 2), row_instruction=[0, 1, None, 0, 1, None])
    assert policy.capture.branch_rows == (3, 4) and policy.capture.map_row == 5
