"""HeadRouter's instance-adaptive router (IARouter): per-head weights from branch statistics.

METHODS.md, HeadRouter step 1: with ``s_h`` the cosine similarity between the two
branches' head-``h`` outputs,
``d_h = (max_h s - s_h) / max(max_h s - min_h s, 1e-6)`` and
``w_h = 1 + gamma * sigmoid(d_h - delta)``; the editing branch's head ``h`` is multiplied
by ``w_h``. Heads whose output the edit changed most (lowest similarity) get the largest
weight.
"""
from __future__ import annotations

import math

import torch

from .specs import PairStats, as_real, check_data_tensor


def _real(x, what: str) -> float:
    r = as_real(x)
    if r is None:
        raise TypeError(f"router_weights: {what} must be a real number, got {x!r} ({type(x).__name__})")
    if not math.isfinite(r):
        raise ValueError(f"router_weights: {what} must be finite, got {r}")
    return r


def router_weights(stats: PairStats, gamma: float = 0.2, delta: float = 0.5, eps: float = 1e-6) -> torch.Tensor:
    """Per-(pair, head) routing weights ``[P, H]`` from :class:`PairStats`.

    ``stats``: floating-point ``[P, H]`` tensors on one device, ``P, H >= 1``; squared norms on
    the CPU are checked to be >= 0 (on a GPU the check would synchronize: there a negative
    one gives NaN weights). ``gamma``, ``delta``: finite reals; ``eps`` (the floor of the
    similarity spread): a finite real > 0. Heads of a pair with equal similarities (identical
    branches) get ``d_h = 0``. The cosine is taken in float64 (``PairStats.cosine``), so it
    does not depend on the outputs' scale; the weights come in the stats' dtype, at least float32.
    """
    if not isinstance(stats, PairStats):
        raise TypeError(f"router_weights: stats must be a PairStats, got {type(stats).__name__}")
    stats.check("router_weights: stats")  # again: PairStats is mutable
    if min(stats.dot.shape) < 1:
        raise ValueError(f"router_weights: stats must have shape [P, H] with P >= 1 and H >= 1, "
                         f"got {tuple(stats.dot.shape)}")
    for name in ("dot", "norm0_sq", "norm1_sq"):
        check_data_tensor(getattr(stats, name), f"router_weights: stats.{name}")
    for name in ("norm0_sq", "norm1_sq"):
        t = getattr(stats, name)
        if t.device.type == "cpu" and bool((t < 0).any()):
            raise ValueError(f"router_weights: stats.{name} (squared norms) must be >= 0, got a minimum of "
                             f"{t.min().item()}")
    gamma, delta, eps = _real(gamma, "gamma"), _real(delta, "delta"), _real(eps, "eps")
    if eps <= 0:
        raise ValueError(f"router_weights: eps must be > 0, got {eps}")
    s = stats.cosine()
    s_max = s.max(dim=-1, keepdim=True).values
    s_min = s.min(dim=-1, keepdim=True).values
    spread = s_max - s_min
    d = (s_max - s) / torch.clamp(spread, min=eps)
    # No spread: every s_h == s_max, d_h = 0 (0 / eps, and not 0 / 0 where eps underflows s's dtype).
    d = d.masked_fill(spread == 0, 0.0)
    return 1.0 + gamma * torch.sigmoid(d - delta)
