"""HeadRouter's instance-adaptive router (IARouter): per-head weights from branch statistics.

METHODS.md, HeadRouter step 1: with ``s_h`` the cosine similarity between the two
branches' head-``h`` outputs,
``d_h = (max_h s - s_h) / max(max_h s - min_h s, 1e-6)`` and
``w_h = 1 + gamma * sigmoid(d_h - delta)``; the editing branch's head ``h`` is multiplied
by ``w_h``. Heads whose output the edit changed most (lowest similarity) get the largest
weight.
"""
from __future__ import annotations

import torch

from .specs import PairStats


def router_weights(stats: PairStats, gamma: float = 0.2, delta: float = 0.5, eps: float = 1e-6) -> torch.Tensor:
    """Per-(pair, head) routing weights ``[P, H]`` from :class:`PairStats`."""
    if not isinstance(stats, PairStats):
        raise TypeError(f"router_weights: stats must be a PairStats, got {type(stats).__name__}")
    s = stats.cosine()
    s_max = s.max(dim=-1, keepdim=True).values
    s_min = s.min(dim=-1, keepdim=True).values
    d = (s_max - s) / torch.clamp(s_max - s_min, min=eps)
    return 1.0 + gamma * torch.sigmoid(d - delta)
