"""Property test: iidkern's diffusers processors against stock diffusers on random tiny models.

Hypothesis draws a model family (Flux, Flux-Kontext with source tokens, SD3, SD3.5 with
dual-attention blocks and QK norms), batch, heads, head dim, block counts, text length and
image grid (edge sizes, text length 1 and a single image token, drawn often and pinned by
explicit examples), builds a tiny fp32 model with seeded random weights (``_randomize`` of
test_diffusers_backend.py), and checks that ``use_iidkern(model, backend=B)`` for B in
("reference", "triton") gives the stock model's output, with no policy and with a policy that
only records sites (whose text / image / source ranges must match the known layout). The
Triton backend runs under its interpreter on CPU; its policy-free forward runs twice (the
second replays the recorded launches, kernels/replay.py). A last forward with another text
length through the same installation checks that no per-call state goes stale.

The builders mirror ``flux_case`` / ``sd3_case`` but take every size as an argument (those
read module constants; Flux's rotary axes must sum to the head dim).
"""
from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, example, given, settings, strategies as st  # noqa: E402

pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel  # noqa: E402

from iidkern.integrations.diffusers import use_iidkern  # noqa: E402

from helpers import RecordSites, assert_close_rel, rel_err  # noqa: E402
from test_diffusers_backend import TOL, _flux_ids, _randomize  # noqa: E402

TRITON_TOL = 1e-4  # what test_diffusers_backend uses for the interpreted Triton kernels
FLUX_ROPE = {8: (2, 2, 4), 16: (4, 6, 6), 24: (8, 8, 8), 32: (8, 12, 12)}  # axes summing to the head dim
TEXT_DIM, POOLED_DIM = 24, 12


def build(cfg):
    """(model, inputs, expected site layout, expected block kinds) of one drawn configuration."""
    family, b, heads, d, num_text = cfg["family"], cfg["batch"], cfg["heads"], cfg["head_dim"], cfg["text"]
    rows, cols = cfg["grid"]
    num_image = rows * cols
    seed = cfg["seed"]
    g = torch.Generator().manual_seed(seed + 100)
    if family.startswith("flux"):
        src_rows, src_cols = cfg.get("source", (0, 0))
        num_source = src_rows * src_cols
        model = _randomize(FluxTransformer2DModel(
            patch_size=1, in_channels=8, num_layers=cfg["double"], num_single_layers=cfg["single"],
            attention_head_dim=d, num_attention_heads=heads, joint_attention_dim=TEXT_DIM,
            pooled_projection_dim=POOLED_DIM, axes_dims_rope=FLUX_ROPE[d]), seed)
        img_ids = _flux_ids(rows, cols)
        if num_source:
            img_ids = torch.cat([img_ids, _flux_ids(src_rows, src_cols, index=1)])
        inputs = dict(hidden_states=torch.randn(b, num_image + num_source, 8, generator=g),
                      encoder_hidden_states=torch.randn(b, num_text, TEXT_DIM, generator=g),
                      pooled_projections=torch.randn(b, POOLED_DIM, generator=g),
                      timestep=torch.rand(b, generator=g) * 0.9 + 0.05,
                      img_ids=img_ids, txt_ids=torch.zeros(num_text, 3))
        seq = num_text + num_image + num_source
        joint = dict(text=(0, num_text), image=(num_text, num_text + num_image),
                     extra=(("source", (num_text + num_image, seq)),) if num_source else ())
        kinds = ("double",) * cfg["double"] + ("single",) * cfg["single"]
        layout = {kind: joint for kind in kinds}
    else:
        layers, dual = cfg["double"], cfg["dual"]
        model = _randomize(SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=d,
            num_attention_heads=heads, joint_attention_dim=TEXT_DIM, caption_projection_dim=heads * d,
            pooled_projection_dim=POOLED_DIM, out_channels=4, pos_embed_max_size=40, dual_attention_layers=dual,
            qk_norm=cfg["qk_norm"]), seed)
        inputs = dict(hidden_states=torch.randn(b, 4, 2 * rows, 2 * cols, generator=g),
                      encoder_hidden_states=torch.randn(b, num_text, TEXT_DIM, generator=g),
                      pooled_projections=torch.randn(b, POOLED_DIM, generator=g),
                      timestep=torch.rand(b, generator=g) * 900 + 50)
        kinds = tuple(k for i in range(layers) for k in (("joint", "image") if i in dual else ("joint",)))
        layout = {"joint": dict(text=(num_image, num_image + num_text), image=(0, num_image), extra=()),
                  "image": dict(text=(0, 0), image=(0, num_image), extra=())}
    return model, inputs, layout, kinds


@st.composite
def configs(draw):
    family = draw(st.sampled_from(["flux", "flux-kontext", "sd3", "sd35"]))
    cfg = dict(family=family, seed=draw(st.integers(0, 2 ** 16)),
               batch=draw(st.integers(1, 3)), heads=draw(st.integers(1, 3)),
               head_dim=draw(st.sampled_from([8, 16, 24, 32])),
               text=draw(st.one_of(st.just(1), st.integers(1, 20))))  # length 1 about half the time
    rows = draw(st.one_of(st.just(1), st.integers(1, 8)))
    cols = draw(st.one_of(st.just(1), st.integers(1, 40 // rows)))  # 1..40 image tokens, one often
    cfg["grid"] = (rows, cols)
    cfg["double"] = draw(st.integers(1, 2))
    if family.startswith("flux"):
        cfg["single"] = draw(st.integers(0, 2))
        if family == "flux-kontext":
            cfg["source"] = (draw(st.integers(1, 2)), draw(st.integers(1, 3)))
    else:
        cfg["qk_norm"] = draw(st.sampled_from([None, "rms_norm", "layer_norm"])) if family == "sd35" else None
        cfg["dual"] = tuple(i for i in range(cfg["double"]) if family == "sd35" and draw(st.booleans()))
    return cfg


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def _close(out, expected, tol, what):
    assert_close_rel(out, expected, tol, what)
    for i in range(expected.shape[0]):  # every sample on its own: a small sample is not drowned out
        assert_close_rel(out[i], expected[i], tol, f"{what}, sample {i}")


def _check_sites(sites, layout, kinds, what):
    assert [s.layer for s in sites] == list(range(len(kinds))), what
    assert [s.block_kind for s in sites] == list(kinds), what
    counts = {}
    for site in sites:
        assert site.num_layers == len(kinds), f"{what}: {site}"
        block = counts["joint"] - 1 if site.block_kind == "image" else counts.get(site.block_kind, 0)
        counts[site.block_kind] = counts.get(site.block_kind, 0) + 1
        assert site.block == block, f"{what}: {site}"
        want = layout[site.block_kind]
        assert (site.text, site.image, site.extra) == (want["text"], want["image"], want["extra"]), \
            f"{what}: {site} != {want}"


EDGES = [  # text length 1 and one image token, in every family
    dict(family="flux", seed=0, batch=2, heads=2, head_dim=16, text=1, grid=(1, 1), double=1, single=1),
    dict(family="flux", seed=1, batch=1, heads=1, head_dim=8, text=1, grid=(1, 1), double=1, single=0),
    dict(family="flux-kontext", seed=2, batch=3, heads=3, head_dim=24, text=1, grid=(1, 1), double=1, single=2,
         source=(1, 1)),
    dict(family="sd3", seed=3, batch=2, heads=2, head_dim=32, text=1, grid=(1, 1), double=2, qk_norm=None, dual=()),
    dict(family="sd35", seed=4, batch=1, heads=3, head_dim=8, text=1, grid=(1, 1), double=2, qk_norm="rms_norm",
         dual=(0, 1)),
    dict(family="sd35", seed=5, batch=3, heads=1, head_dim=16, text=20, grid=(1, 40), double=1,
         qk_norm="layer_norm", dual=(0,)),
]


def _with_examples(fn):
    for cfg in reversed(EDGES):
        fn = example(cfg)(fn)
    return fn


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@_with_examples
@given(configs())
def test_iidkern_backend_matches_stock_diffusers(cfg):
    event(f"family={cfg['family']}")
    event(f"text length 1: {cfg['text'] == 1}")
    event(f"one image token: {cfg['grid'] == (1, 1)}")
    model, inputs, layout, kinds = build(cfg)
    expected = _run(model, inputs)
    assert torch.isfinite(expected).all()
    for backend, tol in (("reference", TOL), ("triton", TRITON_TOL)):
        what = f"{backend} {cfg}"
        with use_iidkern(model, backend=backend) as handle:
            assert [info.block_kind for info in handle.layers] == list(kinds), what
            for attempt in range(2 if backend == "triton" else 1):  # triton: record, then replay
                _close(_run(model, inputs), expected, tol, f"{what}, no policy, call {attempt}")
            policy = RecordSites()
            handle.policy = policy
            _close(_run(model, inputs), expected, tol, f"{what}, RecordSites")
        _check_sites(policy.sites, layout, kinds, what)
        assert torch.equal(_run(model, inputs), expected), f"{what}: remove() did not restore the stock model"
    # a stale-state check: a second, differently sized forward through the same installation
    # (text one token shorter or longer, same image) still matches
    other = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"][:, :max(1, cfg["text"] - 1)])
    if cfg["text"] == 1:
        other["encoder_hidden_states"] = torch.cat([inputs["encoder_hidden_states"]] * 2, 1)
    if "txt_ids" in other:
        other["txt_ids"] = torch.zeros(other["encoder_hidden_states"].shape[1], 3)
    expected_other = _run(model, other)
    policy = RecordSites()
    with use_iidkern(model, policy=policy, backend="triton"):
        _run(model, inputs)
        policy.sites.clear()
        assert rel_err(_run(model, other), expected_other) < TRITON_TOL, f"second text length {cfg}"
    _, _, other_layout, _ = build(dict(cfg, text=other["encoder_hidden_states"].shape[1]))
    _check_sites(policy.sites, other_layout, kinds, f"second text length {cfg}")
