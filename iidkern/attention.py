"""The one public attention call: validate, choose a backend, launch.

Like ``F.scaled_dot_product_attention`` it returns the output tensor when nothing else is
asked for; when LSE, probes, pair statistics or tile counts are asked for it returns an
:class:`~iidkern.specs.AttentionResult`.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional, Sequence, Tuple, Union

import torch

from .kernels.tiles import TagMask
from .reference import attention_reference
from .specs import MAX_VALUE_PROBE_CHANNELS, AttentionResult, BlockMultiplier, PairStats, Probe, TokenGroups, \
    ValueProbe, as_integer, check_data_tensor

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TAG_DTYPES = (torch.int32, torch.int64)
MAX_HEAD_DIM = 256
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
    _check_tag_tensors(q_tags, k_tags)
    return TagMask(*(t.clone(memory_format=torch.contiguous_format) for t in (q_tags, k_tags)))


def _check_tag_tensors(q_tags, k_tags) -> None:
    for name, t in (("q_tags", q_tags), ("k_tags", k_tags)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tags: {name} must be a torch.Tensor, got {type(t).__name__}")
        check_data_tensor(t, f"tags: {name}")
        if t.dtype not in _TAG_DTYPES:
            raise TypeError(f"tags: {name} must be int32 or int64 bit sets, got {t.dtype}")
        if t.dim() not in (1, 2):
            raise ValueError(f"tags: {name} must have shape [B, N] or [N], got {tuple(t.shape)}")
    if q_tags.device != k_tags.device:
        raise ValueError(f"tags: q_tags is on {q_tags.device} but k_tags is on {k_tags.device}")


def _shape_of(t: torch.Tensor, layout: str):
    """(B, H, N, D) of a 4-D tensor in the given layout."""
    if layout == "bhnd":
        return tuple(t.shape)
    b, n, h, d = t.shape
    return b, h, n, d


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


def _on_device(device: torch.device):
    """The tensors' GPU as the current CUDA device for the launches. Triton launches on the
    current device's current stream, whatever device the pointers are on, so tensors on
    ``cuda:1`` under a current ``cuda:0`` would run on the wrong GPU (and outside the caller's
    stream there); torch's own ops guard the device the same way."""
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _without_autocast(device: torch.device):
    """Autocast off for ``device``'s type, where it is on (autocast knows no meta device)."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _validate_qkv(q, k, v, layout):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D ({'[B, H, N, D]' if layout == 'bhnd' else '[B, N, H, D]'} for "
                             f"layout={layout!r}), got shape {tuple(t.shape)}")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must have a contiguous last (head) dim (stride 1), got strides {t.stride()}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    bq, hq, nq, dq = _shape_of(q, layout)
    bk, hk, nk, dk = _shape_of(k, layout)
    bv, hv, nv, dv = _shape_of(v, layout)
    if not (bq == bk == bv):
        raise ValueError(f"q, k, v batch sizes differ: q={bq}, k={bk}, v={bv} (layout={layout!r})")
    if not (hq == hk == hv):
        raise ValueError(f"q, k, v head counts differ: q={hq}, k={hk}, v={hv} (layout={layout!r})")
    if nk != nv:
        raise ValueError(f"k and v must have the same number of tokens, got k={nk}, v={nv} (layout={layout!r})")
    if not (dq == dk == dv):
        raise ValueError(f"q, k, v head dims differ: q={dq}, k={dk}, v={dv}")
    if not 1 <= dq <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}], got D={dq}")
    if min(bq, hq, nq, nk) < 1:
        raise ValueError(f"q/k must be non-empty, got B={bq}, H={hq}, Nq={nq}, Nk={nk}")
    return bq, hq, nq, nk, dq


def _validate_tags(tags, b, nq, nk, device) -> Optional[TagMask]:
    if tags is None:
        return None
    if isinstance(tags, TagMask):
        mask = tags
    elif isinstance(tags, (tuple, list)) and len(tags) == 2:
        _check_tag_tensors(tags[0], tags[1])
        mask = TagMask(tags[0], tags[1], reused=False)  # this call's own: no copy (TagMask copies strided views)
    else:
        raise TypeError(f"tags must be a (q_tags, k_tags) pair or an iidkern.tag_mask(...), got {type(tags).__name__}")
    for name, t, n in (("q_tags", mask.q_tags, nq), ("k_tags", mask.k_tags, nk)):
        expected = f"[{b}, {n}], [1, {n}] or [{n}]"  # [1, N] and [N] are shared by the batch
        if t.shape[-1] != n or (t.dim() == 2 and t.shape[0] not in (1, b)):
            raise ValueError(f"tags: {name} must have shape {expected}, got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"tags: {name} is on {t.device}, expected {device} (the device of q)")
    return mask


def _validate_head_weights(w, b, h, nq, device):
    if w is None:
        return None
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"head_weights must be a torch.Tensor, got {type(w).__name__}")
    check_data_tensor(w, "head_weights")
    if not w.is_floating_point():
        raise TypeError(f"head_weights must be floating point, got {w.dtype}")
    allowed = {1: (h,), 2: (b, h), 3: (b, h, nq)}
    if w.dim() not in allowed or tuple(w.shape) != allowed[w.dim()]:
        raise ValueError(f"head_weights must have shape [{h}], [{b}, {h}] or [{b}, {h}, {nq}], got {tuple(w.shape)}")
    if w.device != device:
        raise ValueError(f"head_weights is on {w.device}, expected {device}")
    return w


def _validate_groups(g: TokenGroups, n: int, b: int, device, where: str):
    if g.kind == "each":
        if g.stop > n:
            raise ValueError(f"{where}: TokenGroups.each range [{g.start}, {g.stop}) exceeds the {n} tokens")
        return
    ids = g.group_ids
    if ids.shape[-1] != n or (ids.dim() == 2 and ids.shape[0] != b):
        raise ValueError(f"{where}: group ids must have shape [{b}, {n}] or [{n}], got {tuple(ids.shape)}")
    if ids.device != device and ids.device.type != "cpu":
        # Host-built ids (TokenGroups.segments/single) are copied over; another GPU is a mistake.
        raise ValueError(f"{where}: group ids are on {ids.device}, expected {device} or cpu")
    if g.stop > n:
        raise ValueError(f"{where}: group span [{g.start}, {g.stop}) exceeds the {n} tokens")


def _validate_probe_heads(heads, b, h, device, where):
    if isinstance(heads, torch.Tensor):
        if tuple(heads.shape) not in ((h,), (b, h)):
            raise ValueError(f"{where}: heads (per-head weights) must have shape [{h}] or [{b}, {h}], "
                             f"got {tuple(heads.shape)}")
        if heads.device != device:
            raise ValueError(f"{where}: heads (per-head weights) are on {heads.device}, expected {device}")


def _validate_probes(probes, b, h, nq, nk, device):
    if isinstance(probes, (Probe, ValueProbe)):
        probes = (probes,)
    if not isinstance(probes, (tuple, list)):
        raise TypeError(f"probes must be a sequence of Probe / ValueProbe, got {type(probes).__name__}")
    channels = 0
    for i, p in enumerate(probes):
        where = f"probes[{i}]"
        if isinstance(p, Probe):
            _validate_groups(p.queries, nq, b, device, where + ".queries")
            _validate_groups(p.keys, nk, b, device, where + ".keys")
        elif isinstance(p, ValueProbe):
            _validate_groups(p.queries, nq, b, device, where + ".queries")
            x = p.x
            if x.shape[-2] != nk or (x.dim() == 3 and x.shape[0] != b):
                raise ValueError(f"{where}.x must have shape [{b}, {nk}, C] or [{nk}, C], got {tuple(x.shape)}")
            if x.device != device and x.device.type != "cpu":
                raise ValueError(f"{where}.x is on {x.device}, expected {device} or cpu")
            channels += x.shape[-1]
        else:
            raise TypeError(f"{where} must be a Probe or ValueProbe, got {type(p).__name__}")
        _validate_probe_heads(p.heads, b, h, device, where)
    if channels > 4 * MAX_VALUE_PROBE_CHANNELS:
        raise ValueError(f"probes: value probes of one call may carry at most {4 * MAX_VALUE_PROBE_CHANNELS} channels "
                         f"in total, got {channels}")
    return tuple(probes)


def _validate_multiplier(m, b, h, nq, nk, device):
    if m is None:
        return None
    if not isinstance(m, BlockMultiplier):
        raise TypeError(f"block_multiplier must be an iidkern.BlockMultiplier, got {type(m).__name__}")
    vals = m.values
    if not isinstance(vals, torch.Tensor) or not vals.is_floating_point():
        raise TypeError(f"block_multiplier.values must be a floating-point tensor, got "
                        f"{getattr(vals, 'dtype', type(vals).__name__)}")
    check_data_tensor(vals, "block_multiplier.values")
    if vals.dim() not in (3, 4) or vals.shape[0] != b or (vals.dim() == 4 and vals.shape[1] != h):
        raise ValueError(f"block_multiplier.values must have shape [{b}, Mq, Mk] or [{b}, {h}, Mq, Mk], "
                         f"got {tuple(vals.shape)}")
    mq, mk = vals.shape[-2], vals.shape[-1]
    if not (0 <= m.query_start and m.query_start + mq <= nq):
        raise ValueError(f"block_multiplier query range [{m.query_start}, {m.query_start + mq}) must lie in [0, {nq}]")
    if not (0 <= m.key_start and m.key_start + mk <= nk):
        raise ValueError(f"block_multiplier key range [{m.key_start}, {m.key_start + mk}) must lie in [0, {nk}]")
    if vals.device != device:
        raise ValueError(f"block_multiplier.values is on {vals.device}, expected {device}")
    return m


# kernel_options: name -> (what a value must be, check). Tile edges are powers of two from 16
# (tl.dot's least M, N, K) to 256; warps a power of two up to 16.
def _is_pow2_in(lo, hi):
    def ok(x):
        n = as_integer(x)
        return n is not None and lo <= n <= hi and n & (n - 1) == 0
    return ok


def _int_in(lo, hi):
    return lambda x: as_integer(x) is not None and lo <= as_integer(x) <= hi


_TILE = ("a power of two in [16, 256]", _is_pow2_in(16, 256))
_WARPS = ("a power of two in [1, 16]", _is_pow2_in(1, 16))
_STAGES = ("an int in [1, 8]", _int_in(1, 8))
_FLAG = ("a bool", lambda x: type(x) is bool)
KERNEL_OPTIONS = {
    "BLOCK_M": _TILE, "BLOCK_N": _TILE, "num_warps": _WARPS, "num_stages": _STAGES,
    "maxnreg": ("None or an int in [24, 255]", lambda x: x is None or _int_in(24, 255)(x)),
    "PROBE_BLOCK_M": _TILE, "PROBE_BLOCK_N": _TILE, "PROBE_NUM_WARPS": _WARPS, "PROBE_NUM_STAGES": _STAGES,
    "fuse_key_groups": _FLAG, "kg_split": _FLAG, "mult_split": _FLAG, "kg_half_dot": _FLAG,
    "warp_specialize": _FLAG, "hopper": _FLAG, "poison": _FLAG,
    # The Hopper kernel's last-wave key split (kernels/tail_split.py): False turns it off; the
    # two counts force a plan (both or neither): split the last tiles into pieces. Calls that
    # do not run the Hopper kernel, or carry tags or a block multiplier, never split.
    "tail_split": _FLAG, "tail_split_tiles": ("an int in [0, 2**31)", _int_in(0, 2**31 - 1)),
    "tail_split_pieces": ("an int in [2, 64]", _int_in(2, 64)),
}


def _validate_kernel_options(options) -> Optional[dict]:
    """The options checked, integer-like values as Python ints (what the launches expect)."""
    if options is None:
        return None
    if not isinstance(options, dict):
        raise TypeError(f"kernel_options must be a dict, got {type(options).__name__}")
    checked = {}
    for name, value in options.items():
        if name not in KERNEL_OPTIONS:
            raise ValueError(f"kernel_options: unknown option {name!r}; known: {sorted(KERNEL_OPTIONS)}")
        expected, ok = KERNEL_OPTIONS[name]
        if not ok(value):
            raise ValueError(f"kernel_options[{name!r}] must be {expected}, got {value!r}")
        checked[name] = value if isinstance(value, bool) or value is None else as_integer(value)
    forced = [name for name in ("tail_split_tiles", "tail_split_pieces") if name in checked]
    if len(forced) == 1:
        raise ValueError("kernel_options: tail_split_tiles and tail_split_pieces force a split together; "
                         f"got only {forced[0]}")
    return checked


def _validate_pairs(pairs, b, device):
    if pairs is None:
        return None
    if not isinstance(pairs, torch.Tensor):
        if not isinstance(pairs, (list, tuple)) or not all(isinstance(pair, (list, tuple, torch.Tensor))
                                                           for pair in pairs):
            raise TypeError(f"pair_stats must be a list of (b0, b1) pairs or a [P, 2] tensor (one pair: [(b0, b1)]), "
                            f"got {pairs!r}")
        if len({len(pair) for pair in pairs}) > 1:
            raise ValueError(f"pair_stats: every pair must hold two batch indices, got {pairs!r}")
        # Integers only: as_tensor(..., int64) would truncate 1.7 to 1 (and True is no index).
        pairs_list = [[as_integer(i) for i in pair] for pair in pairs]
        if any(i is None for pair in pairs_list for i in pair):
            raise TypeError(f"pair_stats must hold integer batch indices, got {pairs!r}")
        pairs = pairs_list
    t = pairs if isinstance(pairs, torch.Tensor) else torch.as_tensor(pairs, dtype=torch.int64)
    check_data_tensor(t, "pair_stats")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"pair_stats must hold integer batch indices, got {t.dtype}")
    if t.dim() != 2 or t.shape[1] != 2 or t.shape[0] < 1:
        raise ValueError(f"pair_stats must be a list of (b0, b1) pairs / a [P, 2] tensor, got shape {tuple(t.shape)}")
    t = t.to(device="cpu", dtype=torch.int64)
    if (t < 0).any() or (t >= b).any():
        raise ValueError(f"pair_stats indices must lie in [0, {b}), got {t.tolist()}")
    # Kept on the host: the launcher reads the rows as scalars, and a host-to-device copy
    # here would synchronize the stream on every call.
    return t


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
        scale: score scale, default ``1/sqrt(D)``.
        tags: ``(q_tags, k_tags)`` int32/int64 bit sets of shape ``[B, Nq]``/``[B, Nk]``
            (or ``[1, N]`` / ``[N]``, shared by the batch), or a prebuilt :func:`tag_mask`. Query ``i``
            may attend key ``j`` iff ``q_tags[i] & k_tags[j] != 0``. Tiles with no allowed
            pair are skipped. A query with no allowed key gets a zero output and LSE -inf.
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
            products instead of tf32), ``warp_specialize`` (Triton's automatic warp
            specialization), ``hopper`` (unset: on an H100-class GPU (sm_90), fp16/bf16
            calls at head_dim 128 (and at 64 with at least 16384 keys) with no value probes or
            tile counts run the
            warp-specialized Gluon kernel of ``iidkern/kernels/hopper_fwd.py``, which also
            skips and masks tag tiles, accumulates the fused key-group probe and applies a
            block multiplier, except calls without extras on fewer than 1024 keys, which are
            faster on the Triton kernel's 64 x 64 tiles; ``True`` sends those to the Gluon
            kernel too, ``False`` keeps every call on the Triton kernel; naming a
            main-pass option above, ``kg_split``, ``mult_split`` or ``kg_half_dot`` also
            selects the Triton kernel), ``tail_split`` (default True: on the Gluon kernel, a
            grid's partial last wave runs its last query tiles as pieces over key ranges,
            joined by a small pass; calls without tags or a block multiplier), and
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
            and not return_lse and not count_tiles and type(probes) in (tuple, list) and not probes:
        signature = _plain_signature(q, k, v, layout, scale, backend, kernel_options)
        replay = _REPLAYS.get(signature) if signature is not None else None
        if replay is not None:  # this signature passed the checks below on its first call
            with _on_device(q.device):
                return replay(q, k, v)

    if layout not in ("bhnd", "bnhd"):
        raise ValueError(f"layout must be 'bhnd' or 'bnhd', got {layout!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    b, h, nq, nk, d = _validate_qkv(q, k, v, layout)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    device = q.device
    mask = _validate_tags(tags, b, nq, nk, device)
    head_weights = _validate_head_weights(head_weights, b, h, nq, device)
    probes = _validate_probes(probes, b, h, nq, nk, device)
    block_multiplier = _validate_multiplier(block_multiplier, b, h, nq, nk, device)
    pairs = _validate_pairs(pair_stats, b, device)
    kernel_options = _validate_kernel_options(kernel_options)
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
                raise ValueError(f"backend='triton' needs CUDA tensors (CPU ones under Triton's interpreter), "
                                 f"got {device}; use backend='reference'")
            if device.type != "cuda" and not kernels.INTERPRETING:
                why = kernels.INTERPRETER_UNAVAILABLE or "on CPU set TRITON_INTERPRET=1 before importing iidkern"
                raise ValueError(f"backend='triton' needs CUDA tensors (got {device}); {why}, or use backend='reference'")
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
