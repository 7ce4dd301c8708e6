"""iidkern's diffusers processors (``iidkern.integrations.diffusers``) on tiny Flux, SD3 / SD3.5 and QwenImage.

Reference values never come from iidkern: the stock diffusers processors run with a spy on
their attention function (``dispatch_attention_fn`` for Flux / QwenImage, SDPA for SD3),
which records q, k, v of every call and can replace one call's output by a manual,
materialized softmax(QK^T) computation (masked, head-weighted or multiplied).
Models are built from configs with seeded random weights (norm weights away from 1, so
QK norms matter), fp32, odd token grids; inputs are fresh random tensors.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional, Tuple

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel, SD3Transformer2DModel  # noqa: E402
from diffusers.models.transformers import transformer_flux, transformer_qwenimage  # noqa: E402

from iidkern.edit.headrouter import HeadRouterConfig, HeadRouterPolicy  # noqa: E402
from iidkern.integrations.diffusers import FluxIidkernProcessor, IidkernHandle, use_iidkern  # noqa: E402
from iidkern.policy import AttentionPolicy, AttentionRequest, CapturePolicy  # noqa: E402
from iidkern.specs import BlockMultiplier, Probe, TokenGroups, instruction_tags  # noqa: E402

from helpers import RecordSites, assert_close_rel, rel_err  # noqa: E402

TOL = 1e-5  # fp32 relative-norm tolerance of a whole forward pass
PROBE_TOL = 1e-5
BATCH, HEADS, HEAD_DIM, NUM_TEXT = 2, 2, 16, 7


# --------------------------------------------------------------------------- models and inputs
@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded weights: matrices ~ N(0, 1/fan_in), biases small, norm weights around 1 (never exactly 1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if p.dim() >= 2:
            p.copy_(noise / math.sqrt(p.shape[-1]))
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        else:
            p.copy_(1 + 0.2 * noise)
    return model.eval()


def _flux_ids(rows, cols, index=0):
    ids = torch.zeros(rows, cols, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(-1, 3)


@dataclass
class Case:
    """A tiny model, its inputs, and where text and image lie in its joint sequence (known, not asked)."""

    name: str
    model: torch.nn.Module
    inputs: dict
    kwargs_name: str  # the forward argument diffusers hands to the attention processors
    text: Tuple[int, int]
    image: Tuple[int, int]  # noisy image tokens only
    seq: int
    layer: int  # the attention call probed / edited by the tests
    spy_target: Tuple[object, str, str]  # (module, attribute, layout) of the stock attention function
    kinds: Tuple[str, ...]  # block kind of every attention call, in order
    source: Optional[Tuple[int, int]] = None
    key_mask: Optional[torch.Tensor] = None  # [B, seq] bool: keys visible to every query (QwenImage padding)

    def run(self, **extra):
        with torch.no_grad():
            return self.model(**self.inputs, **extra).sample


def flux_case(num_double=2, num_single=2, rows=3, cols=5, source_rows=0, source_cols=0, layer=None, seed=0):
    model = _randomize(FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=num_double, num_single_layers=num_single,
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=24,
        pooled_projection_dim=12, axes_dims_rope=(4, 6, 6)), seed)
    g = torch.Generator().manual_seed(seed + 100)
    num_image, num_source = rows * cols, source_rows * source_cols
    img_ids = _flux_ids(rows, cols)
    if num_source:  # Kontext: source tokens appended to the image stream, marked by img_ids[:, 0] = 1
        img_ids = torch.cat([img_ids, _flux_ids(source_rows, source_cols, index=1)])
    inputs = dict(hidden_states=torch.randn(BATCH, num_image + num_source, 8, generator=g),
                  encoder_hidden_states=torch.randn(BATCH, NUM_TEXT, 24, generator=g),
                  pooled_projections=torch.randn(BATCH, 12, generator=g),
                  timestep=torch.rand(BATCH, generator=g) * 0.9 + 0.05,
                  img_ids=img_ids, txt_ids=torch.zeros(NUM_TEXT, 3))
    seq = NUM_TEXT + num_image + num_source
    return Case(name="flux", model=model, inputs=inputs, kwargs_name="joint_attention_kwargs",
                text=(0, NUM_TEXT), image=(NUM_TEXT, NUM_TEXT + num_image), seq=seq,
                layer=num_double + num_single - 1 if layer is None else layer,  # default: a single block
                spy_target=(transformer_flux, "dispatch_attention_fn", "bnhd"),
                kinds=("double",) * num_double + ("single",) * num_single,
                source=(NUM_TEXT + num_image, seq) if num_source else None)


def sd3_case(qk_norm="rms_norm", dual=(0,), num_layers=3, rows=3, cols=5, seed=1):
    model = _randomize(SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=num_layers, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=24, caption_projection_dim=HEADS * HEAD_DIM,
        pooled_projection_dim=12, out_channels=4, pos_embed_max_size=16, dual_attention_layers=dual,
        qk_norm=qk_norm), seed)
    g = torch.Generator().manual_seed(seed + 100)
    num_image = rows * cols
    inputs = dict(hidden_states=torch.randn(BATCH, 4, 2 * rows, 2 * cols, generator=g),
                  encoder_hidden_states=torch.randn(BATCH, NUM_TEXT, 24, generator=g),
                  pooled_projections=torch.randn(BATCH, 12, generator=g),
                  timestep=torch.rand(BATCH, generator=g) * 900 + 50)
    kinds = tuple(kind for i in range(num_layers) for kind in (("joint", "image") if i in dual else ("joint",)))
    return Case(name="sd3", model=model, inputs=inputs, kwargs_name="joint_attention_kwargs",
                text=(num_image, num_image + NUM_TEXT), image=(0, num_image), seq=num_image + NUM_TEXT,
                layer=kinds.index("joint", 1) if "joint" in kinds[1:] else 0,  # a joint call after the first
                spy_target=(torch.nn.functional, "scaled_dot_product_attention", "bhnd"), kinds=kinds)


def qwen_case(rows=3, cols=5, padded=True, source_rows=0, source_cols=0, seed=2):
    model = _randomize(QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=24, axes_dims_rope=(4, 6, 6)), seed)
    g = torch.Generator().manual_seed(seed + 100)
    num_image, num_source = rows * cols, source_rows * source_cols
    shapes = [(1, rows, cols)] + ([(1, source_rows, source_cols)] if num_source else [])
    mask = torch.ones(BATCH, NUM_TEXT, dtype=torch.bool)
    if padded:
        mask[0, NUM_TEXT - 2:] = False  # the first prompt is two tokens shorter
    inputs = dict(hidden_states=torch.randn(BATCH, num_image + num_source, 16, generator=g),
                  encoder_hidden_states=torch.randn(BATCH, NUM_TEXT, 24, generator=g),
                  encoder_hidden_states_mask=mask if padded else None,
                  timestep=torch.rand(BATCH, generator=g) * 0.9 + 0.05,
                  img_shapes=[shapes] * BATCH)
    seq = NUM_TEXT + num_image + num_source
    key_mask = torch.cat([mask, torch.ones(BATCH, seq - NUM_TEXT, dtype=torch.bool)], 1) if padded else None
    return Case(name="qwen", model=model, inputs=inputs, kwargs_name="attention_kwargs",
                text=(0, NUM_TEXT), image=(NUM_TEXT, NUM_TEXT + num_image), seq=seq, layer=1,
                spy_target=(transformer_qwenimage, "dispatch_attention_fn", "bnhd"), kinds=("double", "double"),
                source=(NUM_TEXT + num_image, seq) if num_source else None, key_mask=key_mask)


CASES = {
    "flux": lambda: flux_case(),
    "flux-kontext": lambda: flux_case(num_double=1, num_single=2, rows=3, cols=3, source_rows=2, source_cols=3),
    "sd3": lambda: sd3_case(qk_norm=None, dual=(), num_layers=2, rows=5, cols=3),
    "sd35-qknorm-dual": lambda: sd3_case(),
    "qwen-padded": lambda: qwen_case(),
    "qwen-edit": lambda: qwen_case(padded=False, source_rows=1, source_cols=3),
}
PROBED = ["flux", "sd35-qknorm-dual", "qwen-padded"]


# --------------------------------------------------------------------------- the independent reference
def manual_attention(q, k, v, allowed=None, head_weights=None, multiplier=None):
    """softmax(QK^T / sqrt(D)) materialized in float64, ``[B, N, H, D]`` in and out.

    ``allowed``: [B, Nq, Nk] bool; ``head_weights``: [H] (scales each head's output);
    ``multiplier``: (values [B, Mq, Mk], query_start, key_start) applied to P after the softmax.
    """
    qd, kd, vd = (t.double() for t in (q, k, v))
    probs = attention_probs(q, k, allowed)
    if multiplier is not None:
        values, q0, k0 = multiplier
        probs = probs.clone()
        probs[:, :, q0:q0 + values.shape[1], k0:k0 + values.shape[2]] *= values.double()[:, None]
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vd)
    if head_weights is not None:
        out = out * head_weights.double()[None, None, :, None]
    return out.to(q.dtype)


def attention_probs(q, k, allowed=None):
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1)


class AttentionSpy:
    """Stands in for the stock attention function: records every call, replaces the chosen ones."""

    def __init__(self, original, layout):
        self.original, self.layout = original, layout
        self.calls = []  # (q, k, v [B, N, H, D], key mask [B, Nk] bool or None)
        self.replace = {}  # call index -> fn(q, k, v, key_mask) -> [B, N, H, D]

    def __call__(self, query, key, value, attn_mask=None, **kwargs):
        to_bnhd = (lambda t: t) if self.layout == "bnhd" else (lambda t: t.transpose(1, 2))
        q, k, v = (to_bnhd(t) for t in (query, key, value))
        key_mask = None if attn_mask is None else attn_mask.reshape(attn_mask.shape[0], -1).bool()
        index = len(self.calls)
        self.calls.append((q, k, v, key_mask))
        if index in self.replace:
            return to_bnhd(self.replace[index](q, k, v, key_mask))
        return self.original(query, key, value, attn_mask=attn_mask, **kwargs) if attn_mask is not None \
            else self.original(query, key, value, **kwargs)


@contextlib.contextmanager
def spying(case: Case):
    module, attribute, layout = case.spy_target
    original = getattr(module, attribute)
    spy = AttentionSpy(original, layout)
    setattr(module, attribute, spy)
    try:
        yield spy
    finally:
        setattr(module, attribute, original)


def with_key_mask(allowed: Optional[torch.Tensor], key_mask: Optional[torch.Tensor], batch, nq, nk):
    if allowed is None and key_mask is None:
        return None
    allowed = torch.ones(batch, nq, nk, dtype=torch.bool) if allowed is None else allowed
    return allowed if key_mask is None else allowed & key_mask[:, None, :]


# --------------------------------------------------------------------------- policies used by the tests
class AtLayer(AttentionPolicy):
    """Asks ``make(site)`` at one layer only; records every site it sees."""

    def __init__(self, layer: int, make: Callable):
        self.layer, self.make, self.sites, self.results = layer, make, [], []

    def request(self, site):
        self.sites.append(site)
        return self.make(site) if site.layer == self.layer else None

    def receive(self, site, result):
        self.results.append(result)
        return None


# --------------------------------------------------------------------------- parity and sites
@pytest.mark.parametrize("name", list(CASES))
def test_processors_match_stock_diffusers(name):
    case = CASES[name]()
    expected = case.run()
    policy = RecordSites()
    with use_iidkern(case.model, policy=policy, backend="reference") as handle:
        out = case.run()
        assert [info.block_kind for info in handle.layers] == list(case.kinds)
        handle.policy = None  # no policy: no sites are built, the plain attention runs
        plain = case.run()
    assert_close_rel(out, expected, TOL, f"{name}: iidkern processors vs stock")
    assert_close_rel(plain, expected, TOL, f"{name}: iidkern processors without a policy vs stock")

    assert [s.layer for s in policy.sites] == list(range(len(case.kinds)))
    assert [s.block_kind for s in policy.sites] == list(case.kinds)
    counts = {}
    for site in policy.sites:
        assert site.num_layers == len(case.kinds)
        # block counts within its kind; SD3.5's attn2 ("image") carries the index of its joint block
        expected_block = counts["joint"] - 1 if site.block_kind == "image" else counts.get(site.block_kind, 0)
        counts[site.block_kind] = counts.get(site.block_kind, 0) + 1
        assert site.block == expected_block, f"{name}: {site}"
        if site.block_kind == "image":  # SD3.5 attn2: image tokens only
            assert (site.text, site.image) == ((0, 0), case.image)
            continue
        assert (site.text, site.image) == (case.text, case.image), f"{name}: {site}"
        assert site.extra == ((("source", case.source),) if case.source else ())
    if case.key_mask is not None:  # the padding mask matters, so parity above really checked it
        inputs = dict(case.inputs, encoder_hidden_states_mask=None)
        with torch.no_grad():
            unmasked = case.model(**inputs).sample
        assert rel_err(unmasked, expected) > 1e-3


def test_fused_projections():
    """Flux with fused QKV projections matches; SD3's fused processor (which drops QK norms) is refused."""
    case = flux_case(num_double=1, num_single=1)
    case.model.fuse_qkv_projections()
    expected = case.run()
    with use_iidkern(case.model, backend="reference"):
        out = case.run()
    assert_close_rel(out, expected, TOL, "flux fused")
    sd3 = sd3_case(dual=(), num_layers=2)
    sd3.model.fuse_qkv_projections()
    with pytest.raises(ValueError, match="FusedJointAttnProcessor2_0"):
        use_iidkern(sd3.model)


# --------------------------------------------------------------------------- probes
def _probes(case: Case):
    """Head-mean image x text map and per-head image x text-group map, built from the site's ranges."""
    def build(site):
        t0, t1 = site.text
        groups = TokenGroups.segments([(t0, t0 + 3), (t0 + 3, t1)], site.seq_len)
        return [Probe(TokenGroups.each(*site.image), TokenGroups.each(*site.text), heads="mean"),
                Probe(TokenGroups.each(*site.image), groups, heads="keep")]
    return build


@pytest.mark.parametrize("name", PROBED)
def test_probes_equal_materialized_attention(name):
    case = CASES[name]()
    with spying(case) as spy:
        case.run()
    q, k, _, key_mask = spy.calls[case.layer]
    probs = attention_probs(q, k, with_key_mask(None, key_mask, BATCH, case.seq, case.seq))
    (i0, i1), (t0, t1) = case.image, case.text
    block = probs[:, :, i0:i1, t0:t1]  # [B, H, N_img, N_text]
    expected_mean = block.mean(1, keepdim=True)
    expected_groups = torch.stack([block[..., :3].sum(-1), block[..., 3:].sum(-1)], dim=-1)

    policy = CapturePolicy(when=lambda s: s.layer == case.layer and s.step == 11, probes=_probes(case))
    with use_iidkern(case.model, policy=policy, backend="reference") as handle:
        handle.set_step(11, 20)
        case.run()
    mean_map, group_map = policy.captured[(11, case.layer)]
    assert mean_map.shape == (BATCH, 1, i1 - i0, t1 - t0) and group_map.shape == (BATCH, HEADS, i1 - i0, 2)
    assert_close_rel(mean_map, expected_mean.float(), PROBE_TOL, f"{name}: head-mean image x text map")
    assert_close_rel(group_map, expected_groups.float(), PROBE_TOL, f"{name}: per-head image x text-group map")
    assert list(policy.captured) == [(11, case.layer)]  # asked at one block only


# --------------------------------------------------------------------------- requests change one block only
def _region_masks(num_image, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, num_image, generator=g) < 0.5


def _tags_request(case):
    regions = _region_masks(case.image[1] - case.image[0], 7)

    def make(site):  # from the site (what a policy sees)
        t0, t1 = site.text
        q_tags, k_tags = instruction_tags(site.seq_len, image=site.image, region_masks=regions,
                                          instructions=[(t0, t0 + 3), (t0 + 3, t1)])
        return AttentionRequest(tags=(q_tags[0], k_tags[0]))  # [N]: shared by the batch

    t0, t1 = case.text  # the same allow table from the known layout (what the reference uses)
    q_tags, k_tags = instruction_tags(case.seq, image=case.image, region_masks=regions,
                                      instructions=[(t0, t0 + 3), (t0 + 3, t1)])
    allowed = (q_tags[:, :, None] & k_tags[:, None, :]) != 0

    def manual(q, k, v, key_mask):
        return manual_attention(q, k, v, allowed=with_key_mask(allowed.expand(q.shape[0], -1, -1), key_mask,
                                                               q.shape[0], q.shape[1], k.shape[1]))
    return make, manual


def _head_weights_request(case):
    weights = torch.rand(HEADS, generator=torch.Generator().manual_seed(8)) + 0.5

    def manual(q, k, v, key_mask):
        return manual_attention(q, k, v, allowed=with_key_mask(None, key_mask, q.shape[0], q.shape[1], k.shape[1]),
                                head_weights=weights)
    return (lambda site: AttentionRequest(head_weights=weights)), manual


def _multiplier_request(case):
    (i0, i1), (t0, t1) = case.image, case.text
    values = torch.rand(BATCH, i1 - i0, t1 - t0, generator=torch.Generator().manual_seed(9)) * 1.5 + 0.5

    def make(site):
        return AttentionRequest(block_multiplier=BlockMultiplier(values, query_start=site.image[0],
                                                                 key_start=site.text[0]))

    def manual(q, k, v, key_mask):
        return manual_attention(q, k, v, allowed=with_key_mask(None, key_mask, q.shape[0], q.shape[1], k.shape[1]),
                                multiplier=(values, i0, t0))
    return make, manual


REQUESTS = {"tags": _tags_request, "head_weights": _head_weights_request, "multiplier": _multiplier_request}


@pytest.mark.parametrize("request_kind", list(REQUESTS))
@pytest.mark.parametrize("name", PROBED)
def test_request_changes_only_its_block(name, request_kind):
    case = CASES[name]()
    make, manual = REQUESTS[request_kind](case)
    plain = case.run()
    with spying(case) as spy:  # stock model, one call replaced by the manual computation
        spy.replace[case.layer] = manual
        expected = case.run()
    policy = AtLayer(case.layer, make)
    with use_iidkern(case.model, policy=policy, backend="reference"):
        out = case.run()
    assert len(policy.results) == 1 and policy.results[0] is not None
    assert rel_err(expected, plain) > 1e-3, "the request should change the model output"
    assert_close_rel(out, expected, 1e-4, f"{name}: {request_kind} at layer {case.layer}")


class OnlyAtLayer(AttentionPolicy):
    """Hands one layer's calls to ``inner`` (and the call's inputs, when its request keeps them)."""

    def __init__(self, layer: int, inner: AttentionPolicy):
        self.layer, self.inner, self.received = layer, inner, 0

    def request(self, site):
        return self.inner.request(site) if site.layer == self.layer else None

    def receive(self, site, result, inputs=None):
        self.received += 1
        return self.inner.receive(site, result, inputs=inputs)


@pytest.mark.parametrize("name,backend", [(name, "reference") for name in PROBED] + [("qwen-padded", "triton")])
def test_same_call_dtr_through_the_processors(name, backend):
    """HeadRouter's default paper form (the call's own map, a second small call) inside a model:
    the second call gets q, k, v and the mask as run, QwenImage's text padding included (the
    padded prompt is row 0, so row 0 is the edit row here)."""
    case = CASES[name]()
    (i0, i1), (t0, t1) = case.image, case.text

    def manual(q, k, v, key_mask):  # one pass of HeadRouter at this call, float64, written out
        probs = attention_probs(q, k, with_key_mask(None, key_mask, q.shape[0], q.shape[1], k.shape[1])).clone()
        a_zp = probs[0, :, i0:i1, t0:t1].mean(0)  # the edit row's head-mean image x text map
        probs[0, :, i0:i1, t0:t1] *= 2.0 * torch.sigmoid(5.0 * torch.softmax(a_zp, dim=0))
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v.double())
        recon, edit = (out[r].transpose(0, 1).flatten(1) for r in (1, 0))  # [H, N * D]
        cos = (recon * edit).sum(-1) / (recon.norm(dim=-1) * edit.norm(dim=-1))
        d = (cos.max() - cos) / max((cos.max() - cos.min()).item(), 1e-6)
        out[0] *= (1 + 0.2 * torch.sigmoid(d - 0.5))[None, :, None]
        return out.to(q.dtype)

    plain = case.run()
    with spying(case) as spy:
        spy.replace[case.layer] = manual
        expected = case.run()
    policy = OnlyAtLayer(case.layer, HeadRouterPolicy(HeadRouterConfig(alpha=2.0, upsilon=5.0, pairs=((1, 0),))))
    with use_iidkern(case.model, policy=policy, backend=backend):
        out = case.run()
    assert policy.received == 1
    assert rel_err(expected, plain) > 1e-3, "HeadRouter should change the model output"
    assert_close_rel(out, expected, 1e-4, f"{name}: same-call DTR and IARouter at layer {case.layer}")


# --------------------------------------------------------------------------- step and per-forward state
@pytest.mark.parametrize("name", ["flux", "sd35-qknorm-dual", "qwen-padded"])
def test_step_from_handle_and_attention_kwargs(name):
    case = CASES[name]()
    policy = RecordSites()
    with use_iidkern(case.model, policy=policy, backend="reference") as handle:
        case.run()
        assert {(s.step, s.num_steps) for s in policy.sites} == {(None, None)}
        handle.set_step(4, 10)
        policy.sites.clear()
        case.run()
        assert {(s.step, s.num_steps) for s in policy.sites} == {(4, 10)}
        policy.sites.clear()
        case.run(**{case.kwargs_name: {"iidkern_step": 7, "iidkern_num_steps": 9}})
        assert {(s.step, s.num_steps) for s in policy.sites} == {(7, 9)}
        policy.sites.clear()
        case.run(**{case.kwargs_name: {"iidkern_step": torch.tensor(8)}})  # per call, checked as set_step is
        assert {(s.step, s.num_steps) for s in policy.sites} == {(8, 10)}
        assert all(type(s.step) is int for s in policy.sites)
        with pytest.raises(TypeError, match="step must be an int >= 0 or None, got 7.5"):
            case.run(**{case.kwargs_name: {"iidkern_step": 7.5}})
        with pytest.raises(ValueError, match="step must be < num_steps, got step=12, num_steps=10"):
            case.run(**{case.kwargs_name: {"iidkern_step": 12}})
        assert handle.callback_on_step_end(SimpleNamespace(num_timesteps=10), 4, None, {}) == {}
        assert (handle.step, handle.num_steps) == (5, 10)
        handle.callback_on_step_end(SimpleNamespace(num_timesteps=10), 9, None, {})  # the last step: no step 10,
        assert (handle.step, handle.num_steps) == (0, 10)  # the next run's step 0


def test_pipeline_callback_numbers_the_steps():
    """A real FluxPipeline (precomputed prompt embeddings, latent output) with handle.callback_on_step_end."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    case = flux_case(num_double=1, num_single=1)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=case.model)
    g = torch.Generator().manual_seed(3)
    policy = RecordSites()
    with use_iidkern(pipe.transformer, policy=policy, backend="reference") as handle:
        handle.set_step(0, 3)
        for num_steps in (3, 3, 2):  # one handle, pipeline call after pipeline call: each numbered from 0
            pipe(prompt_embeds=torch.randn(1, NUM_TEXT, 24, generator=g),
                 pooled_prompt_embeds=torch.randn(1, 12, generator=g), height=48, width=80,
                 num_inference_steps=num_steps, output_type="latent", generator=g,
                 callback_on_step_end=handle.callback_on_step_end)
    # 48 x 80 pixels -> 6 x 10 latents -> 3 x 5 packed image tokens. The 2-step run learns its
    # count at its first callback: its step 0 still reads the previous run's 3.
    assert [(s.step, s.num_steps, s.layer) for s in policy.sites] == \
        [(step, 3, layer) for _ in range(2) for step in range(3) for layer in range(2)] + \
        [(0, 3, 0), (0, 3, 1), (1, 2, 0), (1, 2, 1)]
    assert {(s.text, s.image) for s in policy.sites} == {((0, NUM_TEXT), (NUM_TEXT, NUM_TEXT + 15))}


def test_single_block_learns_text_length_per_call():
    """Each single block reads its own call's text length, also when two forwards differ in text length."""
    case = flux_case(num_double=1, num_single=2)
    policy = RecordSites()
    short = dict(case.inputs, encoder_hidden_states=case.inputs["encoder_hidden_states"][:, :4],
                 txt_ids=torch.zeros(4, 3))
    with use_iidkern(case.model, policy=policy, backend="reference") as handle:
        with torch.no_grad():
            case.model(**short)
            case.run()
        single = [s for s in policy.sites if s.block_kind == "single"]
        assert [s.text for s in single] == [(0, 4), (0, 4), (0, NUM_TEXT), (0, NUM_TEXT)]
        # Outside its block the length is unknown: a clear error, or an explicit iidkern_text_tokens.
        attn = case.model.single_transformer_blocks[0].attn
        x = torch.randn(BATCH, NUM_TEXT + 15, HEADS * HEAD_DIM)
        with pytest.raises(ValueError, match="text length"):
            attn(x)
        attn(x, iidkern_text_tokens=NUM_TEXT)
        assert policy.sites[-1].text == (0, NUM_TEXT)
        assert isinstance(handle.processors["single_transformer_blocks.0.attn"], FluxIidkernProcessor)


# --------------------------------------------------------------------------- install / remove
def test_remove_restores_original_processors_and_hooks():
    case = flux_case(num_double=1, num_single=1)
    model = case.model
    before = dict(model.attn_processors)
    hooks_before = {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()}
    expected = case.run()

    handle = use_iidkern(model, backend="reference")
    assert isinstance(handle, IidkernHandle) and handle.active and handle.num_layers == 2
    assert all(type(p).__name__ == "FluxIidkernProcessor" for p in model.attn_processors.values())
    with pytest.raises(ValueError, match="already installed"):
        use_iidkern(model)
    handle.remove()
    handle.remove()  # idempotent
    assert not handle.active
    after = model.attn_processors
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    assert {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()} == \
        hooks_before
    assert torch.equal(case.run(), expected)

    sd3 = sd3_case()
    shared = dict(sd3.model.attn_processors)
    with use_iidkern(sd3.model):  # context manager; SD3 shares one stock processor between attn and attn2
        assert not any(p is shared[k] for k, p in sd3.model.attn_processors.items())
    assert all(sd3.model.attn_processors[k] is shared[k] for k in shared)


def test_bad_arguments_are_rejected():
    case = flux_case(num_double=1, num_single=1)
    with pytest.raises(ValueError, match="backend"):
        use_iidkern(case.model, backend="sdpa")
    with pytest.raises(TypeError, match="policy"):
        use_iidkern(case.model, policy=lambda site: None)
    with pytest.raises(TypeError, match="diffusers model"):
        use_iidkern(torch.nn.Linear(2, 2))
    with use_iidkern(case.model) as handle:
        for bad in ((-1, 10), (3, 0), (10, 10)):
            with pytest.raises(ValueError):
                handle.set_step(*bad)
        for bad in ((1.5, None), ("1", 4), (True, 4), (1, 4.0)):  # a wrong type is a TypeError, named
            with pytest.raises(TypeError, match="step"):
                handle.set_step(*bad)
        import numpy as np  # integers computed by numpy or torch are integers
        handle.set_step(np.int64(1), torch.tensor(4))
        assert (handle.step, handle.num_steps) == (1, 4)
        assert type(handle.step) is int and type(handle.num_steps) is int
        with pytest.raises(ValueError, match="backend"):
            handle.backend = "cuda"

    class CustomProcessor:  # behaviour iidkern cannot reproduce: refuse, name it
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            return hidden_states
    processors = dict(case.model.attn_processors)
    processors["single_transformer_blocks.0.attn.processor"] = CustomProcessor()
    case.model.set_attn_processor(processors)
    with pytest.raises(ValueError, match=r"single_transformer_blocks\.0\.attn\.processor \(CustomProcessor\)"):
        use_iidkern(case.model)
    assert type(case.model.attn_processors["transformer_blocks.0.attn.processor"]).__name__ == "FluxAttnProcessor"


# --------------------------------------------------------------------------- the Triton kernel (interpreter)
def test_triton_backend_in_interpreter():
    """One tiny Flux forward through the Triton kernels (interpreted on CPU): output and a probe."""
    case = flux_case(num_double=1, num_single=1, rows=3, cols=3)
    with spying(case) as spy:
        expected = case.run()
    q, k, _, _ = spy.calls[case.layer]
    (i0, i1), (t0, t1) = case.image, case.text
    expected_map = attention_probs(q, k)[:, :, i0:i1, t0:t1].mean(1, keepdim=True)
    policy = CapturePolicy(when=lambda s: s.layer == case.layer,
                           probes=lambda s: [Probe(TokenGroups.each(*s.image), TokenGroups.each(*s.text))])
    with use_iidkern(case.model, policy=policy, backend="triton"):
        out = case.run()
    assert_close_rel(out, expected, 1e-4, "triton backend vs stock")
    assert_close_rel(policy.captured[(None, case.layer)][0], expected_map.float(), 1e-4, "triton probe")


def test_triton_backend_tags_in_interpreter():
    """A tag mask at one single block through the Triton kernels equals the manual masked attention."""
    case = flux_case(num_double=1, num_single=1, rows=3, cols=3)
    make, manual = _tags_request(case)
    with spying(case) as spy:
        spy.replace[case.layer] = manual
        expected = case.run()
    with use_iidkern(case.model, policy=AtLayer(case.layer, make), backend="triton"):
        out = case.run()
    assert_close_rel(out, expected, 1e-4, "triton tags vs manual masked attention")


def test_compiled_model_with_iidkern_processors():
    """``torch.compile`` of a model running iidkern's processors: ``iidkern.attention`` is
    opaque to dynamo (a graph break at each call, run eagerly), so the compiled forward equals
    the stock model's, through the Triton kernels (interpreted here) and with a policy's probe."""
    case = flux_case(num_double=1, num_single=1, rows=3, cols=3)
    expected = case.run()
    policy = CapturePolicy(when=lambda s: s.layer == case.layer,
                           probes=lambda s: [Probe(TokenGroups.each(*s.image), TokenGroups.each(*s.text))])
    with use_iidkern(case.model, policy=policy, backend="triton"):
        first_map = None
        compiled = torch.compile(case.model, backend="aot_eager")
        for _ in range(2):
            policy.captured.clear()
            with torch.no_grad():
                out = compiled(**case.inputs).sample
            assert_close_rel(out, expected, 1e-4, "compiled model with iidkern processors vs stock")
            probe_map = policy.captured[(None, case.layer)][0]
            if first_map is not None:  # the second call (no recompilation) probes alike
                assert torch.equal(probe_map, first_map)
            first_map = probe_map
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["sd35-qknorm-dual", "qwen-padded"])
def test_processors_under_autocast(name):
    """Under torch.autocast a QK norm with float32 weights gives float32 q, k beside a 16-bit v;
    the stock processor's SDPA runs them in the autocast dtype, and so do iidkern's processors."""
    case = CASES[name]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = case.run()
        with use_iidkern(case.model, backend="reference"):
            out = case.run()
    assert out.dtype == expected.dtype
    assert_close_rel(out.float(), expected.float(), 2e-2, f"{name} under autocast")


def test_compiled_model_keeps_its_source_tokens():
    """use_iidkern(torch.compile(model)): the wrapper's forward takes (*args, **kwargs), so the
    hooks that read img_ids go on the model inside; Kontext's source range stays out of site.image."""
    case = CASES["flux-kontext"]()
    eager, compiled = RecordSites(), RecordSites()
    with use_iidkern(case.model, policy=eager, backend="reference"):
        case.run()
    wrapper = torch.compile(case.model, backend="eager")
    with use_iidkern(wrapper, policy=compiled, backend="reference") as handle:
        with torch.no_grad():
            wrapper(**case.inputs)
        assert handle.model is wrapper
    torch._dynamo.reset()
    assert {(s.image, s.extra) for s in compiled.sites} == {(case.image, (("source", case.source),))}
    assert [(s.image, s.extra) for s in compiled.sites] == [(s.image, s.extra) for s in eager.sites]


def test_policy_class_instead_of_instance_is_refused():
    case = CASES["flux"]()
    with pytest.raises(TypeError, match=r"instance .* got the class CapturePolicy \(call it"):
        use_iidkern(case.model, policy=CapturePolicy)


def test_a_flux_like_model_whose_single_blocks_take_no_text():
    """Chroma's blocks use the stock FluxAttnProcessor, but its single blocks get no
    encoder_hidden_states: without a policy it runs as stock; with one, its single-block
    calls say that they need iidkern_text_tokens, and run with it."""
    diffusers = pytest.importorskip("diffusers")
    chroma = getattr(diffusers, "ChromaTransformer2DModel", None)
    if chroma is None:
        pytest.skip("this diffusers has no ChromaTransformer2DModel")
    model = _randomize(chroma(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                              num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6),
                              approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1), 5)
    g = torch.Generator().manual_seed(5)
    inputs = dict(hidden_states=torch.randn(1, 6, 8, generator=g), encoder_hidden_states=torch.randn(1, 7, 24, generator=g),
                  timestep=torch.tensor([0.5]), img_ids=_flux_ids(2, 3), txt_ids=torch.zeros(7, 3), return_dict=False)
    with torch.no_grad():
        stock = model(**inputs)[0]
        with use_iidkern(model, backend="reference"):
            assert_close_rel(model(**inputs)[0], stock, 1e-5)
        policy = RecordSites()
        with use_iidkern(model, policy=policy, backend="reference"):
            with pytest.raises(ValueError, match="text length of this single-stream call is unknown.*Chroma"):
                model(**inputs)
            policy.sites.clear()
            out = model(**inputs, joint_attention_kwargs={"iidkern_text_tokens": 7})[0]
    assert_close_rel(out, stock, 1e-5)
    assert {(s.block_kind, s.text, s.image) for s in policy.sites} == {("double", (0, 7), (7, 13)),
                                                                        ("single", (0, 7), (7, 13))}


def test_deepcopy_of_an_installed_model_is_refused():
    import copy
    case = flux_case(num_double=1, num_single=1, source_rows=1, source_cols=3)
    with use_iidkern(case.model, policy=RecordSites(), backend="reference"):
        with pytest.raises(TypeError, match="cannot deepcopy a model with iidkern processors installed"):
            copy.deepcopy(case.model)
    copy.deepcopy(case.model)  # after remove(): an ordinary model again


@pytest.mark.skipif(not hasattr(ValueError(), "add_note"), reason="exception notes need Python >= 3.11")
def test_a_policy_error_names_the_site():
    """A policy that fails on one call (an SD3.5 attn2 call has no text tokens) says where."""
    case = sd3_case(dual=(0,))
    policy = CapturePolicy(when=lambda s: True, probes=lambda s: [Probe(TokenGroups.each(*s.image),
                                                                        TokenGroups.each(*s.text))])
    with use_iidkern(case.model, policy=policy, backend="reference"):
        with pytest.raises(ValueError, match="TokenGroups.each") as failure:
            case.run()
    assert any("CapturePolicy.request at AttentionSite(block=0, block_kind='image'" in note
               for note in failure.value.__notes__)
