"""From attention maps to region masks, and masks to pictures.

IID (METHODS.md, IID step 3) turns per-head, per-instruction maps into one binary region
per instruction: head-wise ReLU differencing, head mean, Gaussian smoothing on the latent
grid, then a threshold (Otsu by default). HeadRouter's key regions (step 4) use a
min-max normalization and a fixed threshold. Everything here is plain tensor math on
small ``[..., N_img]`` maps (never on ``N x N`` attention), so it runs on any device.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

THRESHOLD_RULES = ("otsu", "fixed", "top")
# The values each rule accepts (Otsu takes none); binarize, IIDConfig and the CLI all check against these.
THRESHOLD_VALUE_RANGES = {"fixed": "[0, 1] (on the min-max normalized map)", "top": "(0, 1] (a fraction of tokens)"}

# Distinct overlay colours (RGB), one per instruction / token; cycled when there are more.
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60))


# --------------------------------------------------------------------------- IID maps
def disentangle_heads(maps: torch.Tensor) -> torch.Tensor:
    """Head-wise ReLU differencing (IID step 3) of ``[..., H, N_img, N]`` maps.

    ``M_i^j = max(0, A_i^j - 1/(N-1) * sum_{k != i} A_k^j)`` for instruction ``i`` (last dim)
    and head ``j``; with one instruction the map is returned unchanged. The ReLU is per head,
    so it must run before the head mean.
    """
    if maps.dim() < 3:
        raise ValueError(f"disentangle_heads: maps must have shape [..., H, N_img, N_instr], got {tuple(maps.shape)}")
    n = maps.shape[-1]
    if n == 1:
        return maps
    others = (maps.sum(-1, keepdim=True) - maps) / (n - 1)
    return torch.relu(maps - others)


def gaussian_kernel1d(sigma: float, kernel_size: Optional[int] = None, device=None) -> torch.Tensor:
    """Normalized 1-D Gaussian; ``kernel_size`` defaults to the odd size covering +-3 sigma."""
    if sigma <= 0:
        raise ValueError(f"gaussian_kernel1d: sigma must be > 0, got {sigma}")
    if kernel_size is None:
        kernel_size = 2 * int(math.ceil(3 * sigma)) + 1
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"gaussian_kernel1d: kernel_size must be a positive odd int, got {kernel_size}")
    # In float64 on the CPU (a few taps): a sigma below float32's smallest subnormal would round
    # to 0 in float32 (0 / 0 = NaN at the centre tap); in float64 that Gaussian is the identity
    # kernel it tends to.
    x = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(device=device, dtype=torch.float32)


def _pad_symmetric(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Half-sample symmetric padding (``c b a | a b c``, scipy's "reflect") along ``dim``.

    Unlike ``F.pad(mode="reflect")`` (``c b | a b c``) it does not count the edge row twice
    toward its inner neighbour, so a region's border is not pulled onto the image edge.
    """
    n = x.shape[dim]
    if r == 0:
        return x
    if r > n:  # a kernel wider than the grid: the mirrored extension repeats with period 2n
        j = torch.arange(-r, n + r, device=x.device) % (2 * n)
        return x.index_select(dim, torch.where(j < n, j, 2 * n - 1 - j))
    head = x.narrow(dim, 0, r).flip(dim)
    tail = x.narrow(dim, n - r, r).flip(dim)
    return torch.cat([head, x, tail], dim=dim)


def gaussian_smooth(maps: torch.Tensor, grid: Tuple[int, int], sigma: float = 1.0,
                    kernel_size: Optional[int] = None) -> torch.Tensor:
    """Separable Gaussian blur of ``[..., h*w]`` maps on the ``(h, w)`` latent grid.

    Borders are mirrored (half-sample symmetric, also where the kernel is wider than the grid),
    so a constant map stays constant, a map's sum is kept, and a region touching the edge keeps
    its edge value. ``sigma <= 0`` returns the maps as they are.
    """
    h, w = grid
    if maps.shape[-1] != h * w:
        raise ValueError(f"gaussian_smooth: maps have {maps.shape[-1]} tokens, grid {grid} has {h * w}")
    if sigma <= 0:
        return maps
    lead = maps.shape[:-1]
    x = maps.reshape(-1, 1, h, w).float()
    k = gaussian_kernel1d(sigma, kernel_size, device=maps.device)
    r = k.numel() // 2
    x = F.conv2d(_pad_symmetric(x, r, 3), k.view(1, 1, 1, -1))
    x = F.conv2d(_pad_symmetric(x, r, 2), k.view(1, 1, -1, 1))
    return x.reshape(*lead, h * w)


def minmax_normalize(maps: torch.Tensor) -> torch.Tensor:
    """Scale every map (last dim) to ``[0, 1]``, in the maps' dtype (float32 for integer maps);
    a constant map becomes all zeros."""
    return _normalized64(maps).to(maps.dtype if maps.is_floating_point() else torch.float32)


def _normalized64(maps: torch.Tensor) -> torch.Tensor:
    """:func:`minmax_normalize` in float64: the spread of float32 maps can overflow float32
    (-3e38 and 3e38), and a threshold compared in float64 is not rounded to the maps' dtype
    (a "fixed" threshold of 1e-9 would round to 0 in fp16 and take a constant map's zeros)."""
    x = maps.double()
    lo = x.min(-1, keepdim=True).values
    span = x.max(-1, keepdim=True).values - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(x))


# A smoothing width far past any latent grid (a 4096-pixel side is 256 tokens): the kernel has
# 6 sigma + 1 taps, so a typo such as 1e9 would otherwise allocate gigabytes at step S.
SIGMA_MAX = 1000.0


def sigma_problem(sigma: float) -> Optional[str]:
    """Why ``sigma`` is no smoothing width (None when it is one; 0 means no smoothing):
    IIDConfig and the CLI check it, as NaN or inf would reach the kernel size."""
    if math.isfinite(sigma) and 0 <= sigma <= SIGMA_MAX:
        return None
    return f"must be a finite number in [0, {SIGMA_MAX:g}] latent tokens (0: no smoothing), got {sigma}"


def threshold_value_problem(rule: str, value: float) -> Optional[str]:
    """Why ``value`` does not suit threshold ``rule`` (None when it does; Otsu ignores it)."""
    if rule not in THRESHOLD_VALUE_RANGES:
        return None
    ok = 0.0 <= value <= 1.0 if rule == "fixed" else 0.0 < value <= 1.0  # NaN fails both
    return None if ok else f"rule {rule!r} takes a value in {THRESHOLD_VALUE_RANGES[rule]}, got {value}"


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Otsu's threshold of each map (last dim), maximizing the between-class variance.

    Returns ``[...]`` thresholds in the maps' units and (floating) dtype; a map is foreground
    where ``>= t``, which keeps the histogram's two classes however small the spread.
    A constant map has no two classes to split: its threshold is ``+inf`` (no foreground),
    whatever the constant, so an all-zero and an all-0.7 map give the same empty mask.
    """
    lead = values.shape[:-1]
    # Binned in float64: the spread of float32 maps can overflow float32 (-3e38 and 3e38), and
    # float64 maps keep a spread below float32's step.
    x = values.reshape(-1, values.shape[-1]).double()
    lo = x.min(-1, keepdim=True).values
    hi = x.max(-1, keepdim=True).values
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))  # any spread, however small (a constant: below)
    idx = ((x - lo) / span * bins).long().clamp_(0, bins - 1)
    hist = torch.zeros(x.shape[0], bins, device=x.device).scatter_add_(1, idx, torch.ones_like(x, dtype=torch.float32))
    p = hist / hist.sum(-1, keepdim=True)
    centers = (torch.arange(bins, device=x.device, dtype=torch.float32) + 0.5) / bins
    w0 = p.cumsum(-1)
    m0 = (p * centers).cumsum(-1)
    mt = m0[:, -1:]
    w1 = 1 - w0
    between = (mt * w0 - m0) ** 2 / (w0 * w1).clamp_min(1e-12)
    between = torch.where((w0 > 0) & (w1 > 0), between, torch.full_like(between, -1.0))
    k = between.argmax(-1, keepdim=True)  # split after bin k
    t = lo + (k.to(x.dtype) + 1) / bins * span
    # The split in map units must keep the histogram's classes: where the spread is tiny beside
    # the values (0.5 and 0.5 + 2^-23), lo + a fraction of it rounds back to lo, and `>= t`
    # would take every token. So t, in the maps' own dtype (a 0-dim float32 t would be rounded
    # to a half map's dtype by the comparison), lies above the largest background value and at
    # most the smallest foreground one; both are map values, exact in that dtype.
    out_dtype = values.dtype if values.is_floating_point() else torch.float32
    foreground = idx > k
    top_background = torch.where(foreground, -float("inf"), x).max(-1, keepdim=True).values.to(out_dtype)
    low_foreground = torch.where(foreground, x, float("inf")).min(-1, keepdim=True).values.to(out_dtype)
    above_background = torch.nextafter(top_background, torch.full_like(top_background, float("inf")))
    t = torch.minimum(torch.maximum(t.to(out_dtype), above_background), low_foreground)
    # A constant map: one class, whatever the constant (0 and 0.7 alike), so no foreground.
    t = torch.where(hi > lo, t, torch.full_like(t, float("inf")))
    return t.reshape(lead)


def binarize(maps: torch.Tensor, rule: str = "otsu", value: float = 0.5) -> torch.Tensor:
    """Binary masks from soft maps (last dim = tokens).

    ``rule``: ``"otsu"`` (Otsu per map; a constant map has no foreground), ``"fixed"``
    (``value`` in [0, 1] on the min-max normalized map, e.g. HeadRouter's 0.2; a constant
    map normalizes to zeros), ``"top"`` (the ``value`` fraction in (0, 1] of tokens with the
    highest score, ties broken by order).
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"binarize: rule must be one of {THRESHOLD_RULES}, got {rule!r}")
    problem = threshold_value_problem(rule, value)
    if problem is not None:
        raise ValueError(f"binarize: {problem}")
    if rule == "otsu":
        return maps >= otsu_threshold(maps).unsqueeze(-1)
    if rule == "fixed":
        return _normalized64(maps) >= value
    n = maps.shape[-1]
    keep = max(1, int(round(value * n)))
    order = maps.argsort(dim=-1, descending=True, stable=True)  # ties: the earlier token first
    out = torch.zeros_like(maps, dtype=torch.bool)
    return out.scatter_(-1, order[..., :keep], True)


def iid_masks(per_head_maps: torch.Tensor, grid: Tuple[int, int], *, sigma: float = 1.0,
              kernel_size: Optional[int] = None, threshold: str = "otsu",
              threshold_value: float = 0.5) -> Tuple[torch.Tensor, torch.Tensor]:
    """IID step 3 end to end: ``[H, N_img, N]`` per-head maps -> ``(masks, soft)``.

    ``masks``: bool ``[N, N_img]`` (overlaps allowed); ``soft``: the smoothed head-mean
    maps ``[N, N_img]`` the masks were thresholded from (for pictures and debugging).
    A leading batch dim (``[B, H, N_img, N]``) is kept: ``[B, N, N_img]``.
    """
    if per_head_maps.dim() not in (3, 4):
        raise ValueError(f"iid_masks: per_head_maps must be [H, N_img, N] or [B, H, N_img, N], "
                         f"got {tuple(per_head_maps.shape)}")
    diff = disentangle_heads(per_head_maps.float())
    mean = diff.mean(-3).transpose(-1, -2)  # [..., N, N_img]
    soft = gaussian_smooth(mean, grid, sigma, kernel_size)
    return binarize(soft, threshold, threshold_value), soft


def key_region_masks(maps: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """HeadRouter key regions (step 4): ``[..., N_img]`` head-summed maps of text tokens ->
    min-max normalize per token -> ``>= threshold``."""
    return binarize(maps, "fixed", threshold)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    a, b = a.bool(), b.bool()
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


# --------------------------------------------------------------------------- pictures
def mask_to_image(mask: torch.Tensor, grid: Tuple[int, int], size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """A ``[h*w]`` mask or soft map as a uint8 grey picture ``[H, W]`` (nearest upsampling to ``size=(W, H)``)."""
    h, w = grid
    m = mask.detach().float().reshape(1, 1, h, w).cpu()
    if mask.dtype != torch.bool:
        m = minmax_normalize(m.reshape(1, -1)).reshape(1, 1, h, w)
    if size is not None:
        m = F.interpolate(m, size=(size[1], size[0]), mode="nearest")
    return (m[0, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def overlay_masks(image: np.ndarray, masks: torch.Tensor, grid: Tuple[int, int], alpha: float = 0.45,
                  colors: Sequence[Tuple[int, int, int]] = PALETTE) -> np.ndarray:
    """Tint ``image`` (uint8 ``[H, W, 3]``) with one colour per mask (``[N, h*w]`` bool).

    Overlapping masks mix their colours; outside every mask the picture is unchanged.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"overlay_masks: image must be uint8 [H, W, 3], got shape {image.shape}")
    height, width = image.shape[:2]
    out = image.astype(np.float32)
    tint = np.zeros_like(out)
    count = np.zeros((height, width, 1), dtype=np.float32)
    for i, m in enumerate(masks):
        up = mask_to_image(m.bool(), grid, (width, height)).astype(np.float32)[..., None] / 255.0
        tint += up * np.array(colors[i % len(colors)], dtype=np.float32)
        count += up
    covered = count > 0
    mixed = tint / np.maximum(count, 1)
    out = np.where(covered, (1 - alpha) * out + alpha * mixed, out)
    return out.clip(0, 255).round().astype(np.uint8)
