"""Pictures <-> latents: image files, a VAE codec, and a deterministic stand-in for tiny models.

* :class:`VaeCodec` wraps a local diffusers ``AutoencoderKL`` (scaling/shift factors
  applied by :func:`iidkern.mmdit.encode_image` / :func:`~iidkern.mmdit.decode_latents`).
* :class:`PixelCodec` is the tiny model's "VAE": average-pool the picture by ``factor``
  and spread RGB over the latent channels with a fixed orthonormal 3 x C map (decode is the
  transpose, then bilinear upsampling). It is exact on smooth pictures, needs no weights,
  and lets a tiny random model round-trip real image files.

Images are ``[B, 3, H, W]`` float tensors in ``[-1, 1]``.
"""
from __future__ import annotations

import os
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

SIZE_MULTIPLE = 16  # Flux: VAE factor 8 x 2x2 token packing


def load_image(path, size: int = 0, multiple: int = SIZE_MULTIPLE) -> torch.Tensor:
    """A picture file as ``[1, 3, H, W]`` in ``[-1, 1]``.

    ``size``: resize so the longer side is ``size`` (0 = keep); both sides are then rounded
    down to a multiple of ``multiple`` (at least one multiple).
    """
    from PIL import Image

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path!r}")
    img = Image.open(path).convert("RGB")
    w, h = img.size
    if size:
        s = size / max(w, h)
        w, h = max(1, round(w * s)), max(1, round(h * s))
    w, h = max(multiple, w // multiple * multiple), max(multiple, h // multiple * multiple)
    if (w, h) != img.size:
        img = img.resize((w, h), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return (arr / 127.5 - 1.0)[None]


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` or ``[1, 3, H, W]`` in ``[-1, 1]`` -> uint8 ``[H, W, 3]``."""
    if image.dim() == 4:
        image = image[0]
    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return arr.permute(1, 2, 0).numpy()


def save_png(array: np.ndarray, path) -> str:
    """Write a uint8 ``[H, W]`` or ``[H, W, 3]`` array as a PNG; returns the path."""
    from PIL import Image

    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    return path


def demo_picture(size: int = 128) -> torch.Tensor:
    """A synthetic test picture (sky gradient, a sun, a hill and a house), ``[1, 3, size, size]``."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([0.35 + 0.3 * y, 0.55 + 0.25 * y, 0.95 - 0.2 * y])  # sky
    sun = ((x - 0.78) ** 2 + (y - 0.22) ** 2) < 0.012
    hill = y > 0.72 - 0.12 * torch.sin(3.1 * x)
    house = (x > 0.18) & (x < 0.42) & (y > 0.5) & (y < 0.78)
    roof = (y <= 0.5) & (y > 0.36) & ((y - 0.36) > 0.6 * (x - 0.30).abs() - 0.02) & (x > 0.15) & (x < 0.45)
    for mask, colour in ((sun, (1.0, 0.85, 0.2)), (hill, (0.25, 0.6, 0.25)), (house, (0.85, 0.8, 0.7)),
                         (roof, (0.65, 0.2, 0.15))):
        img = torch.where(mask, torch.tensor(colour)[:, None, None], img)
    return (img * 2 - 1)[None]


class PixelCodec:
    """Deterministic pooled-RGB latents for tiny models (see the module doc)."""

    def __init__(self, latent_channels: int, factor: int = 8, seed: int = 0):
        if latent_channels < 3:
            raise ValueError(f"PixelCodec: latent_channels must be >= 3 to hold RGB, got {latent_channels}")
        g = torch.Generator("cpu").manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(latent_channels, 3, generator=g))
        self.basis = q  # [C, 3], orthonormal columns
        self.factor = int(factor)
        self.latent_channels = int(latent_channels)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        small = F.avg_pool2d(image.float(), self.factor)
        return torch.einsum("cr,brhw->bchw", self.basis.to(small.device), small)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        rgb = torch.einsum("cr,bchw->brhw", self.basis.to(latents.device), latents.float())
        return F.interpolate(rgb, scale_factor=self.factor, mode="bilinear", align_corners=False).clamp(-1, 1)


class VaeCodec:
    """A local diffusers AutoencoderKL behind the codec interface."""

    def __init__(self, vae):
        self.vae = vae
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(vae.config.latent_channels)

    @classmethod
    def from_pretrained(cls, root, *, device="cpu", dtype=torch.float32) -> "VaeCodec":
        from ..mmdit.encoders import load_vae

        return cls(load_vae(root, device=device, dtype=dtype))

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        from ..mmdit.encoders import encode_image

        return encode_image(self.vae, image)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        from ..mmdit.encoders import decode_latents

        return decode_latents(self.vae, latents)


def latent_grid(image_hw: Tuple[int, int], factor: int) -> Tuple[int, int]:
    """Latent height/width of a picture."""
    return image_hw[0] // factor, image_hw[1] // factor
