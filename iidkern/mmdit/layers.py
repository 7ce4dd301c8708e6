"""Building blocks shared by the SD3 and Flux runners.

Every module here keeps the parameter names of its diffusers counterpart (``linear``,
``linear_1``/``linear_2``, ``net.0.proj``/``net.2``, ``to_q`` ...), so a runner's
``state_dict()`` has exactly diffusers' key layout and a checkpoint loads without a
renaming table. The math is written out here; nothing is imported from diffusers.

The one place where attention happens is :func:`joint_attention`: it hands ``q, k, v``
in the ``[B, N, H, D]`` layout to :func:`iidkern.policy.attend` (or, for benchmarks only,
to PyTorch's SDPA with ``backend="sdpa"``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..policy import AttentionPolicy, AttentionSite, attend
from ..specs import as_real

ATTENTION_BACKENDS = ("auto", "triton", "reference", "sdpa")


def read_config_json(path: str, who: str) -> dict:
    """A diffusers ``config.json`` (the file, or the directory holding it) as a dict; a
    missing or malformed file is an error naming the file and ``who`` read it."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{who}: no config file at {path!r}")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as exc:  # json.JSONDecodeError, and text that is not UTF-8
        raise ValueError(f"{who}: {path!r} is not valid JSON ({exc})") from None


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos | sin]`` of a 1-D tensor of (already scaled) timesteps, in float32.

    Same frequencies as diffusers' ``Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    """``linear_2(act(linear_1(x)))``: the timestep, guidance and pooled-text embedders."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbedding(nn.Module):
    """Conditioning vector ``temb`` = timestep embedding (+ guidance embedding) + pooled-text embedding.

    ``t`` and ``guidance`` are given already multiplied by 1000 (the models do that).
    """

    def __init__(self, dim: int, pooled_dim: int, guidance: bool = False):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.guidance_embedder = MLPEmbedder(256, dim) if guidance else None
        self.text_embedder = MLPEmbedder(pooled_dim, dim)

    def forward(self, t: torch.Tensor, pooled: torch.Tensor, guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.timestep_embedder(timestep_embedding(t).to(pooled.dtype))
        if self.guidance_embedder is not None:
            emb = emb + self.guidance_embedder(timestep_embedding(guidance).to(pooled.dtype))
        return emb + self.text_embedder(pooled)


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm without affine parameters (every MM-DiT norm gets its scale/shift from ``temb``)."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Modulation(nn.Module):
    """adaLN: ``linear(silu(temb))`` split into ``count`` vectors of size ``dim``."""

    def __init__(self, dim: int, count: int):
        super().__init__()
        self.count = count
        self.linear = nn.Linear(dim, count * dim)

    def forward(self, temb: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return self.linear(F.silu(temb)).chunk(self.count, dim=1)


class ContinuousAdaNorm(nn.Module):
    """adaLN without a gate (final layer, SD3's last text-stream norm). Chunk order is (scale, shift)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb).to(x.dtype)).chunk(2, dim=1)
        return modulate(layer_norm(x), shift, scale)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim (QK norm over the head dim); variance in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight.to(x.dtype)


class _GeluProjection(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """``Linear -> GELU(tanh) -> Linear`` with 4x hidden width; ``net.1`` is diffusers' (empty) dropout slot."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([_GeluProjection(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


def apply_rope(x: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate ``x`` ``[B, N, H, D]`` by ``(cos, sin)`` ``[N, D]`` (interleaved pairs, as in Flux), in float32."""
    cos, sin = rope[0][None, :, None, :], rope[1][None, :, None, :]
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class JointAttention(nn.Module):
    """Multi-head attention of an MM-DiT block, in diffusers' parameter names.

    * image stream: ``to_q/to_k/to_v`` (+ ``norm_q/norm_k``), output ``to_out.0``;
    * text stream (``text=True``): ``add_q_proj/add_k_proj/add_v_proj`` (+ ``norm_added_q/k``),
      output ``to_add_out`` unless ``text_out=False`` (SD3's last block only reads the text);
    * ``image_out=False``: no ``to_out`` (Flux's single blocks project after the MLP concat).

    The joint sequence is ``[text; image]`` (the layout of the original SD3 and Flux code);
    the caller says where each range lies through the :class:`AttentionSite` it passes.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, *, qk_norm: bool, text: bool = False,
                 text_out: bool = True, image_out: bool = True, eps: float = 1e-6):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.norm_q = RMSNorm(head_dim, eps) if qk_norm else None
        self.norm_k = RMSNorm(head_dim, eps) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)]) if image_out else None
        if text:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
            self.norm_added_q = RMSNorm(head_dim, eps) if qk_norm else None
            self.norm_added_k = RMSNorm(head_dim, eps) if qk_norm else None
            self.to_add_out = nn.Linear(inner, dim) if text_out else None
        self.has_text = text

    def _heads(self, x, q_proj, k_proj, v_proj, norm_q, norm_k):
        b, n, _ = x.shape
        # The head dim is spelled out: with no text tokens (n == 0) a -1 cannot be inferred.
        q, k, v = (proj(x).view(b, n, self.heads, self.head_dim) for proj in (q_proj, k_proj, v_proj))
        if norm_q is not None:
            q, k = norm_q(q), norm_k(k)
        return q, k, v

    def forward(self, image: torch.Tensor, text: Optional[torch.Tensor], *, site: Optional[AttentionSite],
                policy: Optional[AttentionPolicy], backend: str,
                rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        """Returns ``(image_out, text_out)``; ``text_out`` is None without a text stream or ``to_add_out``.

        ``image`` is the whole sequence for single-stream use (``text=None``).
        """
        q, k, v = self._heads(image, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        num_text = 0
        if text is not None:
            tq, tk, tv = self._heads(text, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                                     self.norm_added_q, self.norm_added_k)
            num_text = text.shape[1]
            q, k, v = torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = joint_attention(q, k, v, site, policy, backend)
        text_out, image_out = out[:, :num_text], out[:, num_text:]
        if self.to_out is not None:
            image_out = self.to_out[0](image_out)
        if text is None or self.to_add_out is None:
            return image_out, None
        return image_out, self.to_add_out(text_out)


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: Optional[AttentionSite],
                    policy: Optional[AttentionPolicy], backend: str) -> torch.Tensor:
    """Attention of ``[B, N, H, D]`` tensors through the policy door; returns ``[B, N, H*D]``.

    ``backend="sdpa"`` bypasses iidkern (PyTorch's SDPA) and exists only as the baseline of
    benchmarks and bf16 comparisons with diffusers; it refuses a policy.
    """
    if backend == "sdpa":
        if policy is not None:
            raise ValueError("backend='sdpa' is the plain PyTorch baseline and cannot serve a policy; "
                             "use backend='auto', 'triton' or 'reference'")
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    else:
        out = attend(q, k, v, site, policy, layout="bnhd", backend=backend)
    return out.flatten(2)


def check_backend(backend: str) -> None:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")


def config_from_dict(cls, config: dict, class_names: Tuple[str, ...]):
    """A config dataclass from a diffusers ``config.json`` dict: its known fields, the rest
    ignored. A ``_class_name`` other than ``class_names`` (another model's config) or a value
    the dataclass refuses by type is a ValueError saying which."""
    if not isinstance(config, dict):
        raise ValueError(f"{cls.__name__}: a model config must be a JSON object, got {type(config).__name__}")
    found = config.get("_class_name")
    if found is not None and found not in class_names:
        raise ValueError(f"{cls.__name__}: the config is of a {found!r}, not of a {' or '.join(class_names)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    for name, value in config.items():
        expected = _json_mismatch(value, fields[name]) if name in fields else None
        if expected is not None:  # 2.0 layers, "2" heads, null heads: refused here, by name
            raise ValueError(f"{cls.__name__}: config field {name!r} must be {expected}, got {value!r}")
    try:
        return cls(**{k: v for k, v in config.items() if k in fields})
    except TypeError as exc:  # e.g. "axes_dims_rope": null
        raise ValueError(f"{cls.__name__}: a config field has the wrong type ({exc})") from None


def _json_mismatch(value, hint) -> Optional[str]:
    """What a config value should have been for a field annotated ``hint``, or None when it
    fits: ints are non-negative integers (not bools, not 2.0), bools are JSON booleans (not
    "true"), tuples are lists of such items; other annotations are left to the dataclass."""
    origin = typing.get_origin(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(rest) != 1:
            return None
        inner = _json_mismatch(value, rest[0])
        return None if inner is None else f"{inner} or null"
    if hint is bool:
        return None if isinstance(value, bool) else "a boolean (true or false)"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else \
            "a non-negative integer"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if origin in (tuple, list):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        fixed = Ellipsis not in typing.get_args(hint) and len(args) > 0
        what = f"a list of {len(args)} " if fixed else "a list of "
        item = "non-negative integers" if args and args[0] is int else "items"
        if not isinstance(value, (list, tuple)) or (fixed and len(value) != len(args)):
            return what + item
        if args and any(_json_mismatch(v, args[0]) is not None for v in value):
            return what + item
    return None


def as_batch_vector(value, batch: int, name: str, device, dtype=torch.float32) -> torch.Tensor:
    """A real scalar (Python, numpy scalar or 0-d array, 0-d tensor) or a ``[B]`` (or ``[1]``)
    tensor as a ``[B]`` tensor. A bool, a string or a complex value is a TypeError."""
    if not isinstance(value, torch.Tensor):
        # numpy scalars too: a schedule built with numpy yields np.float32 times, not floats.
        real = as_real(value)
        if real is None:
            raise TypeError(f"{name} must be a real number or a tensor of shape [{batch}], got "
                            f"{value!r} ({type(value).__name__})")
        return torch.full((batch,), real, device=device, dtype=dtype)
    if value.dtype == torch.bool or value.dtype.is_complex:
        raise TypeError(f"{name} must be a real number or a real tensor of shape [{batch}], got a {value.dtype} tensor")
    value = value.reshape(-1) if value.dim() == 0 else value
    if value.dim() != 1 or value.shape[0] not in (1, batch):
        raise ValueError(f"{name} must be a scalar or have shape [{batch}], got {tuple(value.shape)}")
    return value.to(device=device, dtype=dtype).expand(batch)


def check_tensor(x, name: str, dims: int, last: Optional[int] = None, shape_hint: str = "") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dims or (last is not None and x.shape[-1] != last):
        expected = shape_hint or f"{dims}-D" + (f" with last dim {last}" if last is not None else "")
        raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")
