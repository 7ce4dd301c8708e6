"""Property test: the from-scratch runner (iidkern.mmdit) equals diffusers on random tiny models.

test_mmdit_parity.py checks a handful of fixed configurations; here hypothesis draws them.

* Flux: double / single block counts (0-2 each; diffusers runs a model with no block at
  all, so 0 + 0 is drawn too), heads, head dim with a random even split into the three
  rotary axes (zeros included), text / pooled / input / output widths, guidance embedding
  on or off, batch, latent grid (1x1 and odd sizes), text length (0, 1, odd), non-zero
  text ids and image-id offsets, and Kontext source tokens (``source=``, ids at index 1).
* SD3 / SD3.5: layer count (0-3), heads, head dim, QK norm None / "rms_norm", dual-attention
  blocks (any subset, the last, text-reading-only block included), patch size 1-3,
  sample size and pos_embed_max_size, channel / text / pooled widths, batch, token grids of
  any shape up to pos_embed_max_size (not only the sample size), text length.

Each example builds diffusers' model with fresh seeded random weights (``diffusers_flux`` /
``diffusers_sd3``, optionally with sharpened q/k projections so that attention is far from
uniform), saves it (safetensors) and loads it into the runner through a drawn strict loader
path: ``load_weights`` on a built model, ``load_flux`` / ``load_sd3`` on the file with
``config=`` (meta-built: every tensor must come from the file), ``save_pretrained`` folders
read with their config.json, or (Flux) the original BFL key layout. Both run the same random
inputs in fp32; the runner runs on every iidkern backend that works on CPU ("reference", and
"triton" under Triton's interpreter), and each sample of the batch must match on its own.

Configurations diffusers itself refuses are out of scope and never drawn (by construction):
Flux rotary axes that are odd or do not sum to the head dim, Flux patch_size != 1 (the
runner packs outside the model), ``guidance=`` on a model without guidance embedding;
SD3 inner dims not divisible by 4 (diffusers' 2-D sin-cos table raises), sample sizes below
the patch size (ZeroDivisionError in diffusers' PatchEmbed), grids larger than
pos_embed_max_size, caption_projection_dim != heads * head_dim (diffusers fails in its
first block). Left out because the runner refuses them by design (named ValueErrors, not
parity bugs): qk_norm other than None / "rms_norm" (diffusers also has "layer_norm", ...),
dual_attention_layers indices outside ``range(num_layers)`` (diffusers ignores them),
latent sizes that are not multiples of the patch size (diffusers drops the remainder),
pos_embed_max_size None / 0 (diffusers then keeps no table in the checkpoint).

A deeper run: IIDKERN_FUZZ_EXAMPLES=500 pytest tests/test_mmdit_fuzz.py
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, example, given, settings, strategies as st  # noqa: E402

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")
from safetensors.torch import save_file  # noqa: E402

from iidkern.mmdit import (FluxConfig, FluxTransformer, SD3Config, SD3Transformer, image_ids, load_flux,  # noqa: E402
                           load_sd3, load_weights)
from iidkern.mmdit.testing import diffusers_flux, diffusers_sd3, flux_inputs, sd3_inputs  # noqa: E402

from helpers import assert_close_rel  # noqa: E402
from test_mmdit_parity import to_bfl_layout  # noqa: E402

TOL = 1e-5  # fp32 relative-norm tolerance of a whole forward pass, as test_mmdit_parity.py
TABLE_TOL = 1e-6  # the runner's own SD3 sin-cos table (float64) vs diffusers' (float32 coordinates)
# A deeper run: IIDKERN_FUZZ_EXAMPLES=500 pytest tests/test_mmdit_fuzz.py
EXAMPLES = int(os.environ.get("IIDKERN_FUZZ_EXAMPLES", "0"))
BACKENDS = ("reference", "triton")  # the iidkern backends that run on CPU (triton: interpreted)
FUZZ = settings(deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------- helpers
@torch.no_grad()
def _sharpen(model: torch.nn.Module, factor: float) -> None:
    """Multiply every q / k projection and QK-norm weight by sqrt(factor): the attention logits grow
    by ``factor`` (a QK norm undoes the projections' scale; its weights then carry it), so that
    attention is far from uniform and a mix-up of tokens or positions shows."""
    if factor == 1:
        return
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 2)[-2:]
        if leaf[0] in ("to_q", "to_k", "add_q_proj", "add_k_proj") or \
                leaf[0] in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            p.mul_(factor ** 0.5)


def _close(got, expected, what):
    assert_close_rel(got, expected, TOL, what)
    for i in range(expected.shape[0]):  # every sample on its own: a small sample is not drowned out
        assert_close_rel(got[i], expected[i], TOL, f"{what}, sample {i}")


def _load(kind, reference, config, folder: Path):
    """The runner with ``reference``'s weights, through the drawn strict loader path."""
    flux = isinstance(config, FluxConfig)
    model_cls, loader = (FluxTransformer, load_flux) if flux else (SD3Transformer, load_sd3)
    if kind == "folder":  # diffusers' save_pretrained folder: config.json + safetensors
        reference.save_pretrained(folder / "transformer", safe_serialization=True)
        runner = loader(folder, dtype=torch.float32)  # a pipeline root: finds transformer/
        assert runner.config == config, f"config.json read back as {runner.config}, drawn {config}"
        return runner
    path = folder / "weights.safetensors"
    if kind == "bfl":  # the original Flux checkpoint layout, detected from the keys
        state = dict(reference.state_dict())
        if not config.guidance_embeds:  # the parity test's converter needs guidance_in: give it one, drop it
            for key in ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"):
                state["time_text_embed.guidance_embedder." + key] = torch.zeros(1)
        state = to_bfl_layout(state, config.inner_dim)
        if not config.guidance_embeds:
            state = {k: v for k, v in state.items() if ".guidance_in." not in k}
        save_file(state, str(path))
        return load_flux(path, config=config, dtype=torch.float32)  # layout="auto" recognises it
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    if kind == "file":  # meta-built: every parameter and buffer must come from the file
        return loader(path, config=config, dtype=torch.float32)
    # load_weights on a model built with other random weights: the load must overwrite all
    return load_weights(model_cls.random(config, seed=12345), path)


SCALAR_FORMS = ["[B]", "float", "0-d", "[1]"]


def _scalar_or_vector(value: torch.Tensor, form: str):
    """``(runner's, diffusers')`` time / guidance: the runner also takes a batch-wide Python number,
    0-d or ``[1]`` tensor (see layers.as_batch_vector); diffusers gets the same values as ``[B]``."""
    if form == "[B]":
        return value, value
    ours = {"float": float(value[0]), "0-d": value[0].clone(), "[1]": value[:1].clone()}[form]
    return ours, value[:1].expand(value.shape[0]).clone()


def _check_loaded(runner, reference, loader):
    """Every tensor the runner holds is diffusers' tensor of that name, bit for bit."""
    ours, theirs = runner.state_dict(), reference.state_dict()
    assert sorted(ours) == sorted(theirs), f"{loader}: key sets differ: {sorted(set(ours) ^ set(theirs))}"
    for key, value in theirs.items():
        assert ours[key].dtype == torch.float32 and torch.equal(ours[key], value), f"{loader}: {key} differs"


# --------------------------------------------------------------------------- Flux
BLOCKS = st.sampled_from([1, 2, 0, 1, 2])  # st.integers(0, 2) (and a leading 0) draw 0 too often
OFFSETS = st.one_of(st.just((0, 0)), st.tuples(st.integers(0, 40), st.integers(0, 40)))


def _even_split(draw, total):
    """Three even non-negative ints summing to ``total`` (even)."""
    a = 2 * draw(st.integers(0, total // 2))
    b = 2 * draw(st.integers(0, (total - a) // 2))
    return (a, b, total - a - b)


@st.composite
def flux_cases(draw):
    head_dim = draw(st.sampled_from([2, 4, 6, 8, 12, 16]))
    in_channels = draw(st.integers(1, 12))
    rows = draw(st.one_of(st.just(1), st.integers(1, 5)))
    cols = draw(st.one_of(st.just(1), st.integers(1, 5)))
    return dict(
        config=dict(num_layers=draw(BLOCKS), num_single_layers=draw(BLOCKS),
                    num_attention_heads=draw(st.integers(1, 3)), attention_head_dim=head_dim,
                    axes_dims_rope=_even_split(draw, head_dim),
                    joint_attention_dim=draw(st.integers(1, 24)), pooled_projection_dim=draw(st.integers(1, 24)),
                    in_channels=in_channels,
                    out_channels=draw(st.one_of(st.none(), st.integers(1, 12))),
                    guidance_embeds=draw(st.booleans())),
        seed=draw(st.integers(0, 2 ** 16)), batch=draw(st.integers(1, 2)), grid=(rows, cols),
        text=draw(st.sampled_from([0, 1, 2, 3, 5, 7, 9])),
        source=draw(st.one_of(st.none(), st.tuples(st.integers(0, 3), st.integers(1, 3)))),  # (0, n): no token
        offset=draw(OFFSETS), source_offset=draw(OFFSETS),
        random_ids=draw(st.booleans()),  # image / source ids: random reals instead of a grid
        text_ids=draw(st.booleans()),  # random integer text ids instead of zeros (txt_ids=)
        sharpen=draw(st.sampled_from([1.0, 1.0, 16.0])),
        scalars=draw(st.sampled_from(SCALAR_FORMS)),  # how t (and guidance) reach the runner
        loader=draw(st.sampled_from(["load_weights", "file", "folder", "bfl"])))


def check_flux(case):
    config = FluxConfig.tiny(**case["config"])
    rows, cols = case["grid"]
    num_text, seed = case["text"], case["seed"]
    reference = diffusers_flux(config, seed=seed)
    _sharpen(reference, case["sharpen"])
    with tempfile.TemporaryDirectory() as folder:
        runner = _load(case["loader"], reference, config, Path(folder))
    _check_loaded(runner, reference, case["loader"])

    num_source = None if case["source"] is None else case["source"][0] * case["source"][1]
    x, text, pooled, t, guidance, *source = flux_inputs(config, batch=case["batch"], rows=rows, cols=cols,
                                                        num_text=num_text, seed=seed + 1, num_source=num_source)
    t_ours, t_theirs = _scalar_or_vector(t, case["scalars"])
    g_ours, g_theirs = _scalar_or_vector(guidance, case["scalars"])
    if not config.guidance_embeds:
        g_ours = g_theirs = None
    g = torch.Generator().manual_seed(seed + 2)
    ids = image_ids(rows, cols, offset=case["offset"])
    if case["random_ids"]:
        ids = torch.rand(rows * cols, 3, generator=g) * 64
    tids = torch.zeros(num_text, 3)
    if case["text_ids"]:
        tids = torch.randint(0, 8, (num_text, 3), generator=g).float()
    kontext = {}
    all_ids, all_x = ids, x
    if num_source is not None:
        src_ids = image_ids(*case["source"], index=1, offset=case["source_offset"])
        if case["random_ids"]:
            src_ids = torch.rand(num_source, 3, generator=g) * 64
        kontext = dict(source=source[0], source_ids=src_ids)
        all_ids, all_x = torch.cat([ids, src_ids]), torch.cat([x, source[0]], 1)
    with torch.no_grad():
        expected = reference(all_x, text, pooled, t_theirs, img_ids=all_ids, txt_ids=tids,
                             guidance=g_theirs).sample[:, :rows * cols]
        assert torch.isfinite(expected).all()
        for backend in BACKENDS:
            got = runner(x, text, pooled, t_ours, img_ids=ids, txt_ids=tids if case["text_ids"] else None,
                         guidance=g_ours, backend=backend, **kontext)
            assert got.shape == (case["batch"], rows * cols, config.out_channels)
            _close(got, expected, f"Flux {backend} {case}")


FLUX_EDGES = [  # pinned: no blocks at all, one token and no text, Kontext with one source token
    dict(config=dict(num_layers=0, num_single_layers=0, num_attention_heads=1, attention_head_dim=2,
                     axes_dims_rope=(0, 2, 0), joint_attention_dim=1, pooled_projection_dim=1, in_channels=1,
                     out_channels=None, guidance_embeds=False),
         seed=0, batch=1, grid=(1, 1), text=0, source=None, offset=(0, 0), source_offset=(0, 0),
         random_ids=False, text_ids=False, sharpen=1.0, scalars="float", loader="file"),
    dict(config=dict(num_layers=2, num_single_layers=2, num_attention_heads=3, attention_head_dim=6,
                     axes_dims_rope=(2, 2, 2), joint_attention_dim=5, pooled_projection_dim=3, in_channels=7,
                     out_channels=3, guidance_embeds=True),
         seed=1, batch=2, grid=(1, 1), text=1, source=(1, 1), offset=(3, 0), source_offset=(0, 2),
         random_ids=False, text_ids=True, sharpen=16.0, scalars="[B]", loader="bfl"),
    dict(config=dict(num_layers=1, num_single_layers=0, num_attention_heads=2, attention_head_dim=16,
                     axes_dims_rope=(16, 0, 0), joint_attention_dim=24, pooled_projection_dim=20, in_channels=12,
                     out_channels=None, guidance_embeds=True),
         seed=2, batch=2, grid=(5, 3), text=0, source=(3, 2), offset=(0, 0), source_offset=(0, 0),
         random_ids=True, text_ids=False, sharpen=1.0, scalars="0-d", loader="folder"),
    dict(config=dict(num_layers=0, num_single_layers=2, num_attention_heads=1, attention_head_dim=8,
                     axes_dims_rope=(2, 2, 4), joint_attention_dim=3, pooled_projection_dim=2, in_channels=2,
                     out_channels=9, guidance_embeds=False),
         seed=3, batch=1, grid=(1, 5), text=9, source=None, offset=(40, 40), source_offset=(0, 0),
         random_ids=False, text_ids=True, sharpen=16.0, scalars="[1]", loader="load_weights"),
]


def _with_examples(edges):
    def wrap(fn):
        for case in reversed(edges):
            fn = example(case)(fn)
        return fn
    return wrap


@settings(FUZZ, max_examples=EXAMPLES or 25)
@_with_examples(FLUX_EDGES)
@given(flux_cases())
def test_flux_runner_matches_diffusers(case):
    cfg = case["config"]
    event(f"loader={case['loader']}")
    event(f"blocks={cfg['num_layers']}+{cfg['num_single_layers']}")
    event(f"kontext source tokens={case['source'] and case['source'][0] * case['source'][1]}")
    event(f"text tokens={case['text']}")
    event(f"one image token={case['grid'] == (1, 1)}")
    check_flux(case)


# --------------------------------------------------------------------------- SD3 / SD3.5
@st.composite
def sd3_cases(draw):
    heads = draw(st.integers(1, 3))
    # diffusers' 2-D sin-cos table needs heads * head_dim divisible by 4 (it raises otherwise): built so
    head_dim = draw(st.sampled_from([d for d in (2, 4, 6, 8, 12, 16) if heads * d % 4 == 0]))
    layers = draw(st.sampled_from([2, 3, 1, 2, 3, 0]))
    patch = draw(st.integers(1, 3))
    max_size = draw(st.integers(1, 6))
    rows = draw(st.one_of(st.just(1), st.just(max_size), st.integers(1, max_size)))
    cols = draw(st.one_of(st.just(1), st.integers(1, max_size)))
    return dict(
        config=dict(num_layers=layers, num_attention_heads=heads, attention_head_dim=head_dim,
                    qk_norm=draw(st.sampled_from([None, "rms_norm"])),
                    dual_attention_layers=tuple(i for i in range(layers) if draw(st.booleans())),
                    patch_size=patch,
                    # diffusers divides by sample_size // patch_size: at least one patch
                    sample_size=patch * draw(st.integers(1, 8)) + draw(st.integers(0, patch - 1)),
                    pos_embed_max_size=max_size,
                    in_channels=draw(st.integers(1, 5)), out_channels=draw(st.integers(1, 5)),
                    joint_attention_dim=draw(st.integers(1, 24)), pooled_projection_dim=draw(st.integers(1, 24))),
        seed=draw(st.integers(0, 2 ** 16)), batch=draw(st.integers(1, 2)), grid=(rows, cols),
        text=draw(st.sampled_from([0, 1, 2, 3, 5, 7, 9])),
        sharpen=draw(st.sampled_from([1.0, 1.0, 16.0])),
        scalars=draw(st.sampled_from(SCALAR_FORMS)),
        loader=draw(st.sampled_from(["load_weights", "file", "folder"])))


def check_sd3(case):
    config = SD3Config.tiny(**case["config"])  # caption_projection_dim = heads * head_dim
    rows, cols = case["grid"]
    seed = case["seed"]
    reference = diffusers_sd3(config, seed=seed)
    # The runner computes the persistent sin-cos table itself for a model built without a file.
    assert_close_rel(SD3Transformer(config).pos_embed.pos_embed, reference.pos_embed.pos_embed, TABLE_TOL,
                     f"pos_embed table {config}")
    _sharpen(reference, case["sharpen"])
    with tempfile.TemporaryDirectory() as folder:
        runner = _load(case["loader"], reference, config, Path(folder))
    _check_loaded(runner, reference, case["loader"])

    latents, text, pooled, t = sd3_inputs(config, batch=case["batch"], rows=rows, cols=cols, num_text=case["text"],
                                          seed=seed + 1)
    t_ours, t_theirs = _scalar_or_vector(t, case["scalars"])
    with torch.no_grad():
        expected = reference(latents, text, pooled, t_theirs * 1000).sample
        assert torch.isfinite(expected).all()
        for backend in BACKENDS:
            got = runner(latents, text, pooled, t_ours, backend=backend)
            assert got.shape == (case["batch"], config.out_channels, rows * config.patch_size,
                                 cols * config.patch_size)
            _close(got, expected, f"SD3 {backend} {case}")


SD3_EDGES = [  # pinned: no layer, one layer with dual attention (text read only), 1x1 grids, no text
    dict(config=dict(num_layers=0, num_attention_heads=1, attention_head_dim=4, qk_norm=None,
                     dual_attention_layers=(), patch_size=1, sample_size=1, pos_embed_max_size=1, in_channels=1,
                     out_channels=1, joint_attention_dim=1, pooled_projection_dim=1),
         seed=0, batch=1, grid=(1, 1), text=0, sharpen=1.0, scalars="float", loader="file"),
    dict(config=dict(num_layers=1, num_attention_heads=3, attention_head_dim=4, qk_norm="rms_norm",
                     dual_attention_layers=(0,), patch_size=3, sample_size=11, pos_embed_max_size=5, in_channels=2,
                     out_channels=5, joint_attention_dim=7, pooled_projection_dim=3),
         seed=1, batch=2, grid=(5, 1), text=1, sharpen=16.0, scalars="[B]", loader="folder"),
    dict(config=dict(num_layers=3, num_attention_heads=2, attention_head_dim=6 * 2, qk_norm=None,
                     dual_attention_layers=(0, 2), patch_size=2, sample_size=16, pos_embed_max_size=6, in_channels=4,
                     out_channels=4, joint_attention_dim=24, pooled_projection_dim=20),
         seed=2, batch=2, grid=(3, 6), text=9, sharpen=16.0, scalars="0-d", loader="load_weights"),
]


@settings(FUZZ, max_examples=EXAMPLES or 25)
@_with_examples(SD3_EDGES)
@given(sd3_cases())
def test_sd3_runner_matches_diffusers(case):
    cfg = case["config"]
    event(f"loader={case['loader']}")
    event(f"layers={cfg['num_layers']} dual={len(cfg['dual_attention_layers'])} qk_norm={cfg['qk_norm']}")
    event(f"patch={cfg['patch_size']}")
    event(f"grid is the sample size={case['grid'] == (cfg['sample_size'] // cfg['patch_size'],) * 2}")
    event(f"text tokens={case['text']}")
    check_sd3(case)


# --------------------------------------------------------------------------- library bugs found
def test_bfl_layout_detected_without_double_blocks(tmp_path):
    """Found by the fuzz above: a BFL file with the 'model.diffusion_model.' prefix and no double
    blocks was recognised only by 'double_blocks.' keys, so it was read as diffusers' layout."""
    config = FluxConfig.tiny(num_layers=0, num_single_layers=1)
    reference = diffusers_flux(config, seed=0)
    path = tmp_path / "flux1-no-double.safetensors"
    save_file(to_bfl_layout(reference.state_dict(), config.inner_dim), str(path))
    runner = load_flux(path, config=config, dtype=torch.float32)  # layout="auto"
    _check_loaded(runner, reference, "load_flux(auto)")
