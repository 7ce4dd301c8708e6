"""The one public attention call: validate (:mod:`iidkern.validate`), choose a backend, launch.

Like ``F.scaled_dot_product_attention`` it returns the output tensor when nothing else is
asked for; when LSE, probes, pair statistics or tile counts are asked for it returns an
:class:`~iidkern.specs.AttentionResult`.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence, Tuple, Union

import torch

from .kernels.fast_launch import device_guard as _on_device, on_other_gpu
from .kernels.tiles import TagMask
from .reference import attention_reference
from .specs import AttentionResult, BlockMultiplier, PairStats, ValueProbe
from .validate import check_head_weights, check_kernel_options, check_multiplier, check_pairs, check_probes, \
    check_qkv, check_scale, check_tag_tensors, check_tags

BACKENDS = ("auto", "triton", "reference")

Tags = Union[Tuple[torch.Tensor, torch.Tensor], TagMask]

# Plain calls (no extras) replay the launches of the first call with their signature
# (kernels/replay.py): ~50 us less host time per call. IIDKERN_REPLAY=0 turns it off (comparisons).
_REPLAY = os.environ.get("IIDKERN_REPLAY", "1") != "0"
_REPLAYS = {}  # plain-call signature -> kernels.LaunchReplay
_MAX_REPLAYS = 256  # signatures kept before the cache restarts (a run uses a handful)
_REPLAYED_OPTIONS = frozenset({"poison", "hopper"})  # boolean kernel_options a replayed call may carry


def tag_mask(q_tags: torch.Tensor, k_tags: torch.Tensor) -> TagMask:
    """Validate a tag pair once and wrap it with a cache of its tile skip lists.

    Pass the result as ``tags=`` to every call that shares the mask (IID: every block and
    step after S), so the tile classification runs once per tile shape, not per call; on a
    GPU it also reads back once whether any tile needs a list, so that masks without one
    (block-diagonal on tile boundaries, say) run the Triton kernel without its list loops,
    which a call's own ``(q_tags, k_tags)`` pair skips (it would synchronize every call). The
    mask holds a copy of the tags: its cached lists always describe the tags it reads, and
    changing the tensors passed in afterwards does not change the mask (build a new one).
    """
    check_tag_tensors(q_tags, k_tags)
    return TagMask(*(t.clone(memory_format=torch.contiguous_format) for t in (q_tags, k_tags)))


def _plain_signature(q, k, v, layout, scale, backend, kernel_options):
    """Everything the checks, routing and launch of a plain call read, or None (no replay).

    Two calls with one signature pass the same checks and launch the same compiled kernel
    with the same arguments but the data pointers."""
    if not (type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor):
        return None  # subclasses (and non-tensors) take the checked path
    # Unhashable or unusual argument types take the checked path too (it names what is wrong).
    if type(layout) is not str or type(backend) is not str or type(scale) not in (float, int, type(None)):
        return None
    if not (backend == "triton" or (backend == "auto" and q.is_cuda)):
        return None  # the reference backend launches nothing to replay
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None  # the checked path marks the outputs as forward-only
    try:
        alignment = (q.data_ptr() & 15, k.data_ptr() & 15, v.data_ptr() & 15)  # Triton specializes on 16 bytes
    except RuntimeError:  # tensors without storage (torch.func transforms): nothing to launch on
        return None
    options = None
    if kernel_options is not None:
        if type(kernel_options) is not dict or not _REPLAYED_OPTIONS.issuperset(kernel_options) or \
                any(type(value) is not bool for value in kernel_options.values()):
            return None
        options = tuple(sorted(kernel_options.items()))
    return (layout, type(scale), scale, backend, options,
            q.device, k.device, v.device, q.dtype, k.dtype, v.dtype,
            q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(),
            alignment, q is k, q is v, k is v)


def _without_autocast(device: torch.device):
    """Autocast off for ``device``'s type, where it is on (autocast knows no meta device)."""
    kind = device.type
    if (kind == "cuda" or kind == "cpu") and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


# Opaque to torch.compile: a compiled model (a diffusers transformer, say) runs each call
# eagerly at a graph break; tracing into the launchers would fail (Gluon kernels, cached
# compiled kernels, the interpreter) or trace host checks into the graph.
@torch.compiler.disable
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str = "bhnd",
              scale: Optional[float] = None, tags: Optional[Tags] = None,
              head_weights: Optional[torch.Tensor] = None, probes: Sequence = (),
              block_multiplier: Optional[BlockMultiplier] = None, pair_stats=None,
              return_lse: bool = False, backend: str = "auto", count_tiles: bool = False,
              kernel_options: Optional[dict] = None) -> Union[torch.Tensor, AttentionResult]:
    """Softmax attention with the extras training-free editing needs, in one fused pass.

    Args:
        q, k, v: ``[B, H, N, D]`` (``layout="bhnd"``) or ``[B, N, H, D]`` (``"bnhd"``,
            diffusers' layout), float16 / bfloat16 / float32, last dim contiguous; read
            through their strides, never copied. ``Nq`` may differ from ``Nk``; D <= 256.
        scale: score scale, default ``1/sqrt(D)``; a positive real whose product with log2(e) is a
            normal float32 number (about 8.2e-39 to 2.4e38), as the kernels compute in float32.
        tags: ``(q_tags, k_tags)`` int32/int64 bit sets of shape ``[B, Nq]``/``[B, Nk]``
            (or ``[1, N]`` / ``[N]``, shared by the batch), or a prebuilt :func:`tag_mask`. Query ``i``
            may attend key ``j`` iff ``q_tags[i] & k_tags[j] != 0``. Tiles with no allowed
            pair are skipped. A query with no allowed key gets a zero output and LSE -inf. As in SDPA
            with a mask, a masked key's probability is 0 and ``0 * v`` joins the sum where its tile is
            read, so a NaN / inf in ``v`` reaches queries that cannot see that key.
        head_weights: ``[H]``, ``[B, H]`` or ``[B, H, Nq]``; multiplies each head's output.
        probes: :class:`Probe` / :class:`ValueProbe` specs; each returns a float32 tensor
            (see ``iidkern.specs``) computed from the exact masked softmax, unaffected by
            ``head_weights`` and ``block_multiplier``.
        block_multiplier: :class:`BlockMultiplier`, post-softmax ``(M*p) @ v / sum(p)``.
        pair_stats: ``[(b0, b1), ...]`` batch-row pairs; returns :class:`PairStats` of the
            final output (after head weights), per head.
        return_lse: also return the row log-sum-exp ``[B, H, Nq]`` (natural log).
        backend: ``"auto"`` (Triton on CUDA, the reference elsewhere), ``"triton"`` (on CPU
            tensors it runs under Triton's interpreter when CUDA is absent or
            ``TRITON_INTERPRET=1``), ``"reference"`` (dense float32 PyTorch).
        count_tiles: Triton backend only: also return how many key tiles each query tile
            visited (``tiles_visited``), to verify tile skipping.
        kernel_options: Triton options, as in FlexAttention; defaults come per head dim and
            dtype from ``iidkern.kernels.launch.default_config``. Main pass: ``BLOCK_M``,
            ``BLOCK_N``, ``num_warps``, ``num_stages``, ``maxnreg`` (register cap per
            thread; ``None`` lifts the D<=64 default). Probe pass: ``PROBE_BLOCK_M``,
            ``PROBE_BLOCK_N``, ``PROBE_NUM_WARPS``, ``PROBE_NUM_STAGES``. Strategy switches
            (results are the same either way): ``fuse_key_groups`` (a probe with <= 32
            key groups rides in the main pass; default True), ``kg_split`` /
            ``mult_split`` (the key groups / the multiplier get their own key-tile range
            instead of a per-tile test), ``kg_half_dot`` (key-group sums as two fp16
            products instead of tf32; fp16 inputs beside a block multiplier skip the fp16
            split: their products are exact fp32 at head dim <= 64 on an sm_90 GPU, tf32
            elsewhere; a head dim that is not a power of two always takes the tf32
            product), ``warp_specialize`` (Triton's automatic warp specialization),
            ``hopper`` (unset: on an H100-class GPU (sm_90), fp16/bf16 calls at head_dim 128
            (and at 64 with at least 16384 keys, or 4096 with a block multiplier or a fused
            key-group probe and no tags) with no value probes or tile counts run the
            warp-specialized Gluon kernel of ``iidkern/kernels/hopper_fwd.py``, which also
            skips and masks tag tiles, accumulates the fused key-group probe and applies a
            block multiplier, except calls without extras on up to 1024 keys that
            ``launch.short_plain_config`` picks for the Triton kernel's small tiles (64 x 64,
            or 64 x 32 under a register cap where that makes the grid one wave); ``True``
            sends those to the Gluon kernel too, ``False`` keeps every call on the Triton
            kernel; naming a main-pass option above, ``warp_specialize``, ``kg_split``,
            ``mult_split`` or ``kg_half_dot`` also selects the Triton kernel; the Gluon
            kernel also needs Triton >= 3.6 and 16-byte-aligned pointers and strides),
            ``tail_split`` (default True: on the Gluon kernel, a
            grid's partial last wave runs its last query tiles as pieces over key ranges,
            joined by a small pass; calls without tags, and at head dim 128 without a block multiplier or with
            one of fp16/bf16 values), and
            ``tail_split_tiles`` with ``tail_split_pieces`` (together: force that many tiles
            split into that many pieces each). ``poison=True`` fills outputs with NaN first (tests).

    Returns:
        The output (same shape and layout as ``q``), or an :class:`AttentionResult` when
        ``return_lse``, ``probes``, ``pair_stats`` or ``count_tiles`` is set.

    The Triton backend is forward-only: with grad mode on and inputs that require grad, its
    outputs raise on ``backward()`` instead of silently carrying no gradient (the reference
    backend is differentiable).
    """
    signature = None
    if _REPLAY and tags is None and head_weights is None and block_multiplier is None and pair_stats is None \
            and return_lse is False and count_tiles is False and type(probes) in (tuple, list) and not probes:
        signature = _plain_signature(q, k, v, layout, scale, backend, kernel_options)
        replay = _REPLAYS.get(signature) if signature is not None else None
        if replay is not None:  # this signature passed the checks below on its first call
            if on_other_gpu(q.device):  # (no context manager on the hot path otherwise)
                with torch.cuda.device(q.device):
                    return replay(q, k, v)
            return replay(q, k, v)

    if layout not in ("bhnd", "bnhd"):
        raise ValueError(f"layout must be 'bhnd' or 'bnhd', got {layout!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    b, h, nq, nk, d = check_qkv(q, k, v, layout)
    scale = check_scale(scale, d)
    device = q.device
    mask = check_tags(tags, b, nq, nk, device)
    head_weights = check_head_weights(head_weights, b, h, nq, device)
    probes = check_probes(probes, b, h, nq, nk, device)
    block_multiplier = check_multiplier(block_multiplier, b, h, nq, nk, device)
    pairs = check_pairs(pair_stats, b, device)
    kernel_options = check_kernel_options(kernel_options)
    for name, flag in (("return_lse", return_lse), ("count_tiles", count_tiles)):
        if not isinstance(flag, bool):  # a string such as "no" would be truthy
            raise TypeError(f"{name} must be a bool, got {flag!r} ({type(flag).__name__})")

    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "reference"
    if count_tiles and backend != "triton":
        raise ValueError("count_tiles=True needs backend='triton'")
    extras = return_lse or bool(probes) or pairs is not None or count_tiles

    # Autocast would round the fp32 math around the kernels (the reference backend, probe
    # folding) to 16 bits: the inputs' dtypes already say what precision the call runs at.
    with _without_autocast(device):
        if backend == "reference":
            res = attention_reference(q, k, v, layout=layout, scale=float(scale),
                                      tags=mask.batched(b) if mask is not None else None,
                                      head_weights=head_weights, probes=probes, block_multiplier=block_multiplier,
                                      pair_stats=pairs, compute_dtype=torch.float32)
            res.out = res.out.contiguous()
            if not return_lse:
                res.lse = None
        else:
            from . import kernels  # sets TRITON_INTERPRET before the kernels are decorated on CUDA-less hosts

            if device.type not in ("cuda", "cpu"):
                raise ValueError(f"backend='triton' needs q, k and v on CUDA (on CPU under Triton's interpreter), "
                                 f"got q on {device}; use backend='reference'")
            if device.type != "cuda" and not kernels.INTERPRETING:
                why = kernels.INTERPRETER_UNAVAILABLE or "on CPU set TRITON_INTERPRET=1 before importing iidkern"
                raise ValueError(f"backend='triton' needs q, k and v on CUDA (got q on {device}); {why}, "
                                 f"or use backend='reference'")
            # A plain call's first run with its signature is recorded, to be replayed by the next ones.
            with _on_device(device), \
                    kernels.recording() if signature is not None else contextlib.nullcontext() as launches:
                res = kernels.triton_attention(q, k, v, layout=layout, scale=float(scale), tags=mask,
                                               head_weights=head_weights, probes=probes,
                                               block_multiplier=block_multiplier, pair_stats=pairs, need_lse=return_lse,
                                               count_tiles=count_tiles, kernel_options=kernel_options)
            if signature is not None:
                _keep_replay(kernels, signature, launches, q, k, v, res.out, layout, kernel_options)
            grad_inputs = _grad_inputs(q, k, v, head_weights, probes, block_multiplier)
            if grad_inputs:
                res = _forward_only(res, grad_inputs)
    return res if extras else res.out


def _grad_inputs(q, k, v, head_weights, probes, block_multiplier) -> list:
    """The inputs of a call that ask for a gradient (under grad mode): every tensor the
    outputs depend on, so none of them silently gets no gradient."""
    if not torch.is_grad_enabled():
        return []
    tensors = [q, k, v, head_weights, block_multiplier.values if block_multiplier is not None else None]
    tensors += [p.x for p in probes if isinstance(p, ValueProbe)]
    tensors += [p.heads for p in probes if isinstance(getattr(p, "heads", None), torch.Tensor)]
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]


class _NoBackward(torch.autograd.Function):
    """Ties a kernel output to the call's inputs that require grad (q, k, v, head weights,
    multiplier or value-probe tensors) in the autograd graph with a backward that raises:
    without it the output would silently carry no gradient."""

    @staticmethod
    def forward(ctx, result, *inputs):
        # A copy, not a view: a view made in a custom Function may not be changed in place,
        # and callers (attention processors) may. Only grad-mode calls pay it.
        return result.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("iidkern.attention: the Triton backend is forward-only (training-free editing needs "
                           "no gradient); call it under torch.no_grad(), or use backend='reference' for gradients")


def _forward_only(res: AttentionResult, grad_inputs) -> AttentionResult:
    """The result with every tensor marked as forward-only (see _NoBackward)."""
    def mark(t):
        return _NoBackward.apply(t, *grad_inputs) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
    res.out = mark(res.out)
    res.lse = mark(res.lse)
    res.probes = tuple(mark(p) for p in res.probes)
    if res.pair_stats is not None:
        s = res.pair_stats
        res.pair_stats = PairStats(mark(s.dot), mark(s.norm0_sq), mark(s.norm1_sq))
    return res


def _keep_replay(kernels, signature, launches, q, k, v, out, layout, kernel_options) -> None:
    replay = kernels.LaunchReplay.of(launches, q, k, v, out, kernels.placeholders(),
                                     kernels.output_allocator(kernel_options), layout)
    if replay is not None:
        if len(_REPLAYS) >= _MAX_REPLAYS:
            _REPLAYS.clear()
        _REPLAYS[signature] = replay
