"""HeadRouter as policies: IARouter weights, the DTR block multiplier, the code form, the text
residual and key regions, each against a dense computation written out here."""
import pytest
import torch

from iidkern.edit.headrouter import (HeadRouterConfig, HeadRouterPolicy, KeyRegionPolicy, TextResidual,
                                     branch_pair_stats, dtr_weights, scale_heads)
import iidkern
from iidkern.edit.iid import IIDConfig
from iidkern.policy import AttentionPolicy, AttentionRequest, AttentionSite, ChainPolicy, attend
from helpers import assert_raises_naming

N_TEXT, N_IMG, H, D = 5, 12, 3, 8


def qkv(seed, batch=2):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, N_TEXT + N_IMG, H, D, generator=g) for _ in range(3))


def site(step, block=0, kind="double"):
    return AttentionSite(block=block, block_kind=kind, text=(0, N_TEXT), image=(N_TEXT, N_TEXT + N_IMG), step=step,
                         num_steps=4, layer=block, num_layers=2)


def dense_probs(q, k):
    """Softmax attention ``[B, H, N, N]`` from bnhd q, k in float64."""
    q, k = q.double().transpose(1, 2), k.double().transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5, dim=-1)


def dense_out(p, v):
    return (p @ v.double().transpose(1, 2)).transpose(1, 2)  # [B, N, H, D]


def formula_router_weights(out, gamma, delta):
    """Per-head cosine of rows 0 and 1, then w_h = 1 + gamma * sigmoid(d_h - delta)."""
    o0, o1 = out[0].transpose(0, 1).flatten(1), out[1].transpose(0, 1).flatten(1)  # [H, N*D]
    s = (o0 * o1).sum(-1) / (o0.norm(dim=-1) * o1.norm(dim=-1))
    d = (s.max() - s) / (s.max() - s.min()).clamp_min(1e-6)  # a tensor: the gradient test differentiates it
    return 1 + gamma * torch.sigmoid(d - delta)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_router_weights_equal_the_formula(backend):
    q, k, v = qkv(0)
    policy = HeadRouterPolicy(HeadRouterConfig(dtr_image="off", gamma=0.3, delta=0.4))
    out = attend(q, k, v, site(0), policy, backend=backend)
    ref = dense_out(dense_probs(q, k), v)
    w = formula_router_weights(ref, 0.3, 0.4)
    assert torch.allclose(policy.last_router_weights[("double", 0)][0].double(), w, atol=1e-5)
    expected = ref.clone()
    expected[1] = ref[1] * w[None, :, None]
    assert torch.allclose(out.double(), expected, atol=1e-4)
    assert not torch.allclose(out[1].double(), ref[1], atol=1e-4)  # the weights did act (w > 1)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("heads", ["mean", "keep"])
def test_dtr_multiplier_from_previous_step_equals_reference(backend, heads):
    cfg = HeadRouterConfig(route=False, dtr_image="paper", dtr_map="previous", dtr_heads=heads, alpha=5.0, upsilon=5.0)
    policy = HeadRouterPolicy(cfg)
    q0, k0, v0 = qkv(1)
    first = attend(q0, k0, v0, site(0), policy, backend=backend)
    assert torch.allclose(first.double(), dense_out(dense_probs(q0, k0), v0), atol=1e-4)  # step 0: probe only
    q1, k1, v1 = qkv(2)
    out = attend(q1, k1, v1, site(1), policy, backend=backend)

    p0 = dense_probs(q0, k0)[1][:, N_TEXT:, :N_TEXT]  # edit row, image queries x text keys, [H, N_img, N_txt]
    a_zp = p0.mean(0, keepdim=True) if heads == "mean" else p0
    w = 5.0 * torch.sigmoid(5.0 * torch.softmax(a_zp, dim=-2))  # softmax over image tokens
    p1 = dense_probs(q1, k1)
    mult = torch.ones_like(p1)
    mult[1, :, N_TEXT:, :N_TEXT] = w
    expected = dense_out(p1 * mult, v1)  # post-softmax multiplier, normalizer unchanged
    assert torch.allclose(out.double(), expected, atol=1e-4)
    assert torch.allclose(out[0].double(), dense_out(p1, v1)[0], atol=1e-4)  # reconstruction row untouched
    assert torch.allclose(dtr_weights(a_zp, 5.0, 5.0).double(), w, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtr_multiplier_stays_float32_in_16_bit_calls(dtype):
    """The next step's multiplier is float32 whatever the call's dtype, its values those of
    dtr_weights unrounded: at real image lengths the weights vary by ~0.1% around alpha / 2,
    which bf16 values would round away (bench/NOTES.md 71)."""
    cfg = HeadRouterConfig(route=False, dtr_image="paper", dtr_map="previous", alpha=5.0, upsilon=5.0)
    policy = HeadRouterPolicy(cfg)
    q0, k0, v0 = (t.to(dtype) for t in qkv(5))
    attend(q0, k0, v0, site(0), policy, backend="reference")
    mult = policy.request(site(1)).block_multiplier
    assert mult.values.dtype == torch.float32 and (mult.query_start, mult.key_start) == (N_TEXT, 0)
    a_zp = dense_probs(q0, k0)[1][:, N_TEXT:, :N_TEXT].mean(0)  # head mean, [N_img, N_txt]
    want = dtr_weights(a_zp, 5.0, 5.0).double()
    # the probe's float32 sums against float64 ones; a 16-bit rounding would be ~1e-3 off
    torch.testing.assert_close(mult.values[1].double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(mult.values[0], torch.ones_like(mult.values[0]))  # the reconstruction row: 1


def test_code_form_weights_image_tokens_of_the_edit_row_from_the_same_call():
    cfg = HeadRouterConfig(route=False, dtr_image="code", alpha=2.0, upsilon=5.0)
    policy = HeadRouterPolicy(cfg)
    for step, seed in ((0, 3), (1, 4)):  # step 0 is weighted too: the weights come from the call itself
        q, k, v = qkv(seed)
        out = attend(q, k, v, site(step, kind="single"), policy, backend="reference")
        mass = dense_probs(q, k)[1][:, N_TEXT:, :N_TEXT].sum(-1).mean(0)  # text mass per image token, head mean
        w = 2.0 * torch.sigmoid(5.0 * torch.softmax(mass, dim=0))
        expected = dense_out(dense_probs(q, k), v)
        expected[1, N_TEXT:] *= w[:, None, None]
        assert torch.allclose(out.double(), expected, atol=1e-4)
        assert not torch.allclose(out[1].double(), dense_out(dense_probs(q, k), v)[1], atol=1e-4)
    assert policy.request(site(1, kind="double")) is None  # code form: single blocks only by default


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_paper_form_with_two_forwards_a_step_weights_each_by_its_own_previous_map(backend):
    """True CFG in diffusers' Flux pipelines: a positive, then a negative forward per step.
    Each forward of step 1 gets the map of the same forward of step 0, not the other prompt's."""
    cfg = HeadRouterConfig(route=False, dtr_image="paper", dtr_map="previous", alpha=5.0, upsilon=5.0)
    policy = HeadRouterPolicy(cfg)
    inputs = {name: (qkv(seed), qkv(seed + 10)) for name, seed in (("pos", 20), ("neg", 21))}
    for name in ("pos", "neg"):  # step 0: no multiplier yet
        q, k, v = inputs[name][0]
        out = attend(q, k, v, site(0), policy, backend=backend)
        assert torch.allclose(out.double(), dense_out(dense_probs(q, k), v), atol=1e-4)
    for name in ("pos", "neg"):
        q0, k0, _ = inputs[name][0]
        q1, k1, v1 = inputs[name][1]
        out = attend(q1, k1, v1, site(1), policy, backend=backend)
        a_zp = dense_probs(q0, k0)[1][:, N_TEXT:, :N_TEXT].mean(0, keepdim=True)
        p1 = dense_probs(q1, k1)
        mult = torch.ones_like(p1)
        mult[1, :, N_TEXT:, :N_TEXT] = 5.0 * torch.sigmoid(5.0 * torch.softmax(a_zp, dim=-2))
        assert torch.allclose(out.double(), dense_out(p1 * mult, v1), atol=1e-4), name


class _MultiplierSpy(HeadRouterPolicy):
    """Notes, per call, whether its request carried a block multiplier."""

    def __init__(self, config):
        super().__init__(config)
        self.weighted = []

    def request(self, site):
        req = super().request(site)
        self.weighted.append(req.block_multiplier is not None)
        return req


def test_paper_form_never_takes_a_map_older_than_the_step_before():
    """Steps with 2, then 1, then 2 forwards: the second forward of step 2 has no map from
    step 1 and runs without a multiplier (not with step 0's); a skipped step number (0, 2)
    still counts as the step before."""
    policy = _MultiplierSpy(HeadRouterConfig(route=False, dtr_image="paper", dtr_map="previous"))
    for i, step in enumerate((0, 0, 1, 2, 2)):
        attend(*qkv(30 + i), site(step), policy, backend="reference")
    assert policy.weighted == [False, False, True, True, False]
    skipping = _MultiplierSpy(HeadRouterConfig(route=False, dtr_image="paper", dtr_map="previous"))
    for i, step in enumerate((0, 2)):
        attend(*qkv(40 + i), site(step), skipping, backend="reference")
    assert skipping.weighted == [False, True]


# ---------------------------------------------------------------- same-call DTR (dtr_map="same")
def dense_headrouter(q, k, v, text, image, cfg, tags=None, head_weights=None):
    """One pass of the paper's HeadRouter in float64, written out: the masked softmax, each edit
    row's image x text block weighted by ``alpha * sigmoid(upsilon * softmax over image tokens of
    A^{ZP})`` from this same softmax (normalizer unchanged), ``A V``, the call's head weights, then
    IARouter's per-head weights from the weighted outputs. bnhd in, bnhd out."""
    qh, kh, vh = (t.double().transpose(1, 2) for t in (q, k, v))  # [B, H, N, D]
    scores = qh @ kh.transpose(-1, -2) / q.shape[-1] ** 0.5
    if tags is not None:
        qt, kt = (t.reshape(1, -1).long() if t.dim() == 1 else t.long() for t in tags)
        scores = scores.masked_fill(((qt[:, :, None] & kt[:, None, :]) == 0)[:, None], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row that sees no key: zeros
    mult = torch.ones_like(p)
    (t0, t1), (i0, i1) = text, image
    for _, e in cfg.pairs if cfg.dtr_image == "paper" else ():
        a_zp = p[e][:, i0:i1, t0:t1]
        if cfg.dtr_heads == "mean":
            a_zp = a_zp.mean(0, keepdim=True)
        mult[e, :, i0:i1, t0:t1] = cfg.alpha * torch.sigmoid(cfg.upsilon * torch.softmax(a_zp, dim=-2))
    out = (p * mult) @ vh
    if head_weights is not None:
        hw = head_weights.double()
        out = out * (hw[None, :, None, None] if hw.dim() == 1 else hw[:, :, None, None] if hw.dim() == 2
                     else hw[..., None])
    if cfg.route:  # out of place: the gradient test backpropagates through this
        route = torch.ones(out.shape[:2], dtype=out.dtype, device=out.device)
        for r, e in cfg.pairs:
            route[e] = formula_router_weights(out[[r, e]].transpose(1, 2), cfg.gamma, cfg.delta)
        out = out * route[:, :, None, None]
    return out.transpose(1, 2)


def random_call(seed, layout):
    """Random sizes and an order of the two streams; q, k, v in bnhd plus the call's site."""
    g = torch.Generator().manual_seed(seed)
    n_text, n_img = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((2, 9), (5, 23)))
    heads, batch = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(2, 5, (1,), generator=g))
    q, k, v = (torch.randn(batch, n_text + n_img, heads, 16, generator=g) for _ in range(3))
    image_first = seed % 2 == 1  # SD3's order [image; text] on odd seeds, Flux's [text; image] on even
    text, image = ((n_img, n_img + n_text), (0, n_img)) if image_first else ((0, n_text), (n_text, n_text + n_img))
    where = AttentionSite(block=0, block_kind="joint", text=text, image=image, step=0, num_steps=4)
    return q, k, v, where, g


def in_layout(t, layout):
    return t if layout == "bnhd" else t.transpose(1, 2)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("heads", ["mean", "keep"])
@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
@pytest.mark.parametrize("route", [False, True])
def test_same_call_dtr_equals_one_pass_weighted_by_its_own_map(backend, heads, layout, route):
    """The default paper form weighs a call by the call's own A^{ZP}: from the first step on,
    equal to one pass with that multiplier, and IARouter's weights come from the weighted output."""
    seed = {"mean": 100, "keep": 200}[heads] + 10 * (layout == "bhnd") + 2 * route + (backend == "triton")
    q, k, v, where, _ = random_call(seed, layout)
    batch = q.shape[0]
    pairs = ((0, 1),) if batch < 4 else ((0, 2), (1, 3))
    cfg = HeadRouterConfig(route=route, dtr_heads=heads, alpha=5.0, upsilon=5.0, pairs=pairs, layout=layout)
    assert cfg.dtr_image == "paper" and cfg.dtr_map == "same"  # the defaults this test is about
    policy = HeadRouterPolicy(cfg)
    out = attend(*(in_layout(t, layout) for t in (q, k, v)), where, policy, layout=layout, backend=backend)
    expected = dense_headrouter(q, k, v, where.text, where.image, cfg)
    torch.testing.assert_close(in_layout(out, layout).double(), expected, rtol=1e-4, atol=1e-5)
    plain = dense_headrouter(q, k, v, where.text, where.image,
                             HeadRouterConfig(route=False, dtr_image="off", pairs=pairs))
    assert not torch.allclose(in_layout(out, layout).double(), plain, atol=1e-3)  # the weighting did act
    for r, _ in pairs:  # the reconstruction rows stay plain
        torch.testing.assert_close(in_layout(out, layout)[r].double(), plain[r], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("upsilon", [-4.0, 0.0])
def test_same_call_dtr_with_a_negative_or_zero_upsilon(upsilon):
    """upsilon is any finite real: negative favours the least-attended image tokens, 0 weighs
    every text key by alpha / 2; both as the formula says."""
    q, k, v, where, _ = random_call(400 + int(upsilon), "bnhd")
    cfg = HeadRouterConfig(route=False, alpha=3.0, upsilon=upsilon)
    out = attend(q, k, v, where, HeadRouterPolicy(cfg), layout="bnhd", backend="reference")
    torch.testing.assert_close(out.double(), dense_headrouter(q, k, v, where.text, where.image, cfg),
                               rtol=1e-4, atol=1e-5)


class _MaskAndWeights(AttentionPolicy):
    """Another policy of a chain: it adds tags and head weights to every call."""

    def __init__(self, tags, head_weights):
        self.tags, self.head_weights = tags, head_weights

    def request(self, site):
        return AttentionRequest(tags=self.tags, head_weights=self.head_weights)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("weights_shape", ["H", "BH", "BHN"])
def test_same_call_dtr_keeps_the_chains_tags_and_head_weights(backend, weights_shape):
    """The second, small call sees the first call's mask and head weights (cut to the edit rows
    and the image x text block): rows that see no text key, or no key at all, included."""
    seed = 300 + 2 * ["H", "BH", "BHN"].index(weights_shape) + (backend == "triton")
    q, k, v, where, g = random_call(seed, "bnhd")
    batch, n, heads = q.shape[:3]
    q_tags = torch.randint(1, 8, (batch, n), generator=g)
    k_tags = torch.randint(0, 8, (batch, n), generator=g)
    (i0, _), (t0, t1) = where.image, where.text
    q_tags[:, i0] = 0  # an image query that sees nothing
    q_tags[:, i0 + 1], k_tags[:, t0:t1] = 8, k_tags[:, t0:t1] & 7  # one that sees no text key
    k_tags[:, t0] |= 1
    shape = {"H": (heads,), "BH": (batch, heads), "BHN": (batch, heads, n)}[weights_shape]
    head_weights = torch.rand(shape, generator=g) + 0.5
    tags = iidkern.tag_mask(q_tags, k_tags) if weights_shape == "BH" else (q_tags, k_tags)
    cfg = HeadRouterConfig(alpha=2.0, upsilon=5.0, pairs=((0, 1),))
    policy = ChainPolicy(_MaskAndWeights(tags, head_weights), HeadRouterPolicy(cfg))
    out = attend(q, k, v, where, policy, backend=backend)
    expected = dense_headrouter(q, k, v, where.text, where.image, cfg, tags=(q_tags, k_tags),
                                head_weights=head_weights)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(out[:, i0], torch.zeros_like(out[:, i0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_same_call_dtr_in_16_bit_calls(dtype):
    """16-bit inputs on the kernels: within the dtype's rounding of the float64 one-pass result
    (the weighted output is the first output, rounded, plus the small call's part)."""
    q, k, v, where, _ = random_call(400 + (dtype == torch.float16), "bnhd")
    q, k, v = (t.to(dtype) for t in (q, k, v))
    cfg = HeadRouterConfig(alpha=5.0, upsilon=5.0)
    out = attend(q, k, v, where, HeadRouterPolicy(cfg), backend="triton")
    assert out.dtype == dtype
    expected = dense_headrouter(q, k, v, where.text, where.image, cfg)
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


def test_same_call_dtr_needs_the_calls_inputs():
    """receive without the call's inputs (a wrapping policy that does not pass them on) is an
    error naming what is missing, not an unweighted output."""
    q, k, v = qkv(50)
    policy = HeadRouterPolicy(HeadRouterConfig(route=False))
    request = policy.request(site(0))
    assert request.keep_inputs and request.return_lse and request.block_multiplier is None
    result = iidkern.attention(q, k, v, layout="bnhd", backend="reference", probes=request.probes, return_lse=True)
    with pytest.raises(RuntimeError, match="inputs"):
        policy.receive(site(0), result)


POLICY_WORDS = ["HeadRouterPolicy: pairs ((0, 3),)", "row(s) [3]", "batch of 2 rows"]
KERNEL_WORDS = ["pair_stats", "[0, 2)", "[[0, 3]]"]  # the call's own check of the pairs it is asked for


@pytest.mark.parametrize("kwargs,words", [
    (dict(), POLICY_WORDS), (dict(route=False), POLICY_WORDS), (dict(route=False, dtr_map="previous"), POLICY_WORDS),
    (dict(dtr_image="off"), KERNEL_WORDS), (dict(dtr_image="code", dtr_block_kinds=("double",)), KERNEL_WORDS)])
def test_pairs_outside_the_batch_are_named(kwargs, words):
    """A pair row the call's batch lacks is a ValueError naming it, in every form (not an
    IndexError; the same-call form asks the kernel for no pair statistics, whose check names it
    where it is asked)."""
    policy = HeadRouterPolicy(HeadRouterConfig(pairs=((0, 3),), **kwargs))
    assert_raises_naming(ValueError, words, attend, *qkv(60), site(0), policy, backend="reference")


def test_router_and_multiplier_together_on_several_pairs():
    """Batch [recon, edit, recon, edit] (e.g. two images): each pair routed with its own weights."""
    q, k, v = qkv(5, batch=4)
    cfg = HeadRouterConfig(pairs=((0, 1), (2, 3)), dtr_image="off")
    out = attend(q, k, v, site(0), HeadRouterPolicy(cfg), backend="reference")
    ref = dense_out(dense_probs(q, k), v)
    for a, b in ((0, 1), (2, 3)):
        w = formula_router_weights(ref[[a, b]], 0.2, 0.5)
        assert torch.allclose(out[b].double(), ref[b] * w[None, :, None], atol=1e-4)
        assert torch.allclose(out[a].double(), ref[a], atol=1e-4)


def test_text_residual():
    g = torch.Generator().manual_seed(6)
    text_in, text_out = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    res = TextResidual(keep=0.1, rows=(1,))
    mixed = res(0, 3, text_in, text_out)
    assert torch.equal(mixed[0], text_out[0])
    assert torch.allclose(mixed[1], 0.1 * text_in[1] + 0.9 * text_out[1])
    assert torch.equal(res(2, 3, text_in, text_out), text_out)  # the last double block is left alone
    assert torch.allclose(TextResidual(0.25)(0, 3, text_in, text_out), 0.25 * text_in + 0.75 * text_out)


def test_key_regions():
    q, k, v = qkv(7)
    policy = KeyRegionPolicy(tokens=[1, 3], row=1)
    attend(q, k, v, site(0), policy, backend="reference")
    attend(q, k, v, site(0, block=1), policy, backend="reference")
    p = dense_probs(q, k)[1]  # [H, N, N]
    maps = 2 * p[:, N_TEXT:, [1, 3]].sum(0).transpose(0, 1)  # summed over heads, two calls
    assert torch.allclose(policy.maps.double(), maps, atol=1e-5)
    lo, hi = maps.min(-1, keepdim=True).values, maps.max(-1, keepdim=True).values
    assert torch.equal(policy.masks(0.2), (maps - lo) / (hi - lo) >= 0.2)


def test_config_errors():
    with pytest.raises(ValueError, match="dtr_image"):
        HeadRouterConfig(dtr_image="both")
    assert_raises_naming(ValueError, ["dtr_map", "'same'", "'previous'", "'next'"], HeadRouterConfig, dtr_map="next")
    with pytest.raises(ValueError, match="pairs"):
        HeadRouterConfig(pairs=((1, 1),))
    with pytest.raises(ValueError, match="keep"):
        TextResidual(keep=1.5)
    for alpha in (0.0, -1.0):  # DTR's weights alpha * sigmoid(.) multiply probabilities
        with pytest.raises(ValueError, match=f"HeadRouterConfig: alpha must be > 0, got {alpha}"):
            HeadRouterConfig(alpha=alpha)


@pytest.mark.parametrize("build,exc,words", [
    (lambda: HeadRouterPolicy(IIDConfig()), TypeError, ["HeadRouterPolicy: config", "HeadRouterConfig", "IIDConfig"]),
    (lambda: TextResidual("a"), TypeError, ["TextResidual: keep", "'a'"]),
    (lambda: TextResidual(0.1, rows=[1.5]), TypeError, ["TextResidual: rows", "1.5"]),
    (lambda: KeyRegionPolicy([0], row="1"), TypeError, ["KeyRegionPolicy: row", "'1'"]),
    (lambda: KeyRegionPolicy([0], row=-1), ValueError, ["KeyRegionPolicy: row", ">= 0"]),
    (lambda: KeyRegionPolicy([0], steps=3), TypeError, ["KeyRegionPolicy: steps", "3"]),
    (lambda: KeyRegionPolicy([0], steps=[0.5]), TypeError, ["KeyRegionPolicy: steps", "0.5"]),
    (lambda: KeyRegionPolicy([0], block_kinds="double"), TypeError, ["KeyRegionPolicy: block_kinds", "('double',)"]),
    (lambda: KeyRegionPolicy([0], steps=torch.tensor(3)), TypeError, ["KeyRegionPolicy: steps", "tensor(3)"]),
    (lambda: KeyRegionPolicy([0], row=torch.tensor(True)), TypeError, ["KeyRegionPolicy: row"]),
    (lambda: KeyRegionPolicy([0], row=torch.tensor([1])), TypeError, ["KeyRegionPolicy: row"]),
    (lambda: TextResidual(0.1, rows=3), TypeError, ["TextResidual: rows", "3"]),
])
def test_policies_refuse_wrong_arguments_when_built(build, exc, words):
    assert_raises_naming(exc, words, build)


def test_key_regions_sum_a_steps_first_forward_only():
    """With two forwards a step (true CFG: the negative prompt's tokens are other words) the
    maps sum the first; without a step number every call counts."""
    policy = KeyRegionPolicy(tokens=[1, 3], row=1)
    first, second = qkv(11), qkv(12)
    attend(*first, site(0), policy, backend="reference")
    assert policy.request(site(0)) is None  # the second forward of step 0 is not probed
    attend(*second, site(0), policy, backend="reference")
    maps = dense_probs(*first[:2])[1][:, N_TEXT:, [1, 3]].sum(0).transpose(0, 1)
    assert torch.allclose(policy.maps.double(), maps, atol=1e-5)
    attend(*second, site(1), policy, backend="reference")  # the next step counts again
    maps = maps + dense_probs(*second[:2])[1][:, N_TEXT:, [1, 3]].sum(0).transpose(0, 1)
    assert torch.allclose(policy.maps.double(), maps, atol=1e-5)
    no_steps = KeyRegionPolicy(tokens=[1], row=1)
    for _ in range(2):
        attend(*first, site(None), no_steps, backend="reference")
    assert torch.allclose(no_steps.maps.double(), 2 * dense_probs(*first[:2])[1][:, N_TEXT:, [1]].sum(0).T, atol=1e-5)


def test_key_regions_name_a_row_outside_the_batch():
    q, k, v = qkv(8)  # batch 2
    with pytest.raises(ValueError, match="KeyRegionPolicy: row 5 is out of range for a batch of 2"):
        attend(q, k, v, site(0), KeyRegionPolicy([1], row=5), backend="reference")


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(gamma="a"), TypeError, ["gamma", "'a'"]), (dict(alpha=float("nan")), ValueError, ["alpha", "finite"]),
    (dict(route="yes"), TypeError, ["route", "bool"]),
    (dict(dtr_block_kinds="single"), TypeError, ["dtr_block_kinds", "('single',)"]),
    (dict(steps=5), TypeError, ["steps", "(start, stop)"]), (dict(steps=(5, 2)), ValueError, ["steps", "start < stop"]),
    (dict(steps=(-1, 2)), ValueError, ["steps start", ">= 0"]),
    (dict(pairs=(0, 1)), TypeError, ["pairs", "((0, 1),)", "(0, 1)"]),
    (dict(pairs=((0, 1.5),)), TypeError, ["pairs", "1.5"]),
])
def test_config_refuses_wrong_types_when_built(kwargs, exc, words):
    """Named when built: a bare string of block kinds would be read letter by letter (DTR
    silently off), a bare pair as two rows, an empty step window would never run."""
    assert_raises_naming(exc, words, HeadRouterConfig, **kwargs)
    assert HeadRouterConfig(dtr_block_kinds=["single"], steps=[0, 3]).dtr_block_kinds == ("single",)
    import numpy as np  # values computed by numpy or torch stay accepted, as plain Python values
    c = HeadRouterConfig(route=np.bool_(True), dtr_text=torch.tensor(False), steps=np.array([0, 3]),
                         gamma=np.array(0.3), alpha=torch.tensor(5.0), pairs=torch.tensor([[0, 1]]))
    assert (c.route, c.dtr_text, c.steps, c.gamma, c.alpha, c.pairs) == (True, False, (0, 3), 0.3, 5.0, ((0, 1),))
    assert type(c.route) is bool and type(c.gamma) is float


@pytest.mark.parametrize("pairs,message", [
    (((0, 1), (2, 1)), r"repeat edit row\(s\) \[1\]"),
    (((0, 1), (1, 2)), r"row\(s\) \[1\] as both a recon row and an edit row"),
    (((2, 3), (3, 0)), r"row\(s\) \[3\] as both"),
    (((0, -1),), r">= 0"),
])
def test_pairs_write_each_edit_row_once(pairs, message):
    """scale_heads and the DTR multiplier write row ``edit_row`` once per pair: a repeated edit row
    (last write wins, undefined on the GPU) or an edit row that is also a recon row is refused."""
    with pytest.raises(ValueError, match="pairs") as info:
        HeadRouterConfig(pairs=pairs)
    assert info.match(message)
    assert HeadRouterConfig(pairs=((0, 1), (0, 2))).edit_rows == (1, 2)  # a shared recon row is fine


def test_key_regions_reset_between_runs():
    q, k, v = qkv(int(torch.randint(0, 1000, (1,))))
    policy, fresh = KeyRegionPolicy(tokens=[0, (2, 4)], row=1), KeyRegionPolicy(tokens=[0, (2, 4)], row=1)
    attend(q, k, v, site(0), policy, backend="reference")
    policy.reset()
    assert policy.maps is None
    q2, k2, v2 = qkv(int(torch.randint(1000, 2000, (1,))))
    attend(q2, k2, v2, site(0), policy, backend="reference")
    attend(q2, k2, v2, site(0), fresh, backend="reference")
    assert torch.equal(policy.maps, fresh.maps)


def test_reused_policies_start_a_new_run_when_the_steps_go_back():
    """A HeadRouter policy reused for a second run without reset(): step 0 of that run must
    not get the first run's last-step DTR multiplier, and key-region maps must not add up
    across runs (steps only grow within a run)."""
    cfg = HeadRouterConfig(route=False, dtr_image="paper", dtr_map="previous", dtr_heads="mean", alpha=5.0, upsilon=5.0)
    policy = HeadRouterPolicy(cfg)
    for step, seed in ((0, 11), (1, 12)):
        attend(*qkv(seed), site(step), policy, backend="reference")
    q, k, v = qkv(13)
    out = attend(q, k, v, site(0), policy, backend="reference")  # run 2, step 0: no multiplier yet
    assert torch.allclose(out.double(), dense_out(dense_probs(q, k), v), atol=1e-4)

    regions, fresh = KeyRegionPolicy(tokens=[0, (2, 4)], row=1), KeyRegionPolicy(tokens=[0, (2, 4)], row=1)
    for step, seed in ((0, 21), (1, 22)):
        attend(*qkv(seed), site(step), regions, backend="reference")
    attend(*qkv(23), site(0), regions, backend="reference")  # a new run
    attend(*qkv(23), site(0), fresh, backend="reference")
    assert torch.equal(regions.maps, fresh.maps)


def test_pairs_and_key_region_tokens_must_be_integers():
    """As ``attention(pair_stats=...)``: a float row would be truncated (1.9 -> 1), True is no row."""
    with pytest.raises(TypeError, match="pairs"):
        HeadRouterConfig(pairs=((0, 1.9),))
    with pytest.raises(TypeError, match="pairs"):
        HeadRouterConfig(pairs=((0, True),))
    with pytest.raises(TypeError, match="tokens"):
        KeyRegionPolicy(tokens=[0.5])
    with pytest.raises(TypeError, match="tokens"):
        KeyRegionPolicy(tokens=[(0, 2.5)])
    assert KeyRegionPolicy(tokens=[torch.tensor(1), (2, 4)]).groups == ((1, 2), (2, 4))


@pytest.mark.parametrize("rows", [[1], [0, 1], [2, 0], [-1], [-3, -1], [1, 2, 3]])
def test_batch_rows_equals_list_indexing(rows):
    """The policies' row selection without a list index (which synchronizes a GPU): x[rows]."""
    from iidkern.edit.rows import batch_rows

    x = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(len(rows)))
    assert torch.equal(batch_rows(x, rows), x[rows])
    if rows == [0, 1]:
        assert batch_rows(x, rows).data_ptr() == x.data_ptr()  # consecutive rows: a view, no copy


@pytest.mark.parametrize("kwargs", [dict(), dict(dtr_map="previous"), dict(dtr_image="off"), dict(route=False)])
def test_a_layout_other_than_the_configs_is_named(kwargs):
    """cfg.layout tells receive how to read rows, heads and tokens: a call in the other layout
    would be routed per token instead of per head, silently (the same-call form's DTR part used
    the call's own layout)."""
    q, k, v = (t.transpose(1, 2) for t in qkv(61))
    policy = HeadRouterPolicy(HeadRouterConfig(**kwargs))
    assert_raises_naming(ValueError, ["HeadRouterConfig.layout is 'bnhd'", "attends in 'bhnd'"], attend, q, k, v,
                         site(1), policy, layout="bhnd", backend="reference")


class _Multiplier(AttentionPolicy):
    def request(self, site):
        values = torch.full((2, N_IMG, N_TEXT), 1.5)
        return AttentionRequest(block_multiplier=iidkern.BlockMultiplier(values, site.image[0], site.text[0]))


def test_same_call_dtr_refuses_another_policys_multiplier():
    """w would have to multiply the chain's multiplier, not add to it: refused, as the one-pass
    form refuses two multipliers."""
    policy = ChainPolicy(_Multiplier(), HeadRouterPolicy(HeadRouterConfig(route=False)))
    assert_raises_naming(ValueError, ["dtr_map='same'", "block_multiplier"], attend, *qkv(62), site(0), policy,
                         backend="reference")


def test_a_call_without_a_step_is_outside_the_step_window():
    """As for the IID and key-region policies: a window set, a call without a step number runs plain."""
    q, k, v = qkv(63)
    unnumbered = AttentionSite(block=0, block_kind="double", text=(0, N_TEXT), image=(N_TEXT, N_TEXT + N_IMG))
    policy = HeadRouterPolicy(HeadRouterConfig(steps=(0, 3)))
    assert policy.request(unnumbered) is None
    assert policy.request(site(1)) is not None and policy.request(site(3)) is None


def test_text_residual_rows_outside_the_batch_are_named():
    text = torch.randn(2, 4, 8)
    assert_raises_naming(ValueError, ["TextResidual: rows [5]", "batch of 2 rows"], TextResidual(rows=(5,)), 0, 3,
                         text, text)


@pytest.mark.parametrize("rows", [[2, 3], [5], [-5]])
def test_batch_rows_refuses_rows_outside_like_indexing(rows):
    from iidkern.edit.rows import batch_rows

    x = torch.randn(3, 2)
    with pytest.raises(IndexError, match="out of range for 3 rows"):
        batch_rows(x, rows)
    assert batch_rows(x, []).shape == x[[]].shape == (0, 2)


@pytest.mark.parametrize("kwargs", [dict(), dict(route=False), dict(dtr_image="off"),
                                    dict(dtr_image="code", dtr_block_kinds=("double",))])
def test_gradients_flow_through_headrouter_on_the_reference_backend(kwargs):
    """The policies write their copies in place only where autograd has not saved them: a backward
    through a HeadRouter call equals the dense formula's (reference backend; the kernels are
    forward-only)."""
    q, k, v = (t.requires_grad_() for t in qkv(64))
    cfg = HeadRouterConfig(alpha=5.0, upsilon=5.0, **kwargs)
    out = attend(q, k, v, site(0), HeadRouterPolicy(cfg), backend="reference")
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(65))
    (out * weights).sum().backward()
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    if cfg.dtr_image == "code":  # dense code form: IARouter on the call's output, then per image token of the
        p = dense_probs(q2, k2)  # edit row its head-mean text mass weighs the routed output
        expected = dense_out(p, v2)
        if cfg.route:
            w = formula_router_weights(expected, cfg.gamma, cfg.delta)
            expected = torch.cat([expected[:1], expected[1:] * w[None, None, :, None]])
        mass = p[1][:, N_TEXT:, :N_TEXT].sum(-1).mean(0)
        scale = torch.ones(2, N_TEXT + N_IMG, 1, 1, dtype=torch.float64)
        scale[1, N_TEXT:, 0, 0] = 5.0 * torch.sigmoid(5.0 * torch.softmax(mass, dim=0))
        expected = expected * scale
    else:
        expected = dense_headrouter(q2, k2, v2, (0, N_TEXT), (N_TEXT, N_TEXT + N_IMG), cfg)
    (expected * weights.double()).sum().backward()
    for got, want in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_call_without_image_tokens_is_routed_without_dtr(backend):
    """No image x text block to weigh (a text-only call): DTR leaves it alone, IARouter still
    routes it (an empty image range was an error from TokenGroups.each)."""
    q, k, v = qkv(66)
    text_only = AttentionSite(block=0, block_kind="double", text=(0, N_TEXT + N_IMG), image=(N_TEXT + N_IMG,) * 2,
                              step=0)
    policy = HeadRouterPolicy(HeadRouterConfig(gamma=0.3, delta=0.4))
    out = attend(q, k, v, text_only, policy, backend=backend)
    ref = dense_out(dense_probs(q, k), v)
    w = formula_router_weights(ref, 0.3, 0.4)
    torch.testing.assert_close(out.double(), torch.stack([ref[0], ref[1] * w[None, :, None]]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_branch_pair_stats_of_an_output_equal_the_float64_sums(backend, layout, dtype):
    """The statistics of an output changed after the call: the kernels' pair pass on it (one
    read, under the interpreter here) and the PyTorch form give the float64 sums."""
    g = torch.Generator().manual_seed(500 + 7 * ["reference", "triton"].index(backend) + 3 * (layout == "bhnd")
                                      + [torch.float32, torch.bfloat16, torch.float16].index(dtype))
    batch, n, heads, d = 4, int(torch.randint(5, 40, (1,), generator=g)), 3, 24  # d: not a power of two
    out = torch.randn(batch, n, heads, d, generator=g).to(dtype)
    pairs = ((0, 2), (3, 1), (1, 1))
    stats = branch_pair_stats(in_layout(out, layout), pairs, layout, backend=backend)
    o = out.double()
    for p, (a, b) in enumerate(pairs):
        for name, value in (("dot", (o[a] * o[b]).sum((0, 2))), ("norm0_sq", (o[a] ** 2).sum((0, 2))),
                            ("norm1_sq", (o[b] ** 2).sum((0, 2)))):
            got = getattr(stats, name)
            assert got.dtype == torch.float32 and got.shape == (len(pairs), heads)
            torch.testing.assert_close(got[p].double(), value, rtol=1e-5, atol=1e-4)


def test_branch_pair_stats_and_scale_heads_refuse_bad_rows_and_backends():
    out = torch.randn(2, 6, 2, 8)
    for backend in ("reference", "triton"):
        for pairs in (((0, -1),), ((0, 2),)):
            with pytest.raises(ValueError, match=r"branch_pair_stats: pairs .* outside \[0, 2\)"):
                branch_pair_stats(out, pairs, "bnhd", backend=backend)
    with pytest.raises(ValueError, match="branch_pair_stats: backend"):
        branch_pair_stats(out, ((0, 1),), "bnhd", backend="tirton")
    with pytest.raises(ValueError, match="scale_heads: rows must be distinct"):
        scale_heads(out, (1, 1), torch.ones(2, 2))
    for rows in ((0, 5), (-1,)):
        with pytest.raises(ValueError, match=r"scale_heads: rows must lie in \[0, \d+\)"):
            scale_heads(out, rows, torch.ones(len(rows), 2))


def test_branch_pair_stats_auto_takes_pytorch_on_cpu_and_under_autograd():
    out = torch.randn(2, 6, 2, 8, requires_grad=True)
    stats = branch_pair_stats(out, ((0, 1),), "bnhd", backend="auto")
    stats.dot.sum().backward()  # the PyTorch form: differentiable
    torch.testing.assert_close(out.grad[0], out.detach()[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
def test_scale_heads_rounds_once_with_and_without_autograd(dtype, layout):
    """The in-place product (no autograd) gives the bits of the float32 product rounded once,
    as the out-of-place one that autograd takes; other rows are untouched."""
    g = torch.Generator().manual_seed(600 + 2 * [torch.float32, torch.bfloat16, torch.float16].index(dtype)
                                      + (layout == "bhnd"))
    out = in_layout(torch.randn(3, 11, 4, 8, generator=g), layout).to(dtype)
    weights = 1 + torch.rand(2, 4, generator=g)
    expected = out.clone()
    w = weights.to(dtype).float()
    for p, r in enumerate((2, 0)):
        per_head = w[p][None, :, None] if layout == "bnhd" else w[p][:, None, None]
        expected[r] = (out[r].float() * per_head).to(dtype)
    fast = scale_heads(out, (2, 0), weights, layout)
    assert torch.equal(fast, expected) and not torch.equal(fast, out)
    assert torch.equal(fast[1], out[1])
    tracked = out.clone().requires_grad_(dtype == torch.float32)
    weights_tracked = weights.clone().requires_grad_(dtype != torch.float32)
    slow = scale_heads(tracked, (2, 0), weights_tracked, layout)
    assert torch.equal(slow.detach(), expected)
    slow.float().sum().backward()  # autograd reaches what requires grad
    assert (tracked.grad if dtype == torch.float32 else weights_tracked.grad) is not None


@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
def test_scale_heads_copy_leaves_the_input_and_in_place_scales_it(layout):
    """``copy=True`` (the default) writes a new tensor of ``out``'s strides and leaves ``out`` as it
    was; ``copy=False`` scales ``out`` itself, to the same bits."""
    g = torch.Generator().manual_seed(610 + (layout == "bhnd"))
    out = in_layout(torch.randn(4, 9, 3, 8, generator=g), layout).to(torch.bfloat16)
    before = out.clone()
    weights = 1 + torch.rand(2, 3, generator=g)
    copied = scale_heads(out, (3, 1), weights, layout)
    assert torch.equal(out, before) and copied.stride() == out.stride()
    assert torch.equal(copied[0], out[0]) and torch.equal(copied[2], out[2])
    assert not torch.equal(copied[1], out[1]) and not torch.equal(copied[3], out[3])
    same = scale_heads(out, (3, 1), weights, layout, copy=False)
    assert same is out and torch.equal(out, copied)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_call_dtr_gives_the_same_bits_with_and_without_autograd(dtype):
    """Without autograd the weighted rows are summed with fewer float32 copies; the bits are
    those of the out-of-place form autograd takes (route on: the statistics too)."""
    q, k, v, where, _ = random_call(700 + (dtype == torch.bfloat16), "bnhd")
    q, k, v = (t.to(dtype) for t in (q, k, v))
    outs = []
    for grad in (False, True):
        policy = HeadRouterPolicy(HeadRouterConfig(alpha=4.0))
        inputs = [t.clone().requires_grad_(grad) for t in (q, k, v)]
        outs.append(attend(*inputs, where, policy, layout="bnhd", backend="reference"))
    assert outs[1].requires_grad and not outs[0].requires_grad
    assert torch.equal(outs[0], outs[1].detach())
