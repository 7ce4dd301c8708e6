"""Strict weight loading from safetensors (diffusers' key layout, or BFL's original Flux layout).

Strict means every problem is found before any weight is copied, and reported at once in
one :class:`WeightLoadError` that lists each key: keys the model needs but the files lack
(*missing*), keys the files hold that the model does not know (*unexpected*), tensors of
the wrong shape, and tensors of the wrong dtype (a checkpoint in another precision than
the model is an error unless ``allow_cast=True``: casting an 8B model silently doubles its
load time and hides mistakes).

The runners name their parameters exactly as diffusers does, so the diffusers layout is
read as is. The original Flux checkpoints (``flux1-dev.safetensors``, keys such as
``double_blocks.0.img_attn.qkv.weight``) are converted on the fly: fused q/k/v are split,
the final layer's (shift, scale) swapped to diffusers' (scale, shift).
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Dict, Iterable, List, Sequence, Tuple, Union

import torch
import torch.nn as nn

PathLike = Union[str, os.PathLike]
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_BFL_PREFIX = "model.diffusion_model."
_MAX_LISTED = 25


class WeightLoadError(ValueError):
    """Missing / unexpected / mis-shaped / wrong-dtype keys, each listed by name."""

    def __init__(self, source: str, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
                 shape_mismatch: Sequence[Tuple[str, tuple, tuple]] = (),
                 dtype_mismatch: Sequence[Tuple[str, torch.dtype, torch.dtype]] = ()):
        self.missing, self.unexpected = list(missing), list(unexpected)
        self.shape_mismatch, self.dtype_mismatch = list(shape_mismatch), list(dtype_mismatch)
        parts = [f"cannot load weights from {source}:"]

        def listing(title, items):
            shown = items[:_MAX_LISTED]
            more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
            parts.append(f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown) + more)

        if self.missing:
            listing("missing keys (the model needs them, the files lack them)", self.missing)
        if self.unexpected:
            listing("unexpected keys (in the files, unknown to the model)", self.unexpected)
        if self.shape_mismatch:
            listing("wrong shapes", [f"{k}: expected {list(e)}, file has {list(g)}" for k, e, g in self.shape_mismatch])
        if self.dtype_mismatch:
            listing("wrong dtypes (pass allow_cast=True to cast)",
                    [f"{k}: expected {e}, file has {g}" for k, e, g in self.dtype_mismatch])
        super().__init__("\n".join(parts))


def safetensors_files(path: Union[PathLike, Sequence[PathLike]]) -> List[str]:
    """A file, a list of files, or a directory's weights: the files its
    ``*.safetensors.index.json`` names (the shards of one checkpoint), else its
    ``*.safetensors`` files. As diffusers reads a folder by default, files of a ``variant``
    (``model.fp16.safetensors``, ``model.fp16-00001-of-00002.safetensors``) are skipped
    beside plain ones; a folder of one variant only is read as it is."""
    if isinstance(path, (list, tuple)):
        files = [os.fspath(p) for p in path]
    else:
        path = os.fspath(path)
        files = _directory_weights(path) if os.path.isdir(path) else [path]
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"weights file not found: {f!r}")
    return files


def _is_variant(file: str) -> bool:
    """``model.fp16.safetensors`` / ``model.fp16-00001-of-00002.safetensors``: a weights file
    name with a variant tag."""
    return "." in os.path.basename(file)[:-len(".safetensors")]


def _directory_weights(path: str) -> List[str]:
    # A variant's index is model.safetensors.index.fp16.json: this pattern leaves it out.
    indexes = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
    if len(indexes) > 1:
        raise ValueError(f"the directory {path!r} holds several checkpoint indexes {indexes}: pass the files")
    if indexes:
        try:
            with open(indexes[0]) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read the checkpoint index {indexes[0]!r}: {exc}") from None
        return [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in the directory {path!r}")
    plain = [f for f in files if not _is_variant(f)]
    return plain or files


def read_safetensors(path) -> Dict[str, torch.Tensor]:
    """All tensors of one or more safetensors files (memory-mapped on CPU); duplicate keys are an error."""
    tensors: Dict[str, torch.Tensor] = {}
    for file in safetensors_files(path):
        with open_safetensors(file) as f:
            for key in f.keys():
                if key in tensors:
                    raise ValueError(f"key {key!r} appears in more than one shard (second: {file!r}); a folder "
                                     f"holding two checkpoints? pass the files")
                tensors[key] = f.get_tensor(key)
    return tensors


def open_safetensors(file: str):
    """``safe_open`` on CPU; a file that is not a safetensors file is a ValueError naming it."""
    from safetensors import SafetensorError, safe_open
    try:
        return safe_open(file, framework="pt", device="cpu")
    except SafetensorError as exc:
        raise ValueError(f"cannot read the weights file {file!r} (not a safetensors file, or truncated): {exc}") \
            from None


def is_bfl_flux_layout(keys: Iterable[str]) -> bool:
    """Whether a Flux checkpoint's keys are BFL's original layout (with or without the
    ``model.diffusion_model.`` prefix of some exports): ``img_in.`` is in every such file,
    ``double_blocks.`` in those with double blocks."""
    marks = ("double_blocks.", "img_in.")
    return any(k.startswith(marks) or (k.startswith(_BFL_PREFIX) and k[len(_BFL_PREFIX):].startswith(marks))
               for k in keys)


def bfl_flux_to_diffusers(state: Dict[str, torch.Tensor], inner_dim: int, mlp_hidden_dim: int):
    """Rename / split BFL's original Flux keys into diffusers' layout.

    Returns ``(converted, unknown)``: the converted dict (``key -> tensor``) and the BFL keys
    no rule knows (reported as unexpected). Missing BFL keys simply leave their diffusers
    keys absent, which the strict check then reports.
    """
    state = {k[len(_BFL_PREFIX):] if k.startswith(_BFL_PREFIX) else k: v for k, v in state.items()}
    out: Dict[str, torch.Tensor] = {}
    unknown: List[str] = []

    def mlp_embedder(src, dst):
        return {f"{src}.in_layer.{p}": [f"{dst}.linear_1.{p}"] for p in ("weight", "bias")} | \
               {f"{src}.out_layer.{p}": [f"{dst}.linear_2.{p}"] for p in ("weight", "bias")}

    renames: Dict[str, List[str]] = {}
    renames |= mlp_embedder("time_in", "time_text_embed.timestep_embedder")
    renames |= mlp_embedder("vector_in", "time_text_embed.text_embedder")
    renames |= mlp_embedder("guidance_in", "time_text_embed.guidance_embedder")
    for p in ("weight", "bias"):
        renames[f"txt_in.{p}"] = [f"context_embedder.{p}"]
        renames[f"img_in.{p}"] = [f"x_embedder.{p}"]
        renames[f"final_layer.linear.{p}"] = [f"proj_out.{p}"]

    double = re.compile(r"double_blocks\.(\d+)\.(.+)")
    single = re.compile(r"single_blocks\.(\d+)\.(.+)")
    double_rules = {  # BFL suffix -> diffusers suffixes (several = split in equal chunks along dim 0)
        "img_mod.lin": ["norm1.linear"], "txt_mod.lin": ["norm1_context.linear"],
        "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
        "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
        "img_attn.proj": ["attn.to_out.0"], "txt_attn.proj": ["attn.to_add_out"],
        "img_mlp.0": ["ff.net.0.proj"], "img_mlp.2": ["ff.net.2"],
        "txt_mlp.0": ["ff_context.net.0.proj"], "txt_mlp.2": ["ff_context.net.2"],
    }
    double_norms = {"img_attn.norm.query_norm.scale": "attn.norm_q.weight",
                    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
                    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"}
    single_norms = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}

    for key, tensor in state.items():
        if key in renames:
            out[renames[key][0]] = tensor
            continue
        if key.startswith("final_layer.adaLN_modulation.1."):
            shift, scale = tensor.chunk(2, dim=0)  # BFL orders (shift, scale); diffusers (scale, shift)
            out["norm_out.linear." + key.rsplit(".", 1)[1]] = torch.cat([scale, shift], dim=0)
            continue
        m = double.fullmatch(key)
        if m:
            i, rest = m.groups()
            if rest in double_norms:
                out[f"transformer_blocks.{i}.{double_norms[rest]}"] = tensor
                continue
            base, _, param = rest.rpartition(".")
            if base in double_rules and param in ("weight", "bias"):
                targets = double_rules[base]
                if len(targets) == 1:
                    out[f"transformer_blocks.{i}.{targets[0]}.{param}"] = tensor
                elif tensor.shape[0] % len(targets) == 0:
                    for name, part in zip(targets, tensor.chunk(len(targets), dim=0)):
                        out[f"transformer_blocks.{i}.{name}.{param}"] = part
                else:
                    # The fused tensor cannot be split evenly: report its parts under their names.
                    for name in targets:
                        out[f"transformer_blocks.{i}.{name}.{param}"] = tensor
                continue
        m = single.fullmatch(key)
        if m:
            i, rest = m.groups()
            prefix = f"single_transformer_blocks.{i}."
            if rest in single_norms:
                out[prefix + single_norms[rest]] = tensor
                continue
            base, _, param = rest.rpartition(".")
            if base == "linear1" and param in ("weight", "bias"):
                sizes = (inner_dim, inner_dim, inner_dim, mlp_hidden_dim)
                names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
                parts = tensor.split(sizes, dim=0) if tensor.shape[0] == sum(sizes) else (tensor,) * 4
                for name, part in zip(names, parts):
                    out[f"{prefix}{name}.{param}"] = part
                continue
            if base in ("modulation.lin", "linear2") and param in ("weight", "bias"):
                target = "norm.linear" if base == "modulation.lin" else "proj_out"
                out[f"{prefix}{target}.{param}"] = tensor
                continue
        unknown.append(key)
    return out, unknown


def _expected(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every parameter and persistent buffer, by state-dict name (the tensors themselves, to copy into)."""
    named = dict(model.named_parameters())
    for name, buf in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if leaf not in module._non_persistent_buffers_set:
            named[name] = buf
    return named


def check_state(model: nn.Module, given: Dict[str, Tuple[tuple, torch.dtype]], *, source: str,
                allow_cast: bool = False, unknown: Sequence[str] = ()) -> None:
    """Raise :class:`WeightLoadError` unless ``given`` (``key -> (shape, dtype)``) matches the model exactly."""
    expected = _expected(model)
    missing = sorted(k for k in expected if k not in given)
    unexpected = sorted(list(unknown) + [k for k in given if k not in expected])
    shapes, dtypes = [], []
    for key, (shape, dtype) in sorted(given.items()):
        if key not in expected:
            continue
        target = expected[key]
        if tuple(shape) != tuple(target.shape):
            shapes.append((key, tuple(target.shape), tuple(shape)))
        elif dtype != target.dtype and not (allow_cast and dtype.is_floating_point):
            dtypes.append((key, target.dtype, dtype))
    if missing or unexpected or shapes or dtypes:
        raise WeightLoadError(source, missing, unexpected, shapes, dtypes)


@torch.no_grad()
def load_state_dict_strict(model: nn.Module, state: Dict[str, torch.Tensor], *, allow_cast: bool = False,
                           source: str = "a state dict", unknown: Sequence[str] = ()) -> nn.Module:
    """Copy ``state`` into ``model`` after :func:`check_state` passed; tensors move to the model's device."""
    check_state(model, {k: (tuple(v.shape), v.dtype) for k, v in state.items()}, source=source,
                allow_cast=allow_cast, unknown=unknown)
    for key, target in _expected(model).items():
        target.copy_(state[key])
    return model


def load_weights(model: nn.Module, path, *, layout: str = "auto", allow_cast: bool = False) -> nn.Module:
    """Load safetensors weights into an :class:`SD3Transformer` or :class:`FluxTransformer`, strictly.

    Args:
        path: a ``.safetensors`` file, a list of shards, or a directory of shards (diffusers'
            ``transformer/`` folder).
        layout: ``"diffusers"``, ``"bfl"`` (original Flux checkpoints) or ``"auto"`` (detected
            from the key names).
        allow_cast: accept floating tensors of another dtype than the model's and cast them.

    Raises:
        WeightLoadError: listing every missing, unexpected, mis-shaped or wrong-dtype key.
        FileNotFoundError: the path holds no safetensors file.
    """
    if layout not in ("auto", "diffusers", "bfl"):
        raise ValueError(f"layout must be 'auto', 'diffusers' or 'bfl', got {layout!r}")
    files = safetensors_files(path)
    source = files[0] if len(files) == 1 else f"{len(files)} shards in {os.path.dirname(files[0]) or '.'}"
    state = read_safetensors(files)
    if layout == "auto":
        layout = "bfl" if is_bfl_flux_layout(state) else "diffusers"
    unknown: List[str] = []
    if layout == "bfl":
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "num_single_layers"):
            raise ValueError("layout='bfl' is the original Flux layout; the model is not a FluxTransformer")
        state, unknown = bfl_flux_to_diffusers(state, config.inner_dim, 4 * config.inner_dim)
        source += " (BFL layout)"
    return load_state_dict_strict(model, state, allow_cast=allow_cast, source=source, unknown=unknown)


def save_weights(model: nn.Module, path: PathLike) -> None:
    """Save the model's parameters and persistent buffers in diffusers' key layout."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in _expected(model).items()}, os.fspath(path))


def _build_empty(cls, config, device, dtype):
    """The model with uninitialised storage on ``device`` in ``dtype`` (every tensor is then loaded)."""
    with torch.device("meta"):
        model = cls(config)
    return model.to(dtype=dtype).to_empty(device=device or "cpu").eval()


def _config_for(config_cls, path, config, what):
    if config is not None:
        return config
    candidates = [path] if os.path.isdir(os.fspath(path)) else [os.path.dirname(os.fspath(path)) or "."]
    for folder in candidates:
        for sub in ("", "transformer"):
            if os.path.isfile(os.path.join(folder, sub, "config.json")):
                return config_cls.from_json(os.path.join(folder, sub))
    hint = f", e.g. config={config_cls.__name__}.dev()" if config_cls.__name__ == "FluxConfig" else ""
    raise FileNotFoundError(f"{what}: no config.json next to {os.fspath(path)!r}; pass config={hint}")


def _weights_path(path):
    path = os.fspath(path)
    if os.path.isdir(path) and not glob.glob(os.path.join(path, "*.safetensors")) and \
            os.path.isdir(os.path.join(path, "transformer")):
        return os.path.join(path, "transformer")  # a whole pipeline snapshot
    return path


def load_sd3(path, *, config=None, device=None, dtype=torch.bfloat16, allow_cast: bool = False):
    """An :class:`SD3Transformer` from a local diffusers ``transformer/`` folder (or pipeline root), strictly."""
    from .sd3 import SD3Config, SD3Transformer

    if not os.path.exists(os.fspath(path)):
        raise FileNotFoundError(f"SD3 transformer: path not found: {os.fspath(path)!r}")
    path = _weights_path(path)
    model = _build_empty(SD3Transformer, _config_for(SD3Config, path, config, "SD3 transformer"), device, dtype)
    return load_weights(model, path, layout="diffusers", allow_cast=allow_cast)


def load_flux(path, *, config=None, device=None, dtype=torch.bfloat16, layout: str = "auto",
              allow_cast: bool = False):
    """A :class:`FluxTransformer` from a diffusers folder or an original BFL ``.safetensors`` file, strictly.

    A BFL single file carries no config: pass ``config=FluxConfig.dev()`` (or ``.schnell()``).
    """
    from .flux import FluxConfig, FluxTransformer

    if not os.path.exists(os.fspath(path)):
        raise FileNotFoundError(f"Flux transformer: path not found: {os.fspath(path)!r}")
    path = _weights_path(path)
    model = _build_empty(FluxTransformer, _config_for(FluxConfig, path, config, "Flux transformer"), device, dtype)
    return load_weights(model, path, layout=layout, allow_cast=allow_cast)
