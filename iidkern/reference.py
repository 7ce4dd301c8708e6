"""The materializing PyTorch oracle: same contract as the Triton backend, computed densely.

It builds the full ``[B, H, Nq, Nk]`` probability tensor in ``compute_dtype`` (float64 for
tests, float32 for CPU users), so it is the definition every fused kernel is tested
against, and a correct (if memory-hungry) path on any device.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .specs import (AttentionResult, BlockMultiplier, PairStats, Probe, TokenGroups, ValueProbe, normalize_groups,
                    reduce_heads)


def _one_hot_groups(groups: TokenGroups, batch: int, length: int, dtype, device) -> torch.Tensor:
    """``[B, N, G]`` membership matrix of a probe side."""
    ids = groups.dense_ids(batch, length, device).long()
    eye = torch.arange(groups.count, device=device)
    return (ids.unsqueeze(-1) == eye).to(dtype)


def probe_reference(probs: torch.Tensor, probe: Probe) -> torch.Tensor:
    """Probe result from materialized probabilities ``[B, H, Nq, Nk]`` (float32 out)."""
    b, _, nq, nk = probs.shape
    oq = _one_hot_groups(probe.queries, b, nq, probs.dtype, probs.device)
    ok = _one_hot_groups(probe.keys, b, nk, probs.dtype, probs.device)
    per_head = torch.einsum("bqg,bhqk,bkc->bhgc", oq, probs, ok)
    out = reduce_heads(per_head, probe.heads)
    return normalize_groups(out, probe.queries, probe.keys, probe.normalize, nq, nk).float()


def value_probe_reference(probs: torch.Tensor, vprobe: ValueProbe) -> torch.Tensor:
    b, _, nq, nk = probs.shape
    x = vprobe.x.to(device=probs.device, dtype=probs.dtype)
    x = x.expand(b, *x.shape) if x.dim() == 2 else x
    oq = _one_hot_groups(vprobe.queries, b, nq, probs.dtype, probs.device)
    per_head = torch.einsum("bqg,bhqk,bkc->bhgc", oq, probs, x)
    out = reduce_heads(per_head, vprobe.heads)
    return normalize_groups(out, vprobe.queries, None, vprobe.normalize, nq, nk).float()


def pair_stats_reference(out_bhnd: torch.Tensor, pairs: torch.Tensor) -> PairStats:
    o = out_bhnd.double()
    o0, o1 = o[pairs[:, 0]], o[pairs[:, 1]]  # [P, H, N, D]
    return PairStats(dot=(o0 * o1).sum((2, 3)).float(), norm0_sq=(o0 * o0).sum((2, 3)).float(),
                     norm1_sq=(o1 * o1).sum((2, 3)).float())


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float,
                    tags: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact masked softmax ``[B, H, Nq, Nk]`` and its LSE ``[B, H, Nq]`` (rows with no key: 0 and -inf)."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if tags is not None:
        allowed = (tags[0].long().unsqueeze(-1) & tags[1].long().unsqueeze(-2)) != 0  # [B, Nq, Nk]
        scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - safe_lse.unsqueeze(-1))  # exp(-inf) = 0 on masked entries
    return probs, lse


def attention_reference(q, k, v, *, layout: str = "bhnd", scale: Optional[float] = None,
                        tags: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                        head_weights: Optional[torch.Tensor] = None,
                        probes: Sequence = (), block_multiplier: Optional[BlockMultiplier] = None,
                        pair_stats: Optional[torch.Tensor] = None,
                        compute_dtype: torch.dtype = torch.float64) -> AttentionResult:
    """Dense reference of :func:`iidkern.attention` (arguments already validated).

    ``pair_stats`` here is an int64 ``[P, 2]`` tensor of batch-row pairs.
    """
    to_bhnd = (lambda t: t) if layout == "bhnd" else (lambda t: t.transpose(1, 2))
    qc, kc, vc = (to_bhnd(t).to(compute_dtype) for t in (q, k, v))
    b, h, nq, d = qc.shape
    nk = kc.shape[2]
    scale = d ** -0.5 if scale is None else scale
    if tags is not None:
        tags = tuple(t.expand(b, t.shape[-1]) if t.dim() == 1 else t for t in tags)
    probs, lse = attention_probs(qc, kc, scale, tags)

    weighted = probs
    if block_multiplier is not None:
        m = block_multiplier.values.to(compute_dtype)
        m = m.unsqueeze(1) if m.dim() == 3 else m
        mult = torch.ones(b, m.shape[1], nq, nk, dtype=compute_dtype, device=probs.device)
        qs, ks = block_multiplier.query_start, block_multiplier.key_start
        mult[:, :, qs:qs + m.shape[-2], ks:ks + m.shape[-1]] = m
        weighted = probs * mult
    out = torch.einsum("bhqk,bhkd->bhqd", weighted, vc)
    if head_weights is not None:
        w = head_weights.to(compute_dtype)
        w = w.view(1, -1, 1) if w.dim() == 1 else (w.unsqueeze(-1) if w.dim() == 2 else w)
        out = out * w.unsqueeze(-1)

    results = []
    for p in probes:
        results.append(probe_reference(probs, p) if isinstance(p, Probe) else value_probe_reference(probs, p))
    # The statistics of the output as returned (rounded to the input dtype), as the kernels take them.
    out = out.to(q.dtype)
    stats = pair_stats_reference(out, pair_stats) if pair_stats is not None else None
    out_layout = out if layout == "bhnd" else out.transpose(1, 2)
    return AttentionResult(out=out_layout, lse=lse.float(), probes=tuple(results), pair_stats=stats)
