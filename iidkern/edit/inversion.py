"""RF-Inversion (Rout et al.), as HeadRouter uses it (METHODS.md, HeadRouter step 5).

Flow convention of :mod:`iidkern.mmdit.sampling`: ``x_t = (1 - t) x_0 + t * noise``, the
model predicts ``v = dx/dt = noise - x_0``, ``t = 1`` is noise and ``t = 0`` the image.
The papers write time the other way (``s = 1 - t``, image at ``s = 1``), so their
``v + eta * ((y0 - X)/(1 - s) - v)`` on the image-ward velocity reads, in our units,

* **editing** (``t``: 1 -> 0, target the source latents ``y0``):
  ``v_hat = v + eta * ((x - y0) / t - v)`` for steps in ``[start, stop)``;
* **inversion** (``t``: 0 -> 1, target a fixed noise sample ``y1``):
  ``v_hat = v + gamma * ((y1 - x) / (1 - t) - v)``.

Both are velocity hooks ``hook(step, t, x, v) -> v`` for :func:`iidkern.mmdit.sampling.sample`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import checks
from .rows import replace_rows

PAPER_STEPS = 28


@dataclass
class RFInversionConfig:
    """``gamma``: inversion controller (0.5); ``eta``: editing controller (0.9); the editing
    controller acts on steps ``[start, stop)`` (public: stop 6-9 of 28 steps). ``stop=None``
    scales the middle of that range (7/28) to the run's step count."""

    gamma: float = 0.5
    eta: float = 0.9
    start: int = 0
    stop: Optional[int] = None

    def __post_init__(self):
        for name in ("gamma", "eta"):
            value = checks.real(getattr(self, name), f"RFInversionConfig: {name}")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"RFInversionConfig: {name} must be in [0, 1], got {value}")
            setattr(self, name, value)
        self.start = checks.integer(self.start, "RFInversionConfig: start", 0)
        self.stop = checks.optional_integer(self.stop, "RFInversionConfig: stop", 0)
        if self.stop is not None and self.stop < self.start:  # as RFEditController: [start, stop), start <= stop
            raise ValueError(f"RFInversionConfig: stop must be >= start, got start={self.start}, stop={self.stop}")

    def resolved_stop(self, num_steps: int) -> int:
        if self.stop is not None:
            return int(self.stop)
        return max(1, int(round(7 / PAPER_STEPS * num_steps)))


class InversionController:
    """Velocity hook of the inversion ODE: pull toward the noise sample ``y1`` with strength ``gamma``."""

    def __init__(self, y1: torch.Tensor, gamma: float = 0.5, eps: float = 1e-4):
        self.y1, self.gamma, self.eps = y1.float(), float(gamma), eps

    def __call__(self, step: int, t: float, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.gamma == 0.0:
            return v
        target = (self.y1.to(x.device) - x) / max(1.0 - t, self.eps)
        return v + self.gamma * (target - v)


class RFEditController:
    """Velocity hook of the editing ODE: pull toward the source latents ``y0`` on ``[start, stop)``.

    ``rows``: the batch rows it applies to (``None`` = all; HeadRouter pulls both branches).
    """

    def __init__(self, y0: torch.Tensor, eta: float = 0.9, start: int = 0, stop: int = 7,
                 rows: Optional[Sequence[int]] = None, eps: float = 1e-4):
        if stop < start:
            raise ValueError(f"RFEditController: stop ({stop}) must be >= start ({start})")
        self.y0, self.eta, self.start, self.stop = y0.float(), float(eta), int(start), int(stop)
        self.rows, self.eps = rows, eps

    def __call__(self, step: int, t: float, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if step is None or not self.start <= step < self.stop or self.eta == 0.0:
            return v
        y0 = self.y0.to(x.device)
        target = (x - y0) / max(t, self.eps)
        hat = v + self.eta * (target - v)
        if self.rows is None:
            return hat
        return replace_rows(v, self.rows, hat)


def invert(denoiser, y0: torch.Tensor, sigmas: torch.Tensor, *, gamma: float = 0.5,
           y1: Optional[torch.Tensor] = None, seed: int = 0, progress: bool = False) -> torch.Tensor:
    """Run the controlled ODE from the source latents ``y0`` (t=0) to noise (t=1).

    ``sigmas``: the editing schedule (decreasing, 1 -> 0); it is flipped here so the
    inversion visits the same times. ``y1``: the noise target (default: seeded Gaussian).
    Returns the inverted latents, the starting point of the editing run.
    """
    from ..mmdit.sampling import initial_noise, inversion_sigmas, sample

    if y1 is None:
        y1 = initial_noise(tuple(y0.shape), seed=seed, device=y0.device)
    hook = InversionController(y1, gamma)
    return sample(denoiser, y0, inversion_sigmas(torch.as_tensor(sigmas)), velocity_hook=hook,
                  progress=progress, desc="inverting")
