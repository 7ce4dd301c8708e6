"""Flux-family MM-DiT (FLUX.1 dev / schnell / Kontext / Control / Fill) written out, attention through iidkern.

Structure: ``num_layers`` double-stream blocks (text and image keep separate weights and
meet in joint attention, like SD3) then ``num_single_layers`` single-stream blocks (one
weight set over the concatenated sequence, attention and MLP in parallel). Positions are
3-axis RoPE over integer ids ``(index, row, col)``; text tokens have id 0.

Layouts this runner supports without a fork:

* **text-to-image** (dev / schnell): ``x`` is the packed noisy latent, ``[B, N, 64]``.
* **channel concat** (FluxEdit, Flux-Control, Fill): the source/control latents are
  packed and concatenated to ``x`` on the channel axis, so ``in_channels`` is 128 (or 384)
  while ``out_channels`` stays 64. Build the config with ``FluxConfig.dev(in_channels=128,
  out_channels=64)``.
* **Kontext** (source image tokens appended): pass ``source`` ``[B, N_src, in_channels]``
  and ``source_ids``; the sequence is ``[text; image; source]``, the output keeps only the
  image tokens, and attention sites carry the source range as ``extra=(("source", (a, b)),)``.

Parameter names equal diffusers' ``FluxTransformer2DModel`` keys; the original BFL layout
is converted by :mod:`iidkern.mmdit.loading`. The model takes the flow time ``t`` in
``[0, 1]`` and the guidance scale as is (e.g. 3.5); both are multiplied by 1000 inside,
after a cast to the model dtype (as diffusers and BFL do).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..policy import AttentionPolicy, AttentionSite, check_steps
from .layers import (ContinuousAdaNorm, FeedForward, JointAttention, Modulation, TimeTextEmbedding, as_batch_vector,
                     check_backend, check_tensor, config_from_dict, layer_norm, modulate, read_config_json)

BlockHook = Callable[[str, int, Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]],
                     Optional[Tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class FluxConfig:
    """Hyper-parameters, named as in diffusers' ``FluxTransformer2DModel`` config."""

    in_channels: int = 64
    out_channels: Optional[int] = None  # defaults to in_channels
    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: Tuple[int, int, int] = (16, 56, 56)
    patch_size: int = 1  # diffusers' field; packing is done outside the model, so it must stay 1

    def __post_init__(self):
        self.axes_dims_rope = tuple(int(a) for a in self.axes_dims_rope)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(a % 2 for a in self.axes_dims_rope):
            raise ValueError(f"FluxConfig.axes_dims_rope {self.axes_dims_rope} must be even and sum to "
                             f"attention_head_dim={self.attention_head_dim}")
        if self.patch_size != 1:
            raise ValueError(f"FluxConfig.patch_size must be 1 (latents are packed outside), got {self.patch_size}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    # ------------------------------------------------------------------ real models
    @classmethod
    def dev(cls, num_double: int = 19, num_single: int = 38, **overrides) -> "FluxConfig":
        """black-forest-labs/FLUX.1-dev (also Kontext-dev; guidance-distilled). Fewer blocks for benchmarks:
        ``FluxConfig.dev(num_double=2, num_single=2)`` keeps every real dimension."""
        return cls(**{**dict(num_layers=num_double, num_single_layers=num_single, guidance_embeds=True), **overrides})

    @classmethod
    def schnell(cls, num_double: int = 19, num_single: int = 38, **overrides) -> "FluxConfig":
        """black-forest-labs/FLUX.1-schnell (timestep-distilled, no guidance embedding)."""
        return cls(**{**dict(num_layers=num_double, num_single_layers=num_single, guidance_embeds=False),
                      **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "FluxConfig":
        """A tiny model for tests: 2 heads x 16 (RoPE axes 4+6+6), 1 double + 1 single block."""
        base = dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                    joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
        base.update(overrides)
        return cls(**base)

    # ------------------------------------------------------------------ diffusers' config.json
    @classmethod
    def from_dict(cls, config: dict) -> "FluxConfig":
        """From a diffusers config dict (other keys are ignored). Another model's config
        (``_class_name``) or a field of the wrong type is a ValueError naming it."""
        return config_from_dict(cls, config, ("FluxTransformer2DModel",))

    @classmethod
    def from_json(cls, path: str) -> "FluxConfig":
        return cls.from_dict(read_config_json(path, "FluxConfig.from_json"))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return d


# ---------------------------------------------------------------------- latents, ids, RoPE
def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/2)(W/2), 4C]`` (2x2 patches, channel order (c, dy, dx), as Flux)."""
    check_tensor(latents, "latents", 4, shape_hint="[B, C, H, W]")
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux latents need an even height and width, got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent of ``height x width`` (not the token grid)."""
    b, n, c4 = tokens.shape
    if n != (height // 2) * (width // 2):
        raise ValueError(f"{n} tokens do not fill a {height}x{width} latent ({(height // 2) * (width // 2)} expected)")
    x = tokens.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def image_ids(rows: int, cols: int, *, index: int = 0, offset: Tuple[int, int] = (0, 0), device=None) -> torch.Tensor:
    """Position ids ``[rows*cols, 3]`` = ``(index, row + offset[0], col + offset[1])`` of a token grid.

    ``index`` 0 is the generated image; Kontext gives its source image ``index=1``.
    """
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(rows, device=device)[:, None] + offset[0]
    ids[..., 2] = torch.arange(cols, device=device)[None, :] + offset[1]
    return ids.reshape(rows * cols, 3)


def text_ids(num_text: int, device=None) -> torch.Tensor:
    """Text tokens all sit at position (0, 0, 0)."""
    return torch.zeros(num_text, 3, device=device)


def rope_tables(ids: torch.Tensor, axes_dims: Sequence[int], theta: float = 10000.0):
    """``(cos, sin)`` ``[N, head_dim]`` float32 for ids ``[N, 3]``; each frequency repeated for its pair.

    Angles are computed in float64 (as BFL and diffusers do on CUDA/CPU) before the cast.
    """
    cos, sin = [], []
    pos = ids.to(torch.float64)
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles = torch.outer(pos[:, axis], freqs)
        cos.append(angles.cos().repeat_interleave(2, dim=1))
        sin.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos, dim=-1).float(), torch.cat(sin, dim=-1).float()


# ---------------------------------------------------------------------- blocks
class DoubleBlock(nn.Module):
    """Double-stream block: per-stream adaLN-Zero and MLP, one joint attention over ``[text; image(; source)]``."""

    def __init__(self, config: FluxConfig):
        super().__init__()
        dim = config.inner_dim
        self.norm1 = Modulation(dim, 6)
        self.norm1_context = Modulation(dim, 6)
        self.attn = JointAttention(dim, config.num_attention_heads, config.attention_head_dim, qk_norm=True, text=True)
        self.ff = FeedForward(dim)
        self.ff_context = FeedForward(dim)

    def forward(self, image, text, temb, rope, *, site, policy, backend):
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb)
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
        image_attn, text_attn = self.attn(modulate(layer_norm(image), shift, scale),
                                          modulate(layer_norm(text), c_shift, c_scale),
                                          site=site, policy=policy, backend=backend, rope=rope)
        image = image + gate[:, None] * image_attn
        image = image + gate_mlp[:, None] * self.ff(modulate(layer_norm(image), shift_mlp, scale_mlp))
        text = text + c_gate[:, None] * text_attn
        text = text + c_gate_mlp[:, None] * self.ff_context(modulate(layer_norm(text), c_shift_mlp, c_scale_mlp))
        if text.dtype == torch.float16:  # as diffusers: keep fp16 residuals finite
            text = text.clip(-65504, 65504)
        return text, image


class SingleBlock(nn.Module):
    """Single-stream block: one adaLN-Zero, attention and a GELU MLP in parallel, one output projection."""

    def __init__(self, config: FluxConfig, mlp_ratio: float = 4.0):
        super().__init__()
        dim = config.inner_dim
        self.mlp_hidden_dim = int(dim * mlp_ratio)
        self.norm = Modulation(dim, 3)
        self.proj_mlp = nn.Linear(dim, self.mlp_hidden_dim)
        self.attn = JointAttention(dim, config.num_attention_heads, config.attention_head_dim, qk_norm=True,
                                   image_out=False)
        self.proj_out = nn.Linear(dim + self.mlp_hidden_dim, dim)

    def forward(self, sequence, temb, rope, *, site, policy, backend):
        shift, scale, gate = self.norm(temb)
        normed = modulate(layer_norm(sequence), shift, scale)
        mlp = F.gelu(self.proj_mlp(normed), approximate="tanh")
        attn, _ = self.attn(normed, None, site=site, policy=policy, backend=backend, rope=rope)
        sequence = sequence + gate[:, None] * self.proj_out(torch.cat([attn, mlp], dim=2))
        if sequence.dtype == torch.float16:
            sequence = sequence.clip(-65504, 65504)
        return sequence


class FluxTransformer(nn.Module):
    """The Flux denoiser. ``forward`` returns the velocity of the image tokens ``[B, N_img, out_channels]``.

    Attention sites: ``"double"`` blocks ``0..num_layers-1`` then ``"single"`` blocks
    ``0..num_single_layers-1``; ``site.layer`` runs over both (``num_layers`` = their sum),
    so "the penultimate block" is ``site.layer == site.num_layers - 2``.
    """

    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        self.time_text_embed = TimeTextEmbedding(dim, config.pooled_projection_dim, guidance=config.guidance_embeds)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(config.in_channels, dim)
        self.transformer_blocks = nn.ModuleList([DoubleBlock(config) for _ in range(config.num_layers)])
        self.single_transformer_blocks = nn.ModuleList([SingleBlock(config) for _ in range(config.num_single_layers)])
        self.norm_out = ContinuousAdaNorm(dim)
        self.proj_out = nn.Linear(dim, config.out_channels)

    @property
    def num_attention_layers(self) -> int:
        return self.config.num_layers + self.config.num_single_layers

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    @classmethod
    def random(cls, config: FluxConfig, *, seed: int = 0, device=None, dtype=torch.float32) -> "FluxTransformer":
        """A randomly initialised model built directly on ``device`` (tests; the GPU benchmark uses
        ``FluxTransformer.random(FluxConfig.dev(num_double=2, num_single=2), device="cuda", dtype=torch.bfloat16)``)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.device(device or "cpu"):
                model = cls(config)
        return model.to(dtype=dtype).eval()

    def _site(self, kind, block, ranges, step, num_steps):
        text, image, source = ranges
        layer = block if kind == "double" else self.config.num_layers + block
        return AttentionSite(block=block, block_kind=kind, text=text, image=image, step=step, num_steps=num_steps,
                             layer=layer, num_layers=self.num_attention_layers,
                             extra=(("source", source),) if source is not None else ())

    def forward(self, x: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor, t, *,
                img_ids: torch.Tensor, txt_ids: Optional[torch.Tensor] = None, guidance=None,
                source: Optional[torch.Tensor] = None, source_ids: Optional[torch.Tensor] = None,
                policy: Optional[AttentionPolicy] = None, step: Optional[int] = None,
                num_steps: Optional[int] = None, backend: str = "auto",
                block_hook: Optional[BlockHook] = None) -> torch.Tensor:
        """Velocity of the packed image tokens.

        Args:
            x: ``[B, N_img, in_channels]`` packed latents (with channel-concatenated source
                latents for FluxEdit / Control).
            text: ``[B, N_text, joint_attention_dim]`` T5 embeddings; ``pooled``: ``[B, 768]`` CLIP.
            t: flow time in ``[0, 1]``, a real number (Python or numpy scalar, 0-d tensor) or ``[B]``.
            img_ids: ``[N_img, 3]`` (see :func:`image_ids`); ``txt_ids`` defaults to zeros.
            guidance: guidance scale (a real number or ``[B]``) for guidance-distilled models; required
                iff ``config.guidance_embeds``.
            source, source_ids: Kontext source tokens ``[B, N_src, in_channels]`` and their ids.
            policy, step, num_steps, backend: see :class:`iidkern.policy.AttentionSite`; ``backend="sdpa"``
                is a no-policy baseline.
            block_hook: ``block_hook(kind, index, (text_in, image_in), (text_out, image_out))``
                after each block (``kind`` "double" or "single"; image includes source tokens);
                may return a replacement ``(text, image)``.
        """
        cfg = self.config
        check_backend(backend)
        step, num_steps = check_steps(step, num_steps)
        check_tensor(x, "x", 3, cfg.in_channels, f"[B, N_img, {cfg.in_channels}]")
        b, num_image = x.shape[:2]
        check_tensor(text, "text", 3, cfg.joint_attention_dim, f"[B, N_text, {cfg.joint_attention_dim}]")
        check_tensor(pooled, "pooled", 2, cfg.pooled_projection_dim, f"[B, {cfg.pooled_projection_dim}]")
        if text.shape[0] != b or pooled.shape[0] != b:
            raise ValueError(f"batch sizes differ: x {b}, text {text.shape[0]}, pooled {pooled.shape[0]}")
        num_text = text.shape[1]
        txt_ids = text_ids(num_text, x.device) if txt_ids is None else txt_ids
        check_tensor(img_ids, "img_ids", 2, 3, f"[{num_image}, 3]")
        check_tensor(txt_ids, "txt_ids", 2, 3, f"[{num_text}, 3]")
        if img_ids.shape[0] != num_image or txt_ids.shape[0] != num_text:
            raise ValueError(f"img_ids / txt_ids must have {num_image} / {num_text} rows, got "
                             f"{img_ids.shape[0]} / {txt_ids.shape[0]}")
        if cfg.guidance_embeds and guidance is None:
            raise ValueError("this Flux model embeds a guidance scale (guidance_embeds=True): pass guidance=, e.g. 3.5")
        if not cfg.guidance_embeds and guidance is not None:
            raise ValueError("this Flux model has no guidance embedding (guidance_embeds=False): pass guidance=None")
        if (source is None) != (source_ids is None):
            raise ValueError("source and source_ids go together (Kontext layout): pass both or neither")

        dtype = self.dtype
        ids = [txt_ids, img_ids]
        tokens = x.to(dtype)
        source_range = None
        if source is not None:
            check_tensor(source, "source", 3, cfg.in_channels, f"[B, N_src, {cfg.in_channels}]")
            check_tensor(source_ids, "source_ids", 2, 3, f"[{source.shape[1]}, 3]")
            if source.shape[0] != b or source_ids.shape[0] != source.shape[1]:
                raise ValueError(f"source must be [{b}, N_src, C] with N_src rows of source_ids, got "
                                 f"{tuple(source.shape)} and {tuple(source_ids.shape)}")
            tokens = torch.cat([tokens, source.to(dtype)], dim=1)
            ids.append(source_ids)
            start = num_text + num_image
            source_range = (start, start + source.shape[1])
        image = self.x_embedder(tokens)

        # Like diffusers and BFL: the scalars are rounded to the model dtype before the x1000.
        t = as_batch_vector(t, b, "t", x.device).to(dtype) * 1000
        g = as_batch_vector(guidance, b, "guidance", x.device).to(dtype) * 1000 if guidance is not None else None
        temb = self.time_text_embed(t, pooled.to(dtype), g)
        text = self.context_embedder(text.to(dtype))
        rope = rope_tables(torch.cat(ids, dim=0).to(x.device), cfg.axes_dims_rope)

        ranges = ((0, num_text), (num_text, num_text + num_image), source_range)
        for i, block in enumerate(self.transformer_blocks):
            site = self._site("double", i, ranges, step, num_steps) if policy is not None else None
            text_in, image_in = text, image
            text, image = block(image, text, temb, rope, site=site, policy=policy, backend=backend)
            if block_hook is not None:
                replaced = block_hook("double", i, (text_in, image_in), (text, image))
                if replaced is not None:
                    text, image = replaced

        sequence = torch.cat([text, image], dim=1)
        for i, block in enumerate(self.single_transformer_blocks):
            site = self._site("single", i, ranges, step, num_steps) if policy is not None else None
            before = sequence
            sequence = block(sequence, temb, rope, site=site, policy=policy, backend=backend)
            if block_hook is not None:
                replaced = block_hook("single", i, (before[:, :num_text], before[:, num_text:]),
                                      (sequence[:, :num_text], sequence[:, num_text:]))
                if replaced is not None:
                    sequence = torch.cat(replaced, dim=1)

        image = sequence[:, num_text:num_text + num_image]
        return self.proj_out(self.norm_out(image, temb))
