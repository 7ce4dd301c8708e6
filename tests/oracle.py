"""An independent float64 oracle for ``iidkern.attention``, written from the documented
semantics only (README, ``iidkern.specs``' docstrings).

``iidkern.reference`` is the package's own dense backend and shares host helpers with the
kernel path (head reductions, group normalization, dense group ids). This module imports
none of them: it reads a spec's public fields (``kind``, ``start``, ``stop``,
``group_ids``, ``count``, ``heads``, ``normalize``, ``values``, ``query_start``,
``key_start``) and computes every quantity with explicit loops over groups, so a helper
that is wrong in both backends the same way still fails a test against this.
"""
from dataclasses import dataclass, field
from typing import List, Optional

import torch


@dataclass
class OracleResult:
    out: torch.Tensor  # [B, H, Nq, D] float64 (bhnd, whatever the call's layout)
    lse: torch.Tensor  # [B, H, Nq] float64, -inf where a query sees no key
    probs: torch.Tensor  # [B, H, Nq, Nk] float64, the exact masked softmax
    probes: List[torch.Tensor] = field(default_factory=list)
    pair_dot: Optional[torch.Tensor] = None  # [P, H] of the oracle's own output
    pair_norm0: Optional[torch.Tensor] = None
    pair_norm1: Optional[torch.Tensor] = None


def to_bhnd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t if layout == "bhnd" else t.transpose(1, 2)


def group_id_rows(groups, batch: int, length: int) -> torch.Tensor:
    """``[B, N]`` int64 group id per token, -1 where not probed, from the spec's fields:
    an ``each`` range numbers its tokens 0, 1, ...; ``ids`` count only inside the span and
    below ``count``."""
    ids = torch.full((batch, length), -1, dtype=torch.int64)
    if groups.kind == "each":
        ids[:, groups.start:groups.stop] = torch.arange(groups.stop - groups.start)
        return ids
    given = groups.group_ids.detach().cpu().long()
    given = given.expand(batch, length) if given.dim() == 1 else given
    for b in range(batch):
        for t in range(groups.start, groups.stop):
            g = int(given[b, t])
            if 0 <= g < groups.count:
                ids[b, t] = g
    return ids


def group_count(groups) -> int:
    return groups.stop - groups.start if groups.kind == "each" else groups.count


def one_hot(ids: torch.Tensor, count: int) -> torch.Tensor:
    """``[B, N, G]`` float64 membership of each token in each group."""
    return torch.stack([(ids == g) for g in range(count)], dim=-1).double()


def head_reduce(per_head: torch.Tensor, heads) -> torch.Tensor:
    """``[B, H, ...]`` -> ``[B, H or 1, ...]`` by the probe's head rule."""
    if isinstance(heads, str):
        if heads == "keep":
            return per_head
        total = sum(per_head[:, i:i + 1] for i in range(per_head.shape[1]))
        return total / per_head.shape[1] if heads == "mean" else total
    w = heads.detach().cpu().double()
    w = w.expand(per_head.shape[0], -1) if w.dim() == 1 else w
    total = torch.zeros_like(per_head[:, :1])
    for i in range(per_head.shape[1]):
        total = total + per_head[:, i:i + 1] * w[:, i].reshape((-1,) + (1,) * (per_head.dim() - 1))
    return total


def oracle(q, k, v, *, layout="bhnd", scale=None, tags=None, head_weights=None, probes=(),
           block_multiplier=None, pair_stats=None) -> OracleResult:
    """Float64 attention and extras. ``tags`` is ``(q_tags, k_tags)`` of ``[B or 1, N]`` / ``[N]``."""
    from iidkern.specs import ValueProbe  # only the class, to tell the two probe kinds apart

    qd, kd, vd = (to_bhnd(t, layout).detach().cpu().double() for t in (q, k, v))
    b, h, nq, d = qd.shape
    nk = kd.shape[2]
    scale = d ** -0.5 if scale is None else float(scale)
    scores = torch.einsum("bhqd,bhkd->bhqk", qd, kd) * scale
    scores = scores.masked_fill(~allowed_pairs(tags, b, nq, nk)[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    seen = torch.isfinite(lse)
    probs = torch.where(seen[..., None], torch.exp(scores - torch.where(seen, lse, 0.0)[..., None]), 0.0)

    weighted = probs
    if block_multiplier is not None:
        m = block_multiplier.values.detach().cpu().double()
        m = m[:, None] if m.dim() == 3 else m
        full = torch.ones(b, h, nq, nk, dtype=torch.float64)
        q0, k0 = block_multiplier.query_start, block_multiplier.key_start
        full[:, :, q0:q0 + m.shape[-2], k0:k0 + m.shape[-1]] = m.expand(b, h, -1, -1)
        weighted = probs * full
    out = torch.einsum("bhqk,bhkd->bhqd", weighted, vd)
    if head_weights is not None:
        w = head_weights.detach().cpu().double()
        w = {1: lambda: w[None, :, None], 2: lambda: w[:, :, None], 3: lambda: w}[w.dim()]()
        out = out * w[..., None]

    res = OracleResult(out=out, lse=lse, probs=probs)
    for p in probes:
        q_ids = group_id_rows(p.queries, b, nq)
        gq = group_count(p.queries)
        q_hot = one_hot(q_ids, gq)  # [B, Nq, Gq]
        if isinstance(p, ValueProbe):
            x = p.x.detach().cpu().double()
            x = x.expand(b, -1, -1) if x.dim() == 2 else x
            per_key = torch.einsum("bhqk,bkc->bhqc", probs, x)
            per_head = torch.einsum("bqg,bhqc->bhgc", q_hot, per_key)
            divide_q, divide_k = p.normalize == "queries", False
            k_sizes = None
        else:
            k_ids = group_id_rows(p.keys, b, nk)
            k_hot = one_hot(k_ids, group_count(p.keys))
            per_head = torch.einsum("bqg,bhqk,bkf->bhgf", q_hot, probs, k_hot)
            divide_q, divide_k = p.normalize in ("queries", "both"), p.normalize in ("keys", "both")
            k_sizes = k_hot.sum(1)  # [B, Gk]
        if divide_q:
            per_head = per_head / q_hot.sum(1).clamp_min(1)[:, None, :, None]
        if divide_k:
            per_head = per_head / k_sizes.clamp_min(1)[:, None, None, :]
        res.probes.append(head_reduce(per_head, p.heads))

    if pair_stats is not None:
        res.pair_dot, res.pair_norm0, res.pair_norm1 = pair_sums(out, pair_stats)
    return res


def allowed_pairs(tags, batch: int, nq: int, nk: int) -> torch.Tensor:
    """``[B, Nq, Nk]`` bool: query i may attend key j iff its tags meet j's (all with no tags).
    ``tags`` is ``(q_tags, k_tags)`` of ``[B or 1, N]`` / ``[N]``, or None."""
    if tags is None:
        return torch.ones(batch, nq, nk, dtype=torch.bool)
    qt, kt = (torch.as_tensor(t).cpu().long().reshape(-1, n).expand(batch, n) for t, n in zip(tags, (nq, nk)))
    return (qt[:, :, None] & kt[:, None, :]) != 0


def pair_sums(out: torch.Tensor, pairs):
    """``(dot, norm0_sq, norm1_sq)``, each ``[P, H]``: the pair statistics of a ``[B, H, N, D]``
    output, in its dtype (float64 for the oracle's and a returned output's comparison)."""
    pairs = torch.as_tensor(pairs).long().reshape(-1, 2)
    a, c = out[pairs[:, 0]], out[pairs[:, 1]]  # [P, H, Nq, D]
    return (a * c).sum((2, 3)), (a * a).sum((2, 3)), (c * c).sum((2, 3))


def tiles_visited(allowed_rows: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """Key tiles a query tile must visit: those holding at least one allowed pair.
    ``allowed_rows``: ``[B, Nq, Nk]`` bool, on any device. Returns ``[B, query tiles]`` int64."""
    b, nq, nk = allowed_rows.shape
    mt, nt = -(-nq // block_m), -(-nk // block_n)
    padded = torch.zeros(b, mt * block_m, nt * block_n, dtype=torch.bool, device=allowed_rows.device)
    padded[:, :nq, :nk] = allowed_rows
    return padded.view(b, mt, block_m, nt, block_n).any(4).any(2).sum(-1)


def magnitude_probes(probes):
    """The probes with every signed factor (a value probe's ``x``, head weights) taken by
    absolute value: their oracle gives, per element, the sum of its terms' magnitudes (the
    scale of a per-term relative error; probabilities and memberships are never negative)."""
    from iidkern.specs import Probe, ValueProbe

    def positive(heads):
        return heads.abs() if isinstance(heads, torch.Tensor) else heads
    return [ValueProbe(p.x.abs(), p.queries, heads=positive(p.heads), normalize=p.normalize)
            if isinstance(p, ValueProbe) else Probe(p.queries, p.keys, heads=positive(p.heads), normalize=p.normalize)
            for p in probes]
