"""HeadRouter as attention policies (METHODS.md, HeadRouter).

The batch holds two branches from the same inverted noise: a reconstruction row (source
prompt) and an editing row (target prompt); ``pairs`` lists ``(recon_row, edit_row)``.

* **IARouter** (step 1), every call: the kernel returns the branch pair's per-head output
  statistics (``pair_stats``); :func:`iidkern.router_weights` turns them into ``w_h`` and
  :meth:`HeadRouterPolicy.receive` multiplies the editing row's head outputs by ``w_h``
  (a broadcast multiply on ``[B, N, H, D]``; the output projection follows in the model).
* **DTR, image tokens** (step 2), paper form: a post-softmax weight on the editing row's
  image-query x text-key block, ``w = alpha * sigmoid(upsilon * softmax_over_image_tokens(A^{ZP}))``,
  ``A^{ZP} <- w * A^{ZP}``, then ``A V`` (the normalizer unchanged).

  ``dtr_map="same"`` (default, the paper's form): ``A^{ZP}`` is the call's own attention.
  The call runs plain, with a probe of ``A^{ZP}`` and its LSE; since ``w`` changes only the
  text keys' terms, ``receive`` then adds ``sum_k (w - 1) A V`` over the text keys, which a
  second, small call computes (the edit rows' image queries against the text keys only,
  ``(w - 1)`` as its block multiplier, its probabilities brought to the full row's
  normalizer by ``exp(lse_text - lse)``; about ``N_text / N`` of the first call's work).
  The result equals one pass with ``w`` as the multiplier, up to the output dtype's rounding
  of the first output. IARouter's statistics are then taken on the weighted output (by the
  kernels' pair pass on a GPU, :func:`branch_pair_stats`), as the one-pass forms' kernels
  take them after their multiplier.

  ``dtr_map="previous"`` (one fused pass a call): ``A^{ZP}`` comes from a probe of the
  **previous step** at the same block, passed as a :class:`~iidkern.BlockMultiplier` (the
  probe of a call reads the exact softmax, untouched by that call's multiplier, so the pass
  both applies this step's multiplier and measures the next one's map; step 0 runs without
  a multiplier). A step may hold several forwards (true CFG in diffusers' Flux pipelines
  runs the positive prompt, then the negative one): the maps are kept per forward of a
  step, so the k-th forward of a step is weighted by the map of the k-th forward of the
  step before, and runs without a multiplier if that step had no k-th forward (a step
  number is needed for that: without one, every call is the next step's).
  ``dtr_image="code"`` is the released-code form: the weighting is applied to the editing
  row's image-token attention outputs (by default in single blocks, so on models without
  them, SD3, name the kinds in ``dtr_block_kinds``), with one weight per image token from
  its head-mean text mass in the **same** call (the probe comes with the call's output,
  and the weighting follows the attention).
* **DTR, text tokens** (step 3) is a model-side residual across double blocks:
  :class:`TextResidual`, called by the runner's per-block hook.
* **Key regions** (step 4): :class:`KeyRegionPolicy` captures head-summed image x text-token
  maps and :func:`~iidkern.edit.masks.key_region_masks` thresholds them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..attention import attention
from ..kernels.tiles import TagMask
from ..policy import AttentionInputs, AttentionRequest, AttentionSite, RunScopedPolicy
from ..routing import router_weights
from ..specs import BlockMultiplier, PairStats, Probe, TokenGroups, as_integer, index_arg
from . import checks
from .masks import key_region_masks
from .rows import batch_rows, replace_rows

DTR_IMAGE_FORMS = ("paper", "code", "off")
DTR_MAPS = ("same", "previous")


@dataclass
class HeadRouterConfig:
    """HeadRouter's knobs (public defaults: gamma 0.2, delta 0.5, alpha 2 or 5, upsilon 5).

    ``pairs``: ``(recon_row, edit_row)`` batch-row pairs. ``route``: IARouter on/off.
    ``dtr_image``: ``"paper"`` | ``"code"`` | ``"off"``; ``dtr_block_kinds``: block kinds
    that get it (``None`` = every kind for the paper form, ``("single",)`` for the code
    form). ``dtr_map`` (paper form): ``"same"`` (the call's own attention, a second small
    call) or ``"previous"`` (the previous step's, one fused pass). ``dtr_heads``: ``"mean"``
    (one map shared by the heads) or ``"keep"`` (a map per head; H times the memory).
    ``alpha`` (> 0) and ``upsilon`` (any finite real; a negative one gives the least-attended
    image tokens the largest weights) shape DTR's ``alpha * sigmoid(upsilon * softmax(.))``.
    ``dtr_text_keep``: the weight of the previous block's input in the text residual (0.1).
    ``steps``: ``(start, stop)`` step window of the attention side (``None`` = every call; a
    call without a step number is outside any window, as for the IID and key-region policies).
    ``layout``: layout of the output ``attend`` hands back (the runner's is ``"bnhd"``, so
    :func:`~iidkern.edit.pipeline.headrouter_edit` takes no other). Each edit row belongs to
    one pair and is never a recon row. A field assigned after construction is checked again
    when a :class:`HeadRouterPolicy` or :func:`~iidkern.edit.pipeline.headrouter_edit` takes
    the config.
    """

    gamma: float = 0.2
    delta: float = 0.5
    pairs: Sequence[Tuple[int, int]] = ((0, 1),)
    route: bool = True
    dtr_image: str = "paper"
    dtr_block_kinds: Optional[Sequence[str]] = None
    dtr_heads: str = "mean"
    dtr_map: str = "same"
    alpha: float = 2.0
    upsilon: float = 5.0
    dtr_text: bool = True
    dtr_text_keep: float = 0.1
    steps: Optional[Tuple[int, int]] = None
    layout: str = "bnhd"

    def __post_init__(self):
        # Types first: a string of kinds would be read letter by letter, a bare pair as two rows.
        for name in ("gamma", "delta", "alpha", "upsilon", "dtr_text_keep"):
            setattr(self, name, checks.real(getattr(self, name), f"HeadRouterConfig: {name}"))
        for name in ("route", "dtr_text"):
            setattr(self, name, checks.flag(getattr(self, name), f"HeadRouterConfig: {name}"))
        self.dtr_block_kinds = checks.names(self.dtr_block_kinds, "HeadRouterConfig: dtr_block_kinds")
        self.steps = checks.step_window(self.steps, "HeadRouterConfig: steps")
        if self.dtr_image not in DTR_IMAGE_FORMS:
            raise ValueError(f"HeadRouterConfig: dtr_image must be one of {DTR_IMAGE_FORMS}, got {self.dtr_image!r}")
        if self.dtr_heads not in ("mean", "keep"):
            raise ValueError(f"HeadRouterConfig: dtr_heads must be 'mean' or 'keep', got {self.dtr_heads!r}")
        checks.choice(self.dtr_map, DTR_MAPS, "HeadRouterConfig: dtr_map")
        if self.layout not in ("bnhd", "bhnd"):
            raise ValueError(f"HeadRouterConfig: layout must be 'bnhd' or 'bhnd', got {self.layout!r}")
        self.pairs = checks.index_pairs(self.pairs, "HeadRouterConfig: pairs", "((0, 1),)")
        self._check_pairs()
        if not 0.0 <= self.dtr_text_keep <= 1.0:
            raise ValueError(f"HeadRouterConfig: dtr_text_keep must be in [0, 1], got {self.dtr_text_keep}")
        if self.alpha <= 0.0:  # DTR's weights alpha * sigmoid(.) multiply attention probabilities
            raise ValueError(f"HeadRouterConfig: alpha must be > 0, got {self.alpha}")

    def _check_pairs(self):
        if not self.pairs or any(a == b for a, b in self.pairs):
            raise ValueError(f"HeadRouterConfig: pairs must be non-empty (recon_row, edit_row) with distinct rows, "
                             f"got {self.pairs}")
        if any(r < 0 for pair in self.pairs for r in pair):  # -1 and B-1 would alias the same row
            raise ValueError(f"HeadRouterConfig: pairs rows must be >= 0, got {self.pairs}")
        edits = [b for _, b in self.pairs]
        # Each edit row is written once (scale_heads, the DTR multiplier): a repeated one would be
        # last-write-wins on the CPU and undefined on the GPU; a recon row must stay unweighted.
        repeated = sorted({b for b in edits if edits.count(b) > 1})
        if repeated:
            raise ValueError(f"HeadRouterConfig: pairs repeat edit row(s) {repeated}: each edit row belongs to one "
                             f"pair, got {self.pairs}")
        both = sorted({a for a, _ in self.pairs} & set(edits))
        if both:
            raise ValueError(f"HeadRouterConfig: pairs use row(s) {both} as both a recon row and an edit row, "
                             f"got {self.pairs}")

    @property
    def edit_rows(self) -> Tuple[int, ...]:
        return tuple(b for _, b in self.pairs)

    def dtr_kinds(self) -> Optional[Tuple[str, ...]]:
        if self.dtr_block_kinds is not None:
            return tuple(self.dtr_block_kinds)
        return ("single",) if self.dtr_image == "code" else None


def dtr_weights(a_zp: torch.Tensor, alpha: float, upsilon: float) -> torch.Tensor:
    """Paper-form DTR weights ``alpha * sigmoid(upsilon * softmax over image tokens of A^{ZP})``.

    ``a_zp``: ``[..., N_img, N_txt]`` attention of image queries on text keys; the softmax
    runs over the image axis (-2), per text token (and head). Returns a contiguous float32
    tensor of ``a_zp``'s shape.
    """
    # Over the last axis of the transposed map: PyTorch's softmax over an inner axis runs a
    # spatial kernel, 2.4 ms at Flux 1024^2 against 0.01 ms this way (bench/NOTES.md 78).
    by_text = torch.softmax(a_zp.float().transpose(-1, -2), dim=-1)
    return (alpha * torch.sigmoid(upsilon * by_text)).transpose(-1, -2).contiguous()


def dtr_token_weights(text_mass: torch.Tensor, alpha: float, upsilon: float) -> torch.Tensor:
    """Code-form DTR: one weight per image token from its text attention mass ``[..., N_img]``."""
    return alpha * torch.sigmoid(upsilon * torch.softmax(text_mass.float(), dim=-1))


def branch_pair_stats(out: torch.Tensor, pairs: Sequence[Tuple[int, int]], layout: str = "bnhd",
                      backend: str = "reference") -> PairStats:
    """IARouter's per-head statistics of ``out``'s row pairs, float32 ``[P, H]`` (what the
    attention call's ``pair_stats`` gives, for an output changed after the call).

    ``backend``: ``"reference"`` (PyTorch, differentiable), ``"triton"`` (the kernels' pair
    pass: one read of the rows, no float32 copies; on CPU under Triton's interpreter) or
    ``"auto"`` (the kernels on CUDA unless autograd records ``out``). ``pairs``: in-range rows.
    """
    checks.choice(backend, ("reference", "triton", "auto"), "branch_pair_stats: backend")
    outside = sorted({r for pair in pairs for r in pair if not 0 <= r < out.shape[0]})
    if outside:  # (the kernels would read outside the tensor; -1 would be the last row in PyTorch)
        raise ValueError(f"branch_pair_stats: pairs {tuple(pairs)} name row(s) {outside} outside [0, {out.shape[0]})")
    if backend == "auto":
        backend = "triton" if out.is_cuda and not (out.requires_grad and torch.is_grad_enabled()) else "reference"
    if backend == "triton" and out.dtype in (torch.float16, torch.bfloat16, torch.float32) and out.stride(-1) == 1:
        from .. import kernels  # sets up Triton's interpreter on a CUDA-less host

        if not out.is_cuda and kernels.INTERPRETER_UNAVAILABLE:
            raise ValueError(kernels.INTERPRETER_UNAVAILABLE)
        from ..kernels.launch import output_pair_stats

        return output_pair_stats(out, [tuple(pair) for pair in pairs], layout)
    first = batch_rows(out, [a for a, _ in pairs]).float()
    second = batch_rows(out, [b for _, b in pairs]).float()
    tokens_and_channels = (1, 3) if layout == "bnhd" else (2, 3)  # elementwise: einsum made slow gemv kernels
    return PairStats(dot=(first * second).sum(tokens_and_channels), norm0_sq=(first * first).sum(tokens_and_channels),
                     norm1_sq=(second * second).sum(tokens_and_channels))


def _tag_block(tags, rows: Sequence[int], queries: Tuple[int, int], keys: Tuple[int, int]):
    """A call's tags cut to ``rows`` and the ``queries`` x ``keys`` block (as a pair: tags of
    one call, so the kernels do not read their tile lists back to the host)."""
    if tags is None:
        return None
    pair = (tags.q_tags, tags.k_tags) if isinstance(tags, TagMask) else tags

    def cut(t, span):
        t = t.reshape(1, -1) if t.dim() == 1 else t  # [N] and [1, N] tags are shared by the batch
        return (t if t.shape[0] == 1 else batch_rows(t, rows))[:, span[0]:span[1]]

    return cut(pair[0], queries), cut(pair[1], keys)


def _head_weight_block(weights, rows: Sequence[int], queries: Tuple[int, int]):
    """A call's head weights (``[H]``, ``[B, H]`` or ``[B, H, Nq]``) cut to ``rows`` and ``queries``."""
    if weights is None or weights.dim() == 1:
        return weights
    weights = batch_rows(weights, rows)
    return weights if weights.dim() == 2 else weights[:, :, queries[0]:queries[1]]


def scale_heads(out: torch.Tensor, rows: Sequence[int], weights: torch.Tensor, layout: str = "bnhd",
                copy: bool = True) -> torch.Tensor:
    """``out`` (a copy, or ``out`` itself with ``copy=False``) with row ``rows[p]``'s heads
    multiplied by ``weights[p]`` (``[P, H]``)."""
    if len(set(rows)) != len(rows):  # the in-place product would scale a repeated row twice
        raise ValueError(f"scale_heads: rows must be distinct, got {tuple(rows)}")
    outside = [r for r in rows if not 0 <= r < out.shape[0]]
    if outside:
        raise ValueError(f"scale_heads: rows must lie in [0, {out.shape[0]}) (the output's batch), got {tuple(rows)}")
    w = weights.to(out.dtype)
    w = w[:, None, :, None] if layout == "bnhd" else w[:, :, None, None]
    if torch.is_grad_enabled() and (out.requires_grad or weights.requires_grad):
        new = out.clone() if copy else out
        w = w.float()  # out of place: autograd needs the row before the product
        for p, r in enumerate(rows):  # row by row: no list index (see rows.batch_rows)
            new[r] = (out[r].float() * w[p]).to(out.dtype)
        return new
    # PyTorch multiplies 16-bit tensors in float32 and rounds once: the same bits as the float32
    # product above, without its float32 copies.
    if not copy:
        for p, r in enumerate(rows):
            out[r].mul_(w[p])
        return out
    # The copy is written once: scaled rows straight from ``out``, the others copied (a clone
    # and then an in-place product would read and write the scaled rows twice).
    new = torch.empty_like(out)
    which = {r: p for p, r in enumerate(rows)}
    for r in range(out.shape[0]):
        if r in which:
            torch.mul(out[r], w[which[r]], out=new[r])
        else:
            new[r].copy_(out[r])
    return new


class HeadRouterPolicy(RunScopedPolicy):
    """IARouter + DTR image-token weighting for the two-branch batch (see the module doc)."""

    def __init__(self, config: Optional[HeadRouterConfig] = None):
        self.config = checks.config(config, HeadRouterConfig, "HeadRouterPolicy: config")
        # A^{ZP} of the edit rows, the batch size it came with and the step that made it, per
        # (block kind, block, forward of the step)
        self._maps: Dict[Tuple[str, int, int], Tuple[torch.Tensor, int, Optional[int]]] = {}
        # per block: (step, forwards seen at that step, the step before it at this block)
        self._forwards: Dict[Tuple[str, int], Tuple[Optional[int], int, Optional[int]]] = {}
        self.last_router_weights: Dict[Tuple[str, int], torch.Tensor] = {}  # [P, H] of the latest call per block

    def reset(self) -> None:
        """Forget the previous step's maps (a new run; also when the steps go back)."""
        super().reset()
        self._maps.clear()
        self._forwards.clear()
        self.last_router_weights.clear()

    def _active(self, site: AttentionSite) -> bool:
        win = self.config.steps
        if win is None:
            return True
        return site.step is not None and win[0] <= site.step < win[1]  # no step number: outside any window

    def _same_call(self) -> bool:
        return self.config.dtr_image == "paper" and self.config.dtr_map == "same"

    def _dtr_here(self, site: AttentionSite) -> bool:
        if self.config.dtr_image == "off" or site.text[1] <= site.text[0] or site.image[1] <= site.image[0]:
            return False  # no text or no image tokens: no image x text block to weigh
        kinds = self.config.dtr_kinds()
        return kinds is None or site.block_kind in kinds

    def _probe(self, site: AttentionSite) -> Probe:
        img0, img1 = site.image
        t0, t1 = site.text
        if self.config.dtr_image == "paper":
            return Probe(TokenGroups.each(img0, img1), TokenGroups.each(t0, t1), heads=self.config.dtr_heads)
        return Probe(TokenGroups.each(img0, img1), TokenGroups.single(t0, t1, site.seq_len), heads="mean")

    def _map_key(self, site: AttentionSite) -> Tuple[str, int, int]:
        """Count this call as a forward of its step: ``(block kind, block, k)`` for the k-th
        forward (0 without a step)."""
        block = (site.block_kind, site.block)
        step, seen, before = self._forwards.get(block, (None, 0, None))
        if site.step is None or step != site.step:
            step, seen, before = site.step, 0, (step if site.step is not None else None)
        self._forwards[block] = (step, seen + 1, before)
        return block + (seen,)

    def _current_key(self, site: AttentionSite) -> Tuple[str, int, int]:
        """The key :meth:`_map_key` gave this call (``receive`` follows its ``request``)."""
        block = (site.block_kind, site.block)
        return block + (max(self._forwards.get(block, (None, 1, None))[1] - 1, 0),)

    def _multiplier(self, site: AttentionSite, key) -> Optional[BlockMultiplier]:
        stored = self._maps.get(key)
        if stored is None or self.config.dtr_image != "paper":
            return None
        prev, batch, made_at = stored
        if made_at != self._forwards[key[:2]][2]:
            return None  # not the step before this one (that step had fewer forwards): no map yet
        w = dtr_weights(prev, self.config.alpha, self.config.upsilon)  # [P, 1 or H, N_img, N_txt]
        if self.config.dtr_heads == "mean":
            w = w[:, 0]
        # float32 whatever the call's dtype: over thousands of image tokens the softmax keeps w
        # within ~0.1% of alpha / 2, a variation that bf16 rounds away entirely (every weight
        # becomes alpha / 2) and fp16 to one or two steps. Rounding M is a fixed bias per key,
        # not noise that P @ V averages out (bench/NOTES.md 71; 16-bit values would be faster).
        values = torch.ones((batch,) + tuple(w.shape[1:]), dtype=torch.float32, device=w.device)
        for p, r in enumerate(self.config.edit_rows):
            values[r] = w[p]
        return BlockMultiplier(values, query_start=site.image[0], key_start=site.text[0])

    def request(self, site):
        self.follow_step(site.step)
        if not self._active(site):
            return None
        cfg = self.config
        req = AttentionRequest(keep_inputs=True)  # receive checks the call's layout against cfg.layout
        dtr = self._dtr_here(site)
        if cfg.route and not (dtr and self._same_call()):  # same-call DTR: taken on the weighted output
            req.pair_stats = list(cfg.pairs)
        if dtr:
            req.probes = (self._probe(site),)
            if self._same_call():
                req.return_lse = True
            else:
                req.block_multiplier = self._multiplier(site, self._map_key(site))
        if req.pair_stats is None and not req.probes:
            return None
        return req

    def receive(self, site, result, inputs: Optional[AttentionInputs] = None):
        cfg = self.config
        out = result.out
        if inputs is not None and inputs.layout != cfg.layout:  # rows, heads and tokens would be misread
            raise ValueError(f"HeadRouterConfig.layout is {cfg.layout!r} but the call attends in {inputs.layout!r} "
                             f"(the diffusers processors and the runner use 'bnhd')")
        outside = sorted({r for pair in cfg.pairs for r in pair if r >= out.shape[0]})
        if outside:
            raise ValueError(f"HeadRouterPolicy: pairs {cfg.pairs} name row(s) {outside}, outside this call's batch "
                             f"of {out.shape[0]} rows")
        dtr = self._dtr_here(site) and bool(result.probes)
        new, stats = None, result.pair_stats
        if dtr and self._same_call():
            new = self._weigh_text_keys(site, result, inputs)
            if cfg.route:
                stats = branch_pair_stats(new, cfg.pairs, cfg.layout, backend=inputs.backend)
        elif dtr and cfg.dtr_image == "paper":  # the next step's multiplier at this block and forward
            self._maps[self._current_key(site)] = (batch_rows(result.probes[0], cfg.edit_rows).float(),
                                                   out.shape[0], site.step)
        if cfg.route and stats is not None:
            w = router_weights(stats, cfg.gamma, cfg.delta)  # [P, H]
            self.last_router_weights[(site.block_kind, site.block)] = w
            # In place only on the copy made above, and not where autograd saved it for a backward.
            new = scale_heads(out if new is None else new, cfg.edit_rows, w, cfg.layout,
                              copy=new is None or new.requires_grad)
        if dtr and cfg.dtr_image == "code":  # weighted by this call's text mass
            new = self._apply_code_form(site, out if new is None else new,
                                        batch_rows(result.probes[0], cfg.edit_rows).float())
        return new

    def _weigh_text_keys(self, site: AttentionSite, result, inputs: Optional[AttentionInputs]) -> torch.Tensor:
        """Same-call DTR: a copy of the output whose edit rows' image queries weigh their text
        keys' probabilities by ``w`` (see the module doc)."""
        if inputs is None:
            raise RuntimeError("HeadRouterPolicy: dtr_map='same' needs the call's inputs, receive(site, result, "
                               "inputs=...), which iidkern.policy.attend passes when the request sets keep_inputs "
                               "(a policy that wraps this one must pass them on)")
        cfg = self.config
        rows = list(cfg.edit_rows)
        (i0, i1), (t0, t1) = site.image, site.text
        w = dtr_weights(batch_rows(result.probes[0], rows), cfg.alpha, cfg.upsilon)  # [P, 1 or H, N_img, N_txt]
        excess = (w[:, 0] if cfg.dtr_heads == "mean" else w) - 1.0
        token_dim = 1 if inputs.layout == "bnhd" else 2

        def block(x, start, stop):
            return batch_rows(x, rows).narrow(token_dim, start, stop - start)

        request = inputs.request
        if request.block_multiplier is not None:  # w would have to multiply it, not add to it
            raise ValueError("HeadRouterPolicy: dtr_map='same' cannot weigh a call that carries another policy's "
                             "block_multiplier (a ChainPolicy member); the one-pass dtr_map='previous' refuses the "
                             "pair too (ChainPolicy: two policies set block_multiplier)")
        text_part = attention(block(inputs.q, i0, i1), block(inputs.k, t0, t1), block(inputs.v, t0, t1),
                              layout=inputs.layout, scale=inputs.scale, backend=inputs.backend,
                              tags=_tag_block(request.tags, rows, site.image, site.text),
                              head_weights=_head_weight_block(request.head_weights, rows, site.image),
                              block_multiplier=BlockMultiplier(excess), return_lse=True)
        # The small call's probabilities are normalized over the text keys; exp(lse_text - lse)
        # brings them to the whole row's normalizer. A row that sees no text key adds nothing.
        lse = batch_rows(result.lse, rows)[:, :, i0:i1]
        sees_text = torch.isfinite(text_part.lse)
        share = torch.where(sees_text, torch.exp(text_part.lse - lse), torch.zeros_like(lse))  # [P, H, N_img]
        share = share.transpose(1, 2)[..., None] if inputs.layout == "bnhd" else share[..., None]
        out = result.out.clone()
        if torch.is_grad_enabled() and (out.requires_grad or text_part.out.requires_grad):
            weighted = (block(out, i0, i1).float() + text_part.out.float() * share).to(out.dtype)
        else:  # the same float32 sum with fewer float32 copies (copy_ below rounds as .to does)
            weighted = text_part.out.to(torch.float32, copy=True).mul_(share).add_(block(out, i0, i1))
        for p, r in enumerate(rows):  # row by row: no list index (see rows.batch_rows)
            out[r].narrow(token_dim - 1, i0, i1 - i0).copy_(weighted[p])
        return out

    def _apply_code_form(self, site: AttentionSite, out: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        img0, img1 = site.image
        w = dtr_token_weights(mass[:, 0, :, 0], self.config.alpha, self.config.upsilon)  # [P, N_img]
        # One factor per (row, token), 1 outside the edit rows' image tokens: out of place (a
        # backward may need ``out``), and no list index (see rows.batch_rows).
        b, n = out.shape[0], out.shape[1] if self.config.layout == "bnhd" else out.shape[2]
        factor = torch.ones((b, n, 1, 1) if self.config.layout == "bnhd" else (b, 1, n, 1), device=out.device)
        for p, r in enumerate(self.config.edit_rows):
            factor[r].view(-1)[img0:img1] = w[p]
        return (out.float() * factor).to(out.dtype)


class TextResidual:
    """DTR for text tokens (HeadRouter step 3), called by the model between double blocks.

    The text stream entering double block ``l`` becomes ``keep * (text entering l-1) +
    (1 - keep) * (text leaving l-1)``; image tokens are unchanged. ``rows``: batch rows it
    applies to (the editing rows; ``None`` = all). ``__call__(block, num_blocks, text_in,
    text_out)`` returns the text to hand to the next block (the last double block's output
    is left alone: the residual is *across* double blocks).
    """

    def __init__(self, keep: float = 0.1, rows: Optional[Sequence[int]] = None):
        keep = checks.real(keep, "TextResidual: keep")
        if not 0.0 <= keep <= 1.0:
            raise ValueError(f"TextResidual: keep must be in [0, 1], got {keep}")
        self.keep = keep
        self.rows = None if rows is None else tuple(
            checks.integer(r, "TextResidual: rows", 0) for r in checks.sequence(rows, "TextResidual: rows",
                                                                                 "None or a sequence of batch rows"))

    def __call__(self, block: int, num_blocks: int, text_in: torch.Tensor, text_out: torch.Tensor) -> torch.Tensor:
        if block >= num_blocks - 1:
            return text_out
        mixed = self.keep * text_in + (1.0 - self.keep) * text_out
        if self.rows is None:
            return mixed
        outside = [r for r in self.rows if r >= text_out.shape[0]]
        if outside:
            raise ValueError(f"TextResidual: rows {outside} are outside the batch of {text_out.shape[0]} rows")
        return replace_rows(text_out, self.rows, mixed)


def _token_range(token) -> Tuple[int, int]:
    """A KeyRegionPolicy token: an int offset or a (start, stop) pair of them."""
    offset = as_integer(token)
    if offset is not None:
        return offset, offset + 1
    if not isinstance(token, (tuple, list)) or len(token) != 2:
        raise TypeError(f"KeyRegionPolicy: tokens must be int offsets or (start, stop) pairs, got {token!r}")
    return index_arg(token[0], "KeyRegionPolicy: tokens"), index_arg(token[1], "KeyRegionPolicy: tokens")


class KeyRegionPolicy(RunScopedPolicy):
    """Key regions of text tokens (HeadRouter step 4): ``sum_h A_h[image rows, token]``.

    ``tokens``: text token offsets (relative to the text range start), each an int or a
    ``(start, stop)`` range (a word of several tokens: its tokens' maps are summed).
    ``steps`` / ``block_kinds``: where to capture (``None`` = everywhere); maps are summed
    over the captured calls: the first forward of each (step, block) when a step runs
    several (true CFG's negative prompt holds other words), every call without a step
    number. ``row``: the batch row to keep. After a run: ``maps`` ``[T, N_img]`` and
    :meth:`masks` (min-max normalized, ``>= threshold``).
    """

    def __init__(self, tokens: Sequence, row: int = 1, steps: Optional[Sequence[int]] = None,
                 block_kinds: Optional[Sequence[str]] = None):
        self.groups = tuple(_token_range(t) for t in tokens)
        if not self.groups:
            raise ValueError("KeyRegionPolicy: need at least one text token")
        if any(not 0 <= a < b for a, b in self.groups):
            raise ValueError(f"KeyRegionPolicy: token ranges must satisfy 0 <= start < stop, got {self.groups}")
        self.row = checks.integer(row, "KeyRegionPolicy: row", 0)
        if steps is not None:
            steps = {checks.integer(step, "KeyRegionPolicy: steps", 0)
                     for step in checks.sequence(steps, "KeyRegionPolicy: steps", "None or a sequence of step indices")}
        self.steps = steps
        self.block_kinds = checks.names(block_kinds, "KeyRegionPolicy: block_kinds")
        self.reset()

    def reset(self) -> None:
        """Forget the summed maps (a new run; also when the steps go back)."""
        super().reset()
        self.maps: Optional[torch.Tensor] = None
        self._summed = set()  # (step, block kind, block) of the forwards summed in this run

    def request(self, site):
        self.follow_step(site.step)
        if self.steps is not None and site.step not in self.steps:
            return None
        if self.block_kinds is not None and site.block_kind not in self.block_kinds:
            return None
        if site.text[1] <= site.text[0]:
            return None
        if site.step is not None and (site.step, site.block_kind, site.block) in self._summed:
            return None  # a later forward of this step (true CFG's negative prompt)
        t0, t1 = site.text
        if any(t0 + b > t1 for _, b in self.groups):
            raise ValueError(f"KeyRegionPolicy: token ranges {self.groups} exceed the text range {site.text}")
        probes = []
        # Groups may overlap (a token in two words), and one probe's key groups may not: one probe per
        # run of disjoint groups; in practice all words are disjoint and this is one probe.
        for chunk in _disjoint_chunks(self.groups):
            keys = TokenGroups.segments([(t0 + a, t0 + b) for a, b in chunk], site.seq_len)
            probes.append(Probe(TokenGroups.each(*site.image), keys, heads="sum"))
        return AttentionRequest(probes=tuple(probes))

    def receive(self, site, result):
        batch = result.out.shape[0]
        if self.row >= batch:
            raise ValueError(f"KeyRegionPolicy: row {self.row} is out of range for a batch of {batch}")
        m = torch.cat([p[self.row, 0] for p in result.probes], dim=-1).transpose(0, 1).float()  # [T, N_img]
        self.maps = m if self.maps is None else self.maps + m
        if site.step is not None:
            self._summed.add((site.step, site.block_kind, site.block))
        return None

    def masks(self, threshold: float = 0.2) -> torch.Tensor:
        if self.maps is None:
            raise RuntimeError("KeyRegionPolicy: no maps captured yet (no site matched)")
        return key_region_masks(self.maps, threshold)


def _disjoint_chunks(groups):
    chunks, current, used = [], [], set()
    for a, b in groups:
        span = set(range(a, b))
        if span & used:
            chunks.append(current)
            current, used = [], set()
        current.append((a, b))
        used |= span
    chunks.append(current)
    return chunks
