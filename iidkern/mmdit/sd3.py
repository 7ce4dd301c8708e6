"""SD3-family MM-DiT (SD3-medium, SD3.5-medium/large) written out, every attention through iidkern.

Structure (one :class:`JointBlock` per layer): the image and text streams each get their
own adaLN-Zero modulation, projections and MLP, and meet in one joint attention over the
sequence ``[text; image]``. SD3.5 adds QK RMSNorm (``qk_norm="rms_norm"``) and, in
SD3.5-medium, a second image-only attention (``attn2``) in the first blocks
(``dual_attention_layers``). The last block only reads the text stream
(``context_pre_only``, as in diffusers: no text output projection and no text MLP).

Parameter names equal diffusers' ``SD3Transformer2DModel`` keys, so its safetensors load
as they are (:func:`iidkern.mmdit.loading.load_weights`).

Conventions: the model takes the flow time ``t`` in ``[0, 1]`` (1 = pure noise) and
multiplies it by 1000 itself, like the diffusers pipeline does before calling its model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn

from ..policy import AttentionPolicy, AttentionSite, check_steps
from .layers import (ContinuousAdaNorm, FeedForward, JointAttention, Modulation, TimeTextEmbedding, as_batch_vector,
                     check_backend, check_tensor, config_from_dict, layer_norm, modulate, read_config_json)

Streams = Tuple[Optional[torch.Tensor], torch.Tensor]  # (text, image); text is None after the last block
BlockHook = Callable[[str, int, Streams, Streams], Optional[Streams]]


@dataclass
class SD3Config:
    """Hyper-parameters, named as in diffusers' ``SD3Transformer2DModel`` config."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    num_layers: int = 24
    attention_head_dim: int = 64
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1536
    pooled_projection_dim: int = 2048
    pos_embed_max_size: int = 192
    dual_attention_layers: Tuple[int, ...] = ()
    qk_norm: Optional[str] = None

    def __post_init__(self):
        self.dual_attention_layers = tuple(int(i) for i in self.dual_attention_layers)
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"SD3Config.qk_norm must be None or 'rms_norm', got {self.qk_norm!r}")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(f"SD3Config.caption_projection_dim ({self.caption_projection_dim}) must equal "
                             f"num_attention_heads * attention_head_dim ({self.inner_dim}): the text stream "
                             "shares the block width")
        if self.inner_dim % 4:
            # The 2-D sin-cos position table gives each axis half the width, as sin|cos pairs.
            raise ValueError(f"SD3Config: num_attention_heads * attention_head_dim must be divisible by 4 "
                             f"(the 2-D sin-cos position table), got {self.num_attention_heads} * "
                             f"{self.attention_head_dim} = {self.inner_dim}")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"SD3Config.dual_attention_layers {bad} lie outside [0, {self.num_layers})")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    # ------------------------------------------------------------------ real models
    @classmethod
    def sd3_medium(cls, **overrides) -> "SD3Config":
        """stabilityai/stable-diffusion-3-medium (2B)."""
        return cls(**{**dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                             pos_embed_max_size=192), **overrides})

    @classmethod
    def sd35_medium(cls, **overrides) -> "SD3Config":
        """stabilityai/stable-diffusion-3.5-medium (2.5B, MMDiT-X: dual attention in blocks 0-12)."""
        return cls(**{**dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                             pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
                      **overrides})

    @classmethod
    def sd35_large(cls, **overrides) -> "SD3Config":
        """stabilityai/stable-diffusion-3.5-large (8B)."""
        return cls(**{**dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                             pos_embed_max_size=192, qk_norm="rms_norm"), **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "SD3Config":
        """A few-thousand-parameter model for tests: 2 heads x 16, 2 layers, 4 latent channels."""
        base = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
                    pooled_projection_dim=20, pos_embed_max_size=16)
        base.update(overrides)
        if "caption_projection_dim" not in overrides:
            base["caption_projection_dim"] = base["num_attention_heads"] * base["attention_head_dim"]
        return cls(**base)

    # ------------------------------------------------------------------ diffusers' config.json
    @classmethod
    def from_dict(cls, config: dict) -> "SD3Config":
        """From a diffusers config dict (other keys are ignored). Another model's config
        (``_class_name``) or a field of the wrong type is a ValueError naming it."""
        if isinstance(config, dict) and isinstance(config.get("dual_attention_layers"), list):
            config = {**config, "dual_attention_layers": tuple(config["dual_attention_layers"])}
        return config_from_dict(cls, config, ("SD3Transformer2DModel",))

    @classmethod
    def from_json(cls, path: str) -> "SD3Config":
        """From a diffusers ``config.json`` (file or the directory holding it)."""
        return cls.from_dict(read_config_json(path, "SD3Config.from_json"))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        return d


def sincos_pos_embed(dim: int, grid: int, base_size: int) -> torch.Tensor:
    """SD3's fixed 2-D sin-cos table ``[grid*grid, dim]`` (first half: x coordinate, second: y)."""
    coords = torch.arange(grid, dtype=torch.float64) / (grid / base_size)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def one_axis(pos):  # [grid*grid] -> [grid*grid, dim/2]
        out = torch.outer(pos, omega)
        return torch.cat([out.sin(), out.cos()], dim=1)

    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([one_axis(xs.reshape(-1)), one_axis(ys.reshape(-1))], dim=1).float()


class PatchEmbed(nn.Module):
    """Latents ``[B, C, H, W]`` -> tokens ``[B, (H/p)(W/p), dim]`` plus the centre crop of the sin-cos table."""

    def __init__(self, config: SD3Config):
        super().__init__()
        p, dim, grid = config.patch_size, config.inner_dim, config.pos_embed_max_size
        self.patch_size, self.max_size = p, grid
        self.proj = nn.Conv2d(config.in_channels, dim, kernel_size=p, stride=p)
        # Persistent (it is in diffusers' checkpoints), computed here so random-init models work.
        self.register_buffer("pos_embed", sincos_pos_embed(dim, grid, config.sample_size // p).unsqueeze(0))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        h, w = latents.shape[-2] // self.patch_size, latents.shape[-1] // self.patch_size
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"latent grid {h}x{w} (after {self.patch_size}x{self.patch_size} patches) exceeds "
                             f"pos_embed_max_size={self.max_size}")
        tokens = self.proj(latents).flatten(2).transpose(1, 2)
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        table = self.pos_embed.view(1, self.max_size, self.max_size, -1)[:, top:top + h, left:left + w]
        return tokens + table.reshape(1, h * w, -1).to(tokens.dtype)


class JointBlock(nn.Module):
    """One MM-DiT block: per-stream adaLN-Zero, joint attention, per-stream MLP (+ SD3.5's ``attn2``)."""

    def __init__(self, config: SD3Config, context_pre_only: bool, dual_attention: bool):
        super().__init__()
        dim, heads, hd = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        qk = config.qk_norm is not None
        self.context_pre_only, self.dual_attention = context_pre_only, dual_attention
        # adaLN-Zero vectors: (shift, scale, gate) for attention, (shift, scale, gate) for the MLP,
        # and for dual attention a third (shift, scale, gate) for attn2.
        self.norm1 = Modulation(dim, 9 if dual_attention else 6)
        self.norm1_context = ContinuousAdaNorm(dim) if context_pre_only else Modulation(dim, 6)
        self.attn = JointAttention(dim, heads, hd, qk_norm=qk, text=True, text_out=not context_pre_only)
        self.attn2 = JointAttention(dim, heads, hd, qk_norm=qk) if dual_attention else None
        self.ff = FeedForward(dim)
        self.ff_context = None if context_pre_only else FeedForward(dim)

    def forward(self, image, text, temb, *, sites, policy, backend):
        mods = self.norm1(temb)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        normed = layer_norm(image)
        image_in = modulate(normed, shift, scale)
        if self.context_pre_only:
            text_in = self.norm1_context(text, temb)
        else:
            c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
            text_in = modulate(layer_norm(text), c_shift, c_scale)

        image_attn, text_attn = self.attn(image_in, text_in, site=sites[0], policy=policy, backend=backend)
        image = image + gate[:, None] * image_attn
        if self.attn2 is not None:
            shift2, scale2, gate2 = mods[6:]
            image_attn2, _ = self.attn2(modulate(normed, shift2, scale2), None, site=sites[1], policy=policy,
                                        backend=backend)
            image = image + gate2[:, None] * image_attn2
        image = image + gate_mlp[:, None] * self.ff(modulate(layer_norm(image), shift_mlp, scale_mlp))

        if self.context_pre_only:
            return None, image
        text = text + c_gate[:, None] * text_attn
        text = text + c_gate_mlp[:, None] * self.ff_context(modulate(layer_norm(text), c_shift_mlp, c_scale_mlp))
        return text, image


class SD3Transformer(nn.Module):
    """The SD3 / SD3.5 denoiser. ``forward`` returns the predicted velocity ``[B, C_out, H, W]``.

    Attention sites: block kind ``"joint"`` (the joint text+image attention of block ``i``,
    sequence ``[text; image]``) and, for SD3.5-medium's dual-attention blocks, ``"image"``
    (``attn2``: image tokens only, ``text=(0, 0)``). ``site.layer`` counts the calls of one
    forward pass in order (``num_layers`` = blocks + dual-attention blocks).
    """

    def __init__(self, config: SD3Config):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        self.pos_embed = PatchEmbed(config)
        self.time_text_embed = TimeTextEmbedding(dim, config.pooled_projection_dim)
        self.context_embedder = nn.Linear(config.joint_attention_dim, config.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList([
            JointBlock(config, context_pre_only=i == config.num_layers - 1,
                       dual_attention=i in config.dual_attention_layers)
            for i in range(config.num_layers)])
        self.norm_out = ContinuousAdaNorm(dim)
        self.proj_out = nn.Linear(dim, config.patch_size ** 2 * config.out_channels)
        # (block_kind, block index, layer index) of every attention call, in call order.
        self.attention_layers = []
        for i, block in enumerate(self.transformer_blocks):
            self.attention_layers.append(("joint", i))
            if block.dual_attention:
                self.attention_layers.append(("image", i))

    @property
    def num_attention_layers(self) -> int:
        return len(self.attention_layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    @classmethod
    def random(cls, config: SD3Config, *, seed: int = 0, device=None, dtype=torch.float32) -> "SD3Transformer":
        """A randomly initialised model (tests, benchmarks); seeded, built directly on ``device``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.device(device or "cpu"):
                model = cls(config)
        return model.to(dtype=dtype).eval()

    def _sites(self, num_text: int, num_image: int, step, num_steps):
        """The AttentionSite of every call, in call order (built only when a policy listens)."""
        joint = dict(text=(0, num_text), image=(num_text, num_text + num_image))
        alone = dict(text=(0, 0), image=(0, num_image))
        n = self.num_attention_layers
        return [AttentionSite(block=b, block_kind=kind, step=step, num_steps=num_steps, layer=layer, num_layers=n,
                              **(joint if kind == "joint" else alone))
                for layer, (kind, b) in enumerate(self.attention_layers)]

    def forward(self, latents: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor, t, *,
                policy: Optional[AttentionPolicy] = None, step: Optional[int] = None,
                num_steps: Optional[int] = None, backend: str = "auto",
                block_hook: Optional[BlockHook] = None) -> torch.Tensor:
        """Velocity for ``latents`` ``[B, C, H, W]`` at flow time ``t`` (a real number or ``[B]``, in [0, 1]).

        Args:
            text: ``[B, N_text, joint_attention_dim]`` prompt embeddings (CLIP-L/G + T5 in SD3).
            pooled: ``[B, pooled_projection_dim]`` pooled CLIP embeddings.
            policy, step, num_steps: handed to every attention call (see :class:`AttentionSite`).
            backend: ``"auto" | "triton" | "reference"`` (iidkern) or ``"sdpa"`` (baseline, no policy).
            block_hook: ``block_hook(kind, index, (text_in, image_in), (text_out, image_out))``
                after each block; may return a replacement ``(text, image)`` pair (HeadRouter's
                text-token routing). ``text_out`` is None after the last block.
        """
        cfg = self.config
        check_backend(backend)
        step, num_steps = check_steps(step, num_steps)
        check_tensor(latents, "latents", 4, shape_hint=f"[B, {cfg.in_channels}, H, W]")
        b, c, h, w = latents.shape
        if c != cfg.in_channels:
            raise ValueError(f"latents must have {cfg.in_channels} channels, got {c}")
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"latent height and width must be multiples of patch_size={cfg.patch_size}, got {h}x{w}")
        check_tensor(text, "text", 3, cfg.joint_attention_dim, f"[B, N_text, {cfg.joint_attention_dim}]")
        check_tensor(pooled, "pooled", 2, cfg.pooled_projection_dim, f"[B, {cfg.pooled_projection_dim}]")
        if text.shape[0] != b or pooled.shape[0] != b:
            raise ValueError(f"batch sizes differ: latents {b}, text {text.shape[0]}, pooled {pooled.shape[0]}")

        dtype = self.dtype
        image = self.pos_embed(latents.to(dtype))
        pooled = pooled.to(dtype)
        temb = self.time_text_embed(as_batch_vector(t, b, "t", latents.device) * 1000, pooled)
        text = self.context_embedder(text.to(dtype))
        sites = self._sites(text.shape[1], image.shape[1], step, num_steps) if policy is not None else None

        layer = 0
        for i, block in enumerate(self.transformer_blocks):
            calls = 2 if block.dual_attention else 1
            block_sites = sites[layer:layer + calls] if sites is not None else (None, None)
            layer += calls
            text_in, image_in = text, image
            text, image = block(image, text, temb, sites=block_sites, policy=policy, backend=backend)
            if block_hook is not None:
                replaced = block_hook("joint", i, (text_in, image_in), (text, image))
                if replaced is not None:
                    text, image = replaced

        out = self.proj_out(self.norm_out(image, temb))
        p, co = cfg.patch_size, cfg.out_channels
        out = out.view(b, h // p, w // p, p, p, co)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(b, co, h, w)
