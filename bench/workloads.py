"""What the benchmark computes: model shapes, random inputs, and the per-feature extras.

A *workload* is (shape, dtype, feature). The shape says where text and image tokens sit
(Flux puts text first, diffusers' SD3 processor puts image first); the feature says
which extras an attention call carries (probes, tag masks, head weights, a block
multiplier, branch-pair statistics). Every implementation of one workload gets the same
inputs and the same extras, so their times are comparable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

import iidkern
from iidkern import BlockMultiplier, Probe, TokenGroups

Range = Tuple[int, int]


@dataclass(frozen=True)
class Shape:
    """One joint text+image attention call of an MM-DiT, ``[B, H, N, D]`` with N = text + image."""

    name: str
    batch: int
    heads: int
    text: int
    image: int
    head_dim: int
    text_first: bool  # Flux: [text; image]; diffusers' SD3 processor: [image; text]

    @property
    def tokens(self) -> int:
        return self.text + self.image

    @property
    def text_range(self) -> Range:
        return (0, self.text) if self.text_first else (self.image, self.tokens)

    @property
    def image_range(self) -> Range:
        return (self.text, self.tokens) if self.text_first else (0, self.image)

    def flops(self) -> float:
        """Dense attention FLOPs (QK^T and PV, 2 each per multiply-add): 4*B*H*Nq*Nk*D."""
        return 4.0 * self.batch * self.heads * self.tokens * self.tokens * self.head_dim


def _flux(name: str, image: int, batch: int = 1) -> Shape:
    return Shape(name, batch, heads=24, text=512, image=image, head_dim=128, text_first=True)


def _sd3(name: str, image: int) -> Shape:
    # SD3's joint attention: 24 heads of 64, image tokens first, 333 text tokens (77 CLIP + 256 T5) last.
    return Shape(name, 1, heads=24, text=333, image=image, head_dim=64, text_first=False)


# Flux at 1024^2 has a 64x64 latent grid after 2x2 patching: 4096 image tokens; the other
# resolutions scale that by the pixel count. Flux edit doubles the image tokens (source +
# target latents in one sequence).
SHAPES: Dict[str, Shape] = {s.name: s for s in (
    _flux("flux_256", 256),
    _flux("flux_512", 1024),
    _flux("flux_1024", 4096),
    _flux("flux_edit", 8192),
    _flux("flux_2048", 16384),
    _sd3("sd3_256", 256),
    _sd3("sd3_512", 1024),
    _sd3("sd3_1024", 4096),
    _sd3("sd3_2048", 16384),
    _flux("flux_1024_b2", 4096, batch=2),  # two branches (HeadRouter: reconstruction + edit)
)}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Tag-mask features: (number of block-diagonal segments, or "iid" for IID's allow table).
# k equal segments, each attending only to itself, skip about 1 - 1/k of the tiles.
TAG_FEATURES = {"tags_0": 1, "tags_50": 2, "tags_75": 4, "tags_iid": "iid"}
FEATURES = ("plain", "probe", *TAG_FEATURES, "head_weights", "block_mult", "pair_stats")
NUM_INSTRUCTIONS = 3
TILE_ALIGN = 128  # segment boundaries on multiples of the largest tile edge, so "~50%" is ~50%


def split_range(rng: Range, parts: int, align: int = 1) -> List[Range]:
    """``parts`` consecutive sub-ranges covering ``rng``, inner boundaries rounded to ``align``."""
    lo, hi = rng
    align = align if hi - lo >= 4 * parts * align else 1  # short ranges: plain equal parts
    cuts = [lo] + [lo + int(round((hi - lo) * i / parts / align)) * align for i in range(1, parts)] + [hi]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def random_qkv(shape: Shape, dtype: torch.dtype, device, seed: int):
    """Random ``[B, H, N, D]`` q, k, v (never zeros: zeros hide bugs and run faster)."""
    g = torch.Generator(device=device).manual_seed(seed)
    size = (shape.batch, shape.heads, shape.tokens, shape.head_dim)
    return tuple(torch.randn(size, generator=g, device=device, dtype=torch.float32).to(dtype) for _ in range(3))


@dataclass
class Workload:
    """The extras of one (shape, dtype, feature); fields a feature does not use stay None."""

    shape: Shape
    dtype: torch.dtype
    feature: str
    device: torch.device
    q_tags: Optional[torch.Tensor] = None  # [B, N] int64
    k_tags: Optional[torch.Tensor] = None
    tag_mask: Optional[object] = None  # iidkern TagMask, built once and reused (tile lists cached)
    probes: tuple = ()
    instruction_ranges: List[Range] = field(default_factory=list)
    head_weights: Optional[torch.Tensor] = None  # [B, H] float32
    multiplier: Optional[BlockMultiplier] = None
    pairs: Optional[torch.Tensor] = None  # [P, 2] int64 (host)
    info: dict = field(default_factory=dict)  # numbers to report (sparsity, output sizes)

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.shape.head_dim)

    def iidkern_kwargs(self) -> dict:
        kw = {}
        if self.tag_mask is not None:
            kw["tags"] = self.tag_mask
        if self.probes:
            kw["probes"] = self.probes
        if self.head_weights is not None:
            kw["head_weights"] = self.head_weights
        if self.multiplier is not None:
            kw["block_multiplier"] = self.multiplier
        if self.pairs is not None:
            kw["pair_stats"] = self.pairs
        return kw

    def dense_mask(self) -> torch.Tensor:
        """``[B, 1, Nq, Nk]`` bool allow table (True = may attend), SDPA's convention."""
        return iidkern.allowed_pairs(self.q_tags, self.k_tags).unsqueeze(1)


def _segment_tags(shape: Shape, segments: int, device):
    """Block-diagonal tags: ``segments`` equal token ranges, each attending only to itself."""
    ranges = split_range((0, shape.tokens), segments, TILE_ALIGN)
    tags = iidkern.tags_from_segments(shape.tokens, [(a, b, 1 << i) for i, (a, b) in enumerate(ranges)],
                                      batch=shape.batch, device=device)
    return tags, tags.clone()


def _iid_tags(shape: Shape, device):
    """IID's allow table (METHODS.md step 5): 3 instructions tile the text; regions are 3
    bands of the image (30% each, the last 10% background, which sees no instruction)."""
    instructions = split_range(shape.text_range, NUM_INSTRUCTIONS)
    n_img = shape.image
    masks = torch.zeros(NUM_INSTRUCTIONS, n_img, dtype=torch.bool, device=device)
    for i in range(NUM_INSTRUCTIONS):
        masks[i, int(0.3 * i * n_img):int(0.3 * (i + 1) * n_img)] = True
    q_tags, k_tags = iidkern.instruction_tags(shape.tokens, image=shape.image_range, instructions=instructions,
                                              region_masks=masks.expand(shape.batch, -1, -1), device=device)
    return q_tags, k_tags


def kernel_tile_shape(shape: Shape, dtype: torch.dtype) -> Tuple[int, int]:
    """(BLOCK_M, BLOCK_N) the Triton kernel uses by default for this head dim and dtype."""
    from iidkern.kernels.launch import default_config

    cfg = default_config(shape.head_dim, dtype)
    return int(cfg["BLOCK_M"]), int(cfg["BLOCK_N"])


def tag_tile_shape(shape: Shape, dtype: torch.dtype, device) -> Tuple[int, int]:
    """The tile shape the tags of this shape are classified in by the kernel that serves the
    call: the Hopper kernel's (2 x 64 query rows x 128 keys) where it takes fp16/bf16 calls of
    this head dim and length, else the Triton kernel's default."""
    from iidkern.kernels import hopper_fwd

    if dtype in (torch.float16, torch.bfloat16) and hopper_fwd.on_hopper(torch.device(device)) and \
            hopper_fwd.serves_head_dim(shape.head_dim, shape.tokens):
        return hopper_fwd.tag_tile_shape()
    return kernel_tile_shape(shape, dtype)


def build_workload(shape: Shape, dtype: torch.dtype, feature: str, device, seed: int = 0) -> Workload:
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed + 1000)
    w = Workload(shape, dtype, feature, device)
    b, h, n = shape.batch, shape.heads, shape.tokens

    if feature in TAG_FEATURES:
        kind = TAG_FEATURES[feature]
        w.q_tags, w.k_tags = _iid_tags(shape, device) if kind == "iid" else _segment_tags(shape, kind, device)
        w.tag_mask = iidkern.tag_mask(w.q_tags, w.k_tags)
        bm, bn = tag_tile_shape(shape, dtype, device)
        w.info.update(tile_shape=[bm, bn], tile_sparsity=w.tag_mask.sparsity(bm, bn, b),
                      element_sparsity=1.0 - w.dense_mask().float().mean().item())
    elif feature == "probe":
        txt, img = shape.text_range, shape.image_range
        w.instruction_ranges = split_range(txt, NUM_INSTRUCTIONS)
        w.probes = (
            # IID: per head, per image token, mean attention to each instruction's tokens.
            Probe(TokenGroups.each(*img), TokenGroups.segments(w.instruction_ranges, n, device=device),
                  heads="keep", normalize="keys"),
            # Text x image head-mean map (HeadRouter's key regions, other direction).
            Probe(TokenGroups.each(*txt), TokenGroups.each(*img), heads="mean"),
        )
        w.info["probe_output_bytes"] = 4 * b * (h * shape.image * NUM_INSTRUCTIONS + shape.text * shape.image)
    elif feature == "head_weights":
        # HeadRouter's w_h = 1 + gamma * sigmoid(.), gamma = 0.2: weights in [1, 1.2].
        w.head_weights = 1.0 + 0.2 * torch.rand(b, h, generator=g, device=device)
    elif feature == "block_mult":
        # HeadRouter's DTR: alpha * sigmoid(.) on the image-query x text-key block, alpha = 2,
        # float32 as HeadRouterPolicy builds it (16-bit values round its weights away, NOTES.md 71).
        img, txt = shape.image_range, shape.text_range
        values = 2.0 * torch.rand(b, shape.image, shape.text, generator=g, device=device)
        w.multiplier = BlockMultiplier(values, query_start=img[0], key_start=txt[0])
    elif feature == "pair_stats":
        if b < 2:
            raise ValueError(f"pair_stats needs a shape with batch >= 2, got {shape.name} (B={b})")
        w.pairs = torch.tensor([[0, 1]], dtype=torch.int64)
    return w
