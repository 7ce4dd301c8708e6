"""Reference models for tests: tiny diffusers transformers with random weights, and their inputs.

Used by the runner's parity tests (and useful to the diffusers-backend tests): build
diffusers' ``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` from one of our configs,
seeded, with every norm weight perturbed away from 1 so that QK norms really matter.
diffusers is imported lazily; nothing is downloaded.
"""
from __future__ import annotations

from typing import Optional

import torch

from .flux import FluxConfig
from .sd3 import SD3Config


@torch.no_grad()
def _perturb_norms(model: torch.nn.Module, generator: torch.Generator, scale: float = 0.2) -> None:
    for name, param in model.named_parameters():
        if ".norm" in name:
            param.add_(scale * torch.randn(param.shape, generator=generator).to(param.dtype))


def diffusers_sd3(config: SD3Config, *, seed: int = 0, dtype=torch.float32):
    """diffusers' ``SD3Transformer2DModel`` with ``config``'s hyper-parameters and seeded random weights."""
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(**config.to_dict())
    _perturb_norms(model, torch.Generator().manual_seed(seed + 1))
    return model.to(dtype).eval()


def diffusers_flux(config: FluxConfig, *, seed: int = 0, dtype=torch.float32):
    """diffusers' ``FluxTransformer2DModel`` with ``config``'s hyper-parameters and seeded random weights."""
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(**config.to_dict())
    _perturb_norms(model, torch.Generator().manual_seed(seed + 1))
    return model.to(dtype).eval()


def sd3_inputs(config: SD3Config, batch: int = 2, rows: int = 6, cols: int = 10, num_text: int = 7,
               seed: int = 0, device=None):
    """``(latents, text, pooled, t)`` for a ``rows x cols`` token grid (latent ``rows*p x cols*p``)."""
    g = torch.Generator().manual_seed(seed)
    p = config.patch_size
    out = (torch.randn(batch, config.in_channels, rows * p, cols * p, generator=g),
           torch.randn(batch, num_text, config.joint_attention_dim, generator=g),
           torch.randn(batch, config.pooled_projection_dim, generator=g),
           torch.rand(batch, generator=g) * 0.9 + 0.05)
    return tuple(x.to(device) for x in out) if device is not None else out


def flux_inputs(config: FluxConfig, batch: int = 2, rows: int = 6, cols: int = 10, num_text: int = 7,
                seed: int = 0, device=None, num_source: Optional[int] = None):
    """``(x, text, pooled, t, guidance)`` (+ ``source`` when ``num_source``) for a ``rows x cols`` token grid."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(batch, rows * cols, config.in_channels, generator=g),
           torch.randn(batch, num_text, config.joint_attention_dim, generator=g),
           torch.randn(batch, config.pooled_projection_dim, generator=g),
           torch.rand(batch, generator=g) * 0.9 + 0.05,
           torch.rand(batch, generator=g) * 4 + 1]
    if num_source is not None:
        out.append(torch.randn(batch, num_source, config.in_channels, generator=g))
    return tuple(x.to(device) for x in out) if device is not None else tuple(out)
