"""The from-scratch runner equals diffusers' SD3 / Flux transformers on the same safetensors weights.

Tiny diffusers models with seeded random weights are saved with safetensors, loaded into
the runner with the strict loader, and both run on the same fresh random inputs (fp32,
iidkern's reference backend vs diffusers' SDPA).
"""
import pytest
import torch
from safetensors.torch import save_file

from iidkern.mmdit import (FluxConfig, FluxTransformer, SD3Config, SD3Transformer, image_ids, load_flux, load_sd3,
                           load_weights, text_ids)
from iidkern.mmdit.testing import diffusers_flux, diffusers_sd3, flux_inputs, sd3_inputs

from helpers import assert_close_rel

TOL = 1e-5  # fp32 relative-norm tolerance of the whole forward pass


def _save(model, tmp_path, name="weights.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


SD3_CASES = {
    "sd3-2layers": (SD3Config.tiny(), (6, 10)),
    "sd3-qknorm-3layers": (SD3Config.tiny(num_layers=3, qk_norm="rms_norm"), (7, 5)),
    "sd35m-dual-attention": (SD3Config.tiny(num_layers=3, qk_norm="rms_norm", dual_attention_layers=(0, 1)), (6, 10)),
    "sd3-single-block": (SD3Config.tiny(num_layers=1, num_attention_heads=3), (4, 4)),
}


@pytest.mark.parametrize("name", list(SD3_CASES))
def test_sd3_matches_diffusers(name, tmp_path):
    config, (rows, cols) = SD3_CASES[name]
    reference = diffusers_sd3(config, seed=3)
    runner = load_weights(SD3Transformer(config), _save(reference, tmp_path))
    latents, text, pooled, t = sd3_inputs(config, rows=rows, cols=cols, seed=5)
    with torch.no_grad():
        expected = reference(latents, text, pooled, t * 1000).sample
        got = runner(latents, text, pooled, t, backend="reference")
    assert_close_rel(got, expected, TOL, f"{name} velocity")


def test_sd3_positional_table_equals_diffusers():
    # Not loaded from a file here: the runner computes the sin-cos table itself for random models.
    config = SD3Config.tiny(sample_size=12, pos_embed_max_size=20, num_attention_heads=3)
    reference = diffusers_sd3(config)
    ours = SD3Transformer(config).pos_embed.pos_embed
    assert_close_rel(ours, reference.pos_embed.pos_embed, 1e-6, "pos_embed")


FLUX_CASES = {
    "flux-dev-1+1": (FluxConfig.tiny(), (6, 10)),
    "flux-schnell-2+2": (FluxConfig.tiny(num_layers=2, num_single_layers=2, guidance_embeds=False), (5, 7)),
    "flux-double-only": (FluxConfig.tiny(num_layers=2, num_single_layers=0, num_attention_heads=3), (4, 4)),
    "flux-channel-concat": (FluxConfig.tiny(in_channels=32, out_channels=16), (6, 10)),
}


@pytest.mark.parametrize("name", list(FLUX_CASES))
def test_flux_matches_diffusers(name, tmp_path):
    config, (rows, cols) = FLUX_CASES[name]
    reference = diffusers_flux(config, seed=4)
    runner = load_weights(FluxTransformer(config), _save(reference, tmp_path))
    x, text, pooled, t, guidance = flux_inputs(config, rows=rows, cols=cols, seed=6)
    guidance = guidance if config.guidance_embeds else None
    ids, tids = image_ids(rows, cols), text_ids(text.shape[1])
    with torch.no_grad():
        expected = reference(x, text, pooled, t, img_ids=ids, txt_ids=tids, guidance=guidance).sample
        got = runner(x, text, pooled, t, img_ids=ids, guidance=guidance, backend="reference")
    assert got.shape == (x.shape[0], rows * cols, config.out_channels)
    assert_close_rel(got, expected, TOL, f"{name} velocity")


def test_flux_kontext_layout_matches_diffusers(tmp_path):
    """Source tokens appended with index-1 ids: diffusers runs the concatenated sequence, we slice nothing out."""
    config = FluxConfig.tiny(num_layers=2)
    reference = diffusers_flux(config, seed=7)
    runner = load_weights(FluxTransformer(config), _save(reference, tmp_path))
    rows, cols, src_rows, src_cols = 6, 10, 4, 6
    x, text, pooled, t, guidance, source = flux_inputs(config, rows=rows, cols=cols, num_source=src_rows * src_cols)
    ids, src_ids = image_ids(rows, cols), image_ids(src_rows, src_cols, index=1)
    with torch.no_grad():
        expected = reference(torch.cat([x, source], 1), text, pooled, t, img_ids=torch.cat([ids, src_ids]),
                             txt_ids=text_ids(text.shape[1]), guidance=guidance).sample[:, :rows * cols]
        got = runner(x, text, pooled, t, img_ids=ids, guidance=guidance, source=source, source_ids=src_ids,
                     backend="reference")
    assert_close_rel(got, expected, TOL, "Kontext velocity")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_zero_text_tokens_match_diffusers(backend, tmp_path):
    """An empty prompt sequence (``[B, 0, D]`` text) runs, as in diffusers: the joint sequence is the
    image alone (heads were split with an inferred ``-1`` dim, which 0 tokens cannot give)."""
    flux_config = FluxConfig.tiny(num_layers=2, num_single_layers=2)
    reference = diffusers_flux(flux_config, seed=8)
    runner = load_weights(FluxTransformer(flux_config), _save(reference, tmp_path, "flux.safetensors"))
    x, text, pooled, t, guidance = flux_inputs(flux_config, rows=2, cols=3, num_text=0, seed=9)
    with torch.no_grad():
        expected = reference(x, text, pooled, t, img_ids=image_ids(2, 3), txt_ids=text_ids(0), guidance=guidance).sample
        got = runner(x, text, pooled, t, img_ids=image_ids(2, 3), guidance=guidance, backend=backend)
    assert_close_rel(got, expected, TOL, "Flux velocity without text tokens")

    sd3_config = SD3Config.tiny(num_layers=2, qk_norm="rms_norm", dual_attention_layers=(0,))
    reference = diffusers_sd3(sd3_config, seed=10)
    runner = load_weights(SD3Transformer(sd3_config), _save(reference, tmp_path, "sd3.safetensors"))
    latents, text, pooled, t = sd3_inputs(sd3_config, rows=2, cols=3, num_text=0, seed=11)
    with torch.no_grad():
        expected = reference(latents, text, pooled, t * 1000).sample
        got = runner(latents, text, pooled, t, backend=backend)
    assert_close_rel(got, expected, TOL, "SD3 velocity without text tokens")


def test_load_from_diffusers_folders(tmp_path):
    """``load_sd3`` / ``load_flux`` read diffusers' save_pretrained folders (config.json + safetensors)."""
    sd3_config, flux_config = SD3Config.tiny(qk_norm="rms_norm"), FluxConfig.tiny()
    sd3_ref, flux_ref = diffusers_sd3(sd3_config, seed=8), diffusers_flux(flux_config, seed=9)
    sd3_ref.save_pretrained(tmp_path / "sd3" / "transformer", safe_serialization=True)
    flux_ref.save_pretrained(tmp_path / "flux", safe_serialization=True, max_shard_size="100KB")  # sharded
    assert len(list((tmp_path / "flux").glob("*.safetensors"))) > 1
    sd3 = load_sd3(tmp_path / "sd3", dtype=torch.float32)  # a pipeline root: finds transformer/
    flux = load_flux(tmp_path / "flux", dtype=torch.float32)
    assert sd3.config == sd3_config and flux.config == flux_config

    latents, text, pooled, t = sd3_inputs(sd3_config, seed=1)
    x, ftext, fpooled, ft, guidance = flux_inputs(flux_config, seed=2)
    ids = image_ids(6, 10)
    with torch.no_grad():
        assert_close_rel(sd3(latents, text, pooled, t, backend="reference"),
                         sd3_ref(latents, text, pooled, t * 1000).sample, TOL, "SD3 from folder")
        assert_close_rel(flux(x, ftext, fpooled, ft, img_ids=ids, guidance=guidance, backend="reference"),
                         flux_ref(x, ftext, fpooled, ft, img_ids=ids, txt_ids=text_ids(7), guidance=guidance).sample,
                         TOL, "Flux from folder")


def to_bfl_layout(state, inner_dim):
    """diffusers -> BFL key layout (the inverse of diffusers' single-file converter), written for the test."""
    out, state = {}, dict(state)
    pairs = {"time_text_embed.timestep_embedder": "time_in", "time_text_embed.text_embedder": "vector_in",
             "time_text_embed.guidance_embedder": "guidance_in"}
    for src, dst in pairs.items():
        for p in ("weight", "bias"):
            out[f"{dst}.in_layer.{p}"] = state.pop(f"{src}.linear_1.{p}")
            out[f"{dst}.out_layer.{p}"] = state.pop(f"{src}.linear_2.{p}")
    for p in ("weight", "bias"):
        out[f"txt_in.{p}"] = state.pop(f"context_embedder.{p}")
        out[f"img_in.{p}"] = state.pop(f"x_embedder.{p}")
        out[f"final_layer.linear.{p}"] = state.pop(f"proj_out.{p}")
        scale, shift = state.pop(f"norm_out.linear.{p}").chunk(2)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")}
    for i in blocks:
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for p in ("weight", "bias"):
            out[b + f"img_attn.qkv.{p}"] = torch.cat([state.pop(d + f"attn.to_{c}.{p}") for c in "qkv"])
            out[b + f"txt_attn.qkv.{p}"] = torch.cat([state.pop(d + f"attn.add_{c}_proj.{p}") for c in "qkv"])
            for src, dst in (("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
                             ("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                             ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                             ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")):
                out[b + f"{dst}.{p}"] = state.pop(d + f"{src}.{p}")
        for src, dst in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                         ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            out[b + f"{dst}.scale"] = state.pop(d + f"attn.{src}.weight")
    singles = {int(k.split(".")[1]) for k in state if k.startswith("single_transformer_blocks.")}
    for i in singles:
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for p in ("weight", "bias"):
            out[b + f"linear1.{p}"] = torch.cat([state.pop(d + f"attn.to_{c}.{p}") for c in "qkv"] +
                                                [state.pop(d + f"proj_mlp.{p}")])
            out[b + f"linear2.{p}"] = state.pop(d + f"proj_out.{p}")
            out[b + f"modulation.lin.{p}"] = state.pop(d + f"norm.linear.{p}")
        out[b + "norm.query_norm.scale"] = state.pop(d + "attn.norm_q.weight")
        out[b + "norm.key_norm.scale"] = state.pop(d + "attn.norm_k.weight")
    assert not state, f"test converter left keys: {sorted(state)}"
    return {"model.diffusion_model." + k: v.contiguous() for k, v in out.items()}


def test_flux_loads_original_bfl_layout(tmp_path):
    config = FluxConfig.tiny(num_layers=2, num_single_layers=2)
    reference = diffusers_flux(config, seed=11)
    path = tmp_path / "flux1-tiny.safetensors"
    save_file(to_bfl_layout(reference.state_dict(), config.inner_dim), str(path))
    runner = load_flux(path, config=config, dtype=torch.float32)  # layout detected from the keys
    x, text, pooled, t, guidance = flux_inputs(config, seed=12)
    ids = image_ids(6, 10)
    with torch.no_grad():
        expected = reference(x, text, pooled, t, img_ids=ids, txt_ids=text_ids(7), guidance=guidance).sample
        got = runner(x, text, pooled, t, img_ids=ids, guidance=guidance, backend="reference")
    assert_close_rel(got, expected, TOL, "Flux from BFL layout")
