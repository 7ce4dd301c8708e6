"""The only door between models and kernels.

A model (the from-scratch runner in ``iidkern.mmdit`` or a diffusers model with iidkern's
processors) calls :func:`attend` for every joint attention, describing the call with an
:class:`AttentionSite` (step, block, block kind, token ranges). An
:class:`AttentionPolicy` looks at the site and answers with an :class:`AttentionRequest`
(tags, head weights, probes, a block multiplier, pair statistics) or ``None``; the
result comes back to the policy through :meth:`AttentionPolicy.receive`, which may
return a replacement output (HeadRouter's routing does). A request with ``keep_inputs``
also gets the call itself (:class:`AttentionInputs`: q, k, v and the request as run), for a
policy that completes the call with a second one (HeadRouter's same-call DTR).

Editing methods are policies (``iidkern.edit``), never forked models. A policy that
answers ``None`` costs nothing: the call is the plain fused attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from .attention import Tags, attention
from .specs import AttentionResult, BlockMultiplier, as_integer

Range = Tuple[int, int]


def check_steps(step, num_steps) -> Tuple[Optional[int], Optional[int]]:
    """A sampler's ``(step, num_steps)`` as Python ints (numpy and 0-d tensor integers count):
    ``step >= 0``, ``num_steps >= 1``, ``step < num_steps``, either may be ``None``. A float,
    a bool or a string is a TypeError, a value out of range a ValueError (each naming it)."""
    checked = []
    for name, value, low in (("step", step, 0), ("num_steps", num_steps, 1)):
        if value is None:
            checked.append(None)
            continue
        i = as_integer(value)
        if i is None:
            raise TypeError(f"{name} must be an int >= {low} or None, got {value!r} ({type(value).__name__})")
        if i < low:
            raise ValueError(f"{name} must be an int >= {low} or None, got {i}")
        checked.append(i)
    if checked[0] is not None and checked[1] is not None and checked[0] >= checked[1]:
        raise ValueError(f"step must be < num_steps, got step={checked[0]}, num_steps={checked[1]}")
    return checked[0], checked[1]


@dataclass(frozen=True)
class AttentionSite:
    """Where an attention call happens and how its joint sequence is laid out.

    ``text`` / ``image`` are ``[start, stop)`` token ranges in the joint sequence (Flux
    orders [text; image], diffusers' SD3 processor [image; text]: never assume an order).
    ``extra`` names further ranges (e.g. ``"source"`` for Kontext-style source tokens).
    """

    block: int  # index of the block within its kind
    block_kind: str  # "joint" (SD3), "double" / "single" (Flux), or a model's own name
    text: Range
    image: Range
    step: Optional[int] = None  # denoising step, None outside a sampler
    num_steps: Optional[int] = None
    layer: int = 0  # index of this attention call among all calls of one forward pass
    num_layers: int = 0  # attention calls per forward pass (so a policy can find "the penultimate")
    extra: Tuple[Tuple[str, Range], ...] = ()

    @property
    def seq_len(self) -> int:
        return max(self.text[1], self.image[1], *(r[1] for _, r in self.extra)) if self.extra else \
            max(self.text[1], self.image[1])

    def range(self, name: str) -> Range:
        if name in ("text", "image"):
            return getattr(self, name)
        for key, r in self.extra:
            if key == name:
                return r
        raise KeyError(f"AttentionSite has no range named {name!r}")


@dataclass
class AttentionRequest:
    """What a policy asks of one attention call (all optional)."""

    tags: Optional[Tags] = None
    head_weights: Optional[torch.Tensor] = None
    probes: Sequence = ()
    block_multiplier: Optional[BlockMultiplier] = None
    pair_stats: Optional[Sequence[Tuple[int, int]]] = None
    return_lse: bool = False
    keep_inputs: bool = False  # receive(site, result, inputs=AttentionInputs(...)) instead of (site, result)

    @property
    def wants_result(self) -> bool:
        return bool(self.probes) or self.pair_stats is not None or self.return_lse


@dataclass(frozen=True)
class AttentionInputs:
    """The call behind a result, for a policy whose request set ``keep_inputs``.

    ``request`` is the request as run (a :class:`ChainPolicy`'s merged one, with whatever
    tags or head weights its other members or a model's padding mask added), so a second
    call made from these inputs sees the same mask and weights as the first.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layout: str
    scale: Optional[float]
    backend: str
    request: AttentionRequest


class AttentionPolicy:
    """Base policy: asks for nothing. Subclass and override :meth:`request` / :meth:`receive`."""

    def request(self, site: AttentionSite) -> Optional[AttentionRequest]:
        return None

    def receive(self, site: AttentionSite, result: AttentionResult) -> Optional[torch.Tensor]:
        """Called with the result of a call this policy asked for; may return a new output.

        A policy whose request sets ``keep_inputs`` is called as ``receive(site, result,
        inputs=...)`` and declares that keyword; other policies keep this two-argument form."""
        return None


class RunScopedPolicy(AttentionPolicy):
    """A policy whose state belongs to one sampling run (maps captured at some step, the
    previous step's maps): :meth:`reset` forgets it, and :meth:`follow_step` calls it when
    the steps go back, since they only grow within a run, so a policy reused for another
    run starts clean. One-step runs cannot be told apart that way: call reset() between them."""

    _last_step: Optional[int] = None

    def reset(self) -> None:
        self._last_step = None

    def follow_step(self, step: Optional[int]) -> None:
        if step is None:
            return
        if self._last_step is not None and step < self._last_step:
            self.reset()
        self._last_step = step


class CapturePolicy(RunScopedPolicy):
    """Attach fixed probes at chosen (step, layer) sites and keep what they return.

    ``when(site) -> bool`` selects the sites; ``probes(site)`` builds the probe specs
    (ranges differ between models, so they are built from the site). Results are stored in
    ``self.captured[(step, layer)]``: of a step's **first** forward at that layer, when a
    step runs several (true CFG in diffusers' Flux pipelines runs the positive prompt, then
    the negative one; every selected call is still probed); of the latest call for calls
    without a step number. The captures belong to one run (see :class:`RunScopedPolicy`:
    :meth:`reset`, or steps going back, clears them).
    """

    def __init__(self, when, probes):
        self.when = when
        self.probes = probes
        self.captured: Dict[Tuple[Optional[int], int], Tuple[torch.Tensor, ...]] = {}

    def reset(self) -> None:
        super().reset()
        self.captured = {}

    def request(self, site):
        self.follow_step(site.step)
        if not self.when(site):
            return None
        return AttentionRequest(probes=tuple(self.probes(site)))

    def receive(self, site, result):
        key = (site.step, site.layer)
        if site.step is None or key not in self.captured:
            self.captured[key] = result.probes
        return None


class ChainPolicy(AttentionPolicy):
    """Run several policies; their requests must not both set the same single-valued field."""

    def __init__(self, *policies: AttentionPolicy):
        self.policies = policies

    def reset(self) -> None:
        """Reset every member that keeps per-run state (those with a ``reset``)."""
        for pol in self.policies:
            if hasattr(pol, "reset"):
                pol.reset()

    def request(self, site):
        merged, owners = AttentionRequest(), []
        for pol in self.policies:
            req = pol.request(site)
            if req is None:
                continue
            owners.append((pol, len(merged.probes), len(req.probes), bool(req.keep_inputs)))
            for name in ("tags", "head_weights", "block_multiplier", "pair_stats"):
                value = getattr(req, name)
                if value is not None:
                    if getattr(merged, name) is not None:
                        raise ValueError(f"ChainPolicy: two policies set {name} for the same call")
                    setattr(merged, name, value)
            merged.probes = tuple(merged.probes) + tuple(req.probes)
            merged.return_lse = bool(merged.return_lse or req.return_lse)
            merged.keep_inputs = bool(merged.keep_inputs or req.keep_inputs)
        self._owners = owners
        return merged if owners else None

    def receive(self, site, result, inputs: Optional[AttentionInputs] = None):
        out = None
        for pol, first, count, keeps_inputs in self._owners:
            part = AttentionResult(out=result.out if out is None else out, lse=result.lse,
                                   probes=result.probes[first:first + count], pair_stats=result.pair_stats)
            replaced = pol.receive(site, part, inputs=inputs) if keeps_inputs else pol.receive(site, part)
            out = replaced if replaced is not None else out
        return out


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: AttentionSite,
           policy: Optional[AttentionPolicy] = None, *, layout: str = "bnhd", scale: Optional[float] = None,
           backend: str = "auto") -> torch.Tensor:
    """Joint attention for one model call, with whatever the policy asks for at this site."""
    try:
        request = policy.request(site) if policy is not None else None
    except (TypeError, ValueError) as error:
        if hasattr(error, "add_note"):  # Python >= 3.11: say which call the policy failed on
            error.add_note(f"(in {type(policy).__name__}.request at {site})")
        raise
    if request is None:
        return attention(q, k, v, layout=layout, scale=scale, backend=backend)
    result = attention(q, k, v, layout=layout, scale=scale, backend=backend, tags=request.tags,
                       head_weights=request.head_weights, probes=request.probes,
                       block_multiplier=request.block_multiplier, pair_stats=request.pair_stats,
                       return_lse=request.return_lse)
    if not request.wants_result:
        out = result
        result = AttentionResult(out=out)
    if request.keep_inputs:
        inputs = AttentionInputs(q, k, v, layout, scale, backend, request)
        replaced = policy.receive(site, result, inputs=inputs)
    else:
        replaced = policy.receive(site, result)
    return replaced if replaced is not None else result.out
