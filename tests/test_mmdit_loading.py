"""The strict loader: every missing, unexpected, mis-shaped or wrong-dtype key is named, nothing is half-loaded."""
import pytest
import torch
from safetensors.torch import save_file

from iidkern.mmdit import (FluxConfig, FluxTransformer, SD3Config, SD3Transformer, WeightLoadError, load_flux,
                           load_sd3, load_weights, save_weights)


@pytest.fixture
def flux_state():
    model = FluxTransformer.random(FluxConfig.tiny(), seed=1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _write(tmp_path, state, name="w.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _fresh():
    return FluxTransformer.random(FluxConfig.tiny(), seed=2)


def _load_error(model, path, **kw) -> WeightLoadError:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightLoadError) as info:
        load_weights(model, path, **kw)
    # Strict means all-or-nothing: a failed load leaves the model untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return info.value


def test_round_trip_loads_every_tensor(flux_state, tmp_path):
    model = load_weights(_fresh(), _write(tmp_path, flux_state))
    assert all(torch.equal(flux_state[k], v) for k, v in model.state_dict().items())


def test_missing_key_is_named(flux_state, tmp_path):
    key = "transformer_blocks.0.attn.to_q.weight"
    del flux_state[key]
    err = _load_error(_fresh(), _write(tmp_path, flux_state))
    assert err.missing == [key] and not err.unexpected and not err.shape_mismatch
    assert "missing keys" in str(err) and key in str(err)


def test_unexpected_key_is_named(flux_state, tmp_path):
    flux_state["transformer_blocks.0.attn.to_z.weight"] = torch.randn(3, 3)
    err = _load_error(_fresh(), _write(tmp_path, flux_state))
    assert err.unexpected == ["transformer_blocks.0.attn.to_z.weight"] and not err.missing
    assert "unexpected keys" in str(err) and "to_z" in str(err)


def test_wrong_shape_is_named_with_both_shapes(flux_state, tmp_path):
    key = "proj_out.weight"
    rows, cols = flux_state[key].shape
    flux_state[key] = torch.randn(rows + 1, cols)
    err = _load_error(_fresh(), _write(tmp_path, flux_state))
    assert [k for k, _, _ in err.shape_mismatch] == [key]
    assert f"{key}: expected [{rows}, {cols}], file has [{rows + 1}, {cols}]" in str(err)


def test_wrong_dtype_is_named_unless_cast_is_allowed(flux_state, tmp_path):
    key = "x_embedder.bias"
    flux_state[key] = flux_state[key].half()
    path = _write(tmp_path, flux_state)
    err = _load_error(_fresh(), path)
    assert err.dtype_mismatch == [(key, torch.float32, torch.float16)]
    assert "allow_cast=True" in str(err) and key in str(err)
    model = load_weights(_fresh(), path, allow_cast=True)
    assert torch.equal(model.x_embedder.bias, flux_state[key].float())


def test_all_problems_reported_at_once(flux_state, tmp_path):
    del flux_state["context_embedder.bias"]
    flux_state["extra.weight"] = torch.ones(2)
    flux_state["proj_out.bias"] = torch.ones(3)
    err = _load_error(_fresh(), _write(tmp_path, flux_state))
    assert err.missing == ["context_embedder.bias"] and err.unexpected == ["extra.weight"]
    assert [k for k, _, _ in err.shape_mismatch] == ["proj_out.bias"]


def test_sd3_buffer_is_part_of_the_contract(tmp_path):
    """SD3's positional table is a persistent buffer in diffusers' checkpoints: it must be there."""
    model = SD3Transformer.random(SD3Config.tiny())
    state = dict(model.state_dict())
    del state["pos_embed.pos_embed"]
    err = _load_error(SD3Transformer(SD3Config.tiny()), _write(tmp_path, state))
    assert err.missing == ["pos_embed.pos_embed"]


def test_shards_and_duplicate_keys(flux_state, tmp_path):
    keys = sorted(flux_state)
    folder = tmp_path / "shards"
    folder.mkdir()
    _write(folder, {k: flux_state[k] for k in keys[: len(keys) // 2]}, "a.safetensors")
    _write(folder, {k: flux_state[k] for k in keys[len(keys) // 2:]}, "b.safetensors")
    model = load_weights(_fresh(), folder)
    assert torch.equal(model.proj_out.weight, flux_state["proj_out.weight"])
    _write(folder, {keys[0]: flux_state[keys[0]]}, "c.safetensors")
    with pytest.raises(ValueError, match="more than one shard"):
        load_weights(_fresh(), folder)


def test_bfl_layout_errors_name_keys(tmp_path):
    from test_mmdit_parity import to_bfl_layout

    config = FluxConfig.tiny()
    state = to_bfl_layout(FluxTransformer.random(config).state_dict(), config.inner_dim)
    del state["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"]
    state["model.diffusion_model.double_blocks.0.img_attn.lora_up.weight"] = torch.ones(2)
    err = _load_error(FluxTransformer(config), _write(tmp_path, state))
    assert err.missing == sorted(f"transformer_blocks.0.attn.to_{c}.weight" for c in "qkv")
    assert err.unexpected == ["double_blocks.0.img_attn.lora_up.weight"]
    assert "BFL layout" in str(err)


def test_bfl_layout_needs_a_flux_model(tmp_path):
    from test_mmdit_parity import to_bfl_layout

    config = FluxConfig.tiny()
    path = _write(tmp_path, to_bfl_layout(FluxTransformer.random(config).state_dict(), config.inner_dim))
    with pytest.raises(ValueError, match="not a FluxTransformer"):
        load_weights(SD3Transformer(SD3Config.tiny()), path)


def test_missing_paths_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_weights(_fresh(), tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_weights(_fresh(), tmp_path)
    with pytest.raises(FileNotFoundError, match="Flux transformer: path not found"):
        load_flux(tmp_path / "nowhere")
    lone = tmp_path / "lone"
    lone.mkdir()
    save_weights(SD3Transformer.random(SD3Config.tiny()), lone / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_sd3(lone)
    with pytest.raises(ValueError, match="layout must be"):
        load_weights(_fresh(), lone / "model.safetensors", layout="original")


def test_a_folder_reads_its_index_or_its_plain_files_not_a_variant(flux_state, tmp_path):
    """As diffusers reads a folder: the shards its ``*.safetensors.index.json`` names (a stale
    shard beside them is not read), else the plain files, skipping a ``variant``
    (``model.fp16.safetensors``, ``model.fp16-00001-of-00002.safetensors``) beside them; a
    folder of one variant only is read as it is."""
    import json
    keys = sorted(flux_state)
    half = {k: v.half() for k, v in flux_state.items()}
    folder = tmp_path / "both"
    folder.mkdir()
    _write(folder, flux_state, "diffusion_pytorch_model.safetensors")
    _write(folder, half, "diffusion_pytorch_model.fp16.safetensors")
    _write(folder, {k: half[k] for k in keys[:3]}, "diffusion_pytorch_model.fp16-00001-of-00002.safetensors")
    model = load_weights(_fresh(), folder)
    assert all(torch.equal(flux_state[k], v) for k, v in model.state_dict().items())
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = {k: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, k in enumerate(keys)}
    for name in set(names.values()):
        _write(sharded, {k: flux_state[k] for k in keys if names[k] == name}, name)
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": names}))
    _write(sharded, {keys[0]: flux_state[keys[0]]}, "stale.safetensors")  # not in the index
    model = load_weights(_fresh(), sharded)
    assert all(torch.equal(flux_state[k], v) for k, v in model.state_dict().items())
    only = tmp_path / "only_fp16"
    only.mkdir()
    _write(only, half, "diffusion_pytorch_model.fp16.safetensors")
    model = load_weights(_fresh().half(), only)
    assert all(torch.equal(half[k], v) for k, v in model.state_dict().items())


def test_broken_files_and_configs_are_named(flux_state, tmp_path):
    import json
    path = _write(tmp_path, flux_state)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read the weights file .*broken.safetensors"):
        load_weights(_fresh(), broken)
    with pytest.raises(ValueError, match="the config is of a 'SD3Transformer2DModel', not of a FluxTransformer2DModel"):
        FluxConfig.from_dict({"_class_name": "SD3Transformer2DModel", "num_layers": 1})
    with pytest.raises(ValueError, match="SD3Config: the config is of a 'AutoencoderKL'"):
        SD3Config.from_dict({"_class_name": "AutoencoderKL"})
    for config_class in (FluxConfig, SD3Config):  # a JSON array, not an object
        with pytest.raises(ValueError, match=f"{config_class.__name__}: a model config must be a JSON object"):
            config_class.from_dict([["num_layers", 1]])
    # Values of the wrong JSON type are refused by field name, not left to crash in the model
    # (2.0 layers reached range(), "true" passed as truthy, null heads a bare TypeError).
    tiny_flux, tiny_sd3 = FluxConfig.tiny().to_dict(), SD3Config.tiny().to_dict()
    for config_class, base, field, value, expected in [
            (FluxConfig, tiny_flux, "axes_dims_rope", None, "a list of 3 non-negative integers"),
            (FluxConfig, tiny_flux, "axes_dims_rope", [2, 2.0, 4], "a list of 3 non-negative integers"),
            (FluxConfig, tiny_flux, "num_layers", 2.0, "a non-negative integer"),
            (FluxConfig, tiny_flux, "num_layers", "2", "a non-negative integer"),
            (FluxConfig, tiny_flux, "num_single_layers", -1, "a non-negative integer"),
            (FluxConfig, tiny_flux, "num_attention_heads", None, "a non-negative integer"),
            (FluxConfig, tiny_flux, "guidance_embeds", "true", "a boolean"),
            (FluxConfig, tiny_flux, "out_channels", True, "a non-negative integer or null"),
            (SD3Config, tiny_sd3, "dual_attention_layers", ["0"], "a list of non-negative integers"),
            (SD3Config, tiny_sd3, "qk_norm", 3, "a string or null")]:
        with pytest.raises(ValueError, match=f"{config_class.__name__}: config field '{field}' must be {expected}"):
            config_class.from_dict({**base, field: value})
    assert FluxConfig.from_dict({**tiny_flux, "out_channels": None, "unknown_field": 2.5}) == FluxConfig.tiny()
    assert FluxConfig.from_dict({**FluxConfig.tiny().to_dict(), "_class_name": "FluxTransformer2DModel"}) == \
        FluxConfig.tiny()
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**FluxConfig.tiny().to_dict(), "_class_name": "UNet2DModel"}))
    _write(folder, flux_state)
    with pytest.raises(ValueError, match="'UNet2DModel'"):
        load_flux(folder)


@pytest.mark.parametrize("config_class", ["FluxConfig", "SD3Config"])
def test_malformed_config_json_names_the_file(tmp_path, config_class):
    import iidkern.mmdit as mmdit

    (tmp_path / "config.json").write_text('{"num_layers": 2,')
    with pytest.raises(ValueError, match=rf"{config_class}.from_json: .*config.json' is not valid JSON"):
        getattr(mmdit, config_class).from_json(str(tmp_path))
