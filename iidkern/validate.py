"""The argument checks of :func:`iidkern.attention`: every wrong type, shape, dtype, device
or range is a ``TypeError`` / ``ValueError`` naming the argument, the expected and the given
value, before anything is launched (a Triton kernel would crash or read out of bounds).

Each check returns the argument as the call uses it (``None`` where it was not given).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .kernels.flash_fwd import LOG2E
from .kernels.tiles import TagMask
from .specs import MAX_VALUE_PROBE_CHANNELS, BlockMultiplier, Probe, TokenGroups, ValueProbe, as_integer, as_real, \
    check_data_tensor, check_not_negated_view

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TAG_DTYPES = (torch.int32, torch.int64)
MAX_HEAD_DIM = 256


def check_tag_tensors(q_tags, k_tags) -> None:
    for name, t in (("q_tags", q_tags), ("k_tags", k_tags)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tags: {name} must be a torch.Tensor, got {type(t).__name__}")
        check_data_tensor(t, f"tags: {name}")
        if t.dtype not in TAG_DTYPES:
            raise TypeError(f"tags: {name} must be int32 or int64 bit sets, got {t.dtype}")
        if t.dim() not in (1, 2):
            raise ValueError(f"tags: {name} must have shape [B, N] or [N], got {tuple(t.shape)}")
    if q_tags.device != k_tags.device:
        raise ValueError(f"tags: q_tags is on {q_tags.device} but k_tags is on {k_tags.device}")


def shape_of(t: torch.Tensor, layout: str):
    """(B, H, N, D) of a 4-D tensor in the given layout."""
    if layout == "bhnd":
        return tuple(t.shape)
    b, n, h, d = t.shape
    return b, h, n, d


def check_qkv(q, k, v, layout):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D ({'[B, H, N, D]' if layout == 'bhnd' else '[B, N, H, D]'} for "
                             f"layout={layout!r}), got shape {tuple(t.shape)}")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must have a contiguous last (head) dim (stride 1), got strides {t.stride()}")
        check_not_negated_view(t, name)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    bq, hq, nq, dq = shape_of(q, layout)
    bk, hk, nk, dk = shape_of(k, layout)
    bv, hv, nv, dv = shape_of(v, layout)
    if not (bq == bk == bv):
        raise ValueError(f"q, k, v batch sizes differ: q={bq}, k={bk}, v={bv} (layout={layout!r})")
    if not (hq == hk == hv):
        raise ValueError(f"q, k, v head counts differ: q={hq}, k={hk}, v={hv} (layout={layout!r})")
    if nk != nv:
        raise ValueError(f"k and v must have the same number of tokens, got k={nk}, v={nv} (layout={layout!r})")
    if not (dq == dk == dv):
        raise ValueError(f"q, k, v head dims differ: q={dq}, k={dk}, v={dv}")
    if not 1 <= dq <= MAX_HEAD_DIM:
        raise ValueError(f"q, k, v head dim must be in [1, {MAX_HEAD_DIM}], got D={dq}")
    if min(bq, hq, nq, nk) < 1:
        raise ValueError(f"q/k must be non-empty, got B={bq}, H={hq}, Nq={nq}, Nk={nk}")
    return bq, hq, nq, nk, dq


def check_tags(tags, b, nq, nk, device) -> Optional[TagMask]:
    if tags is None:
        return None
    if isinstance(tags, TagMask):
        mask = tags
    elif isinstance(tags, (tuple, list)) and len(tags) == 2:
        check_tag_tensors(tags[0], tags[1])
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


def check_head_weights(w, b, h, nq, device):
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


def _check_groups(g: TokenGroups, n: int, b: int, device, where: str):
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


def _check_probe_heads(heads, b, h, device, where):
    if isinstance(heads, torch.Tensor):
        if tuple(heads.shape) not in ((h,), (b, h)):
            raise ValueError(f"{where}: heads (per-head weights) must have shape [{h}] or [{b}, {h}], "
                             f"got {tuple(heads.shape)}")
        if heads.device != device:
            raise ValueError(f"{where}: heads (per-head weights) are on {heads.device}, expected {device}")


def check_probes(probes, b, h, nq, nk, device):
    if probes is None:  # as the default, ()
        return ()
    if isinstance(probes, (Probe, ValueProbe)):
        probes = (probes,)
    if not isinstance(probes, (tuple, list)):
        raise TypeError(f"probes must be a sequence of Probe / ValueProbe, got {type(probes).__name__}")
    channels = 0
    for i, p in enumerate(probes):
        where = f"probes[{i}]"
        if isinstance(p, Probe):
            _check_groups(p.queries, nq, b, device, where + ".queries")
            _check_groups(p.keys, nk, b, device, where + ".keys")
        elif isinstance(p, ValueProbe):
            _check_groups(p.queries, nq, b, device, where + ".queries")
            x = p.x
            if x.shape[-2] != nk or (x.dim() == 3 and x.shape[0] != b):
                raise ValueError(f"{where}.x must have shape [{b}, {nk}, C] or [{nk}, C], got {tuple(x.shape)}")
            if x.device != device and x.device.type != "cpu":
                raise ValueError(f"{where}.x is on {x.device}, expected {device} or cpu")
            channels += x.shape[-1]
        else:
            raise TypeError(f"{where} must be a Probe or ValueProbe, got {type(p).__name__}")
        _check_probe_heads(p.heads, b, h, device, where)
    if channels > 4 * MAX_VALUE_PROBE_CHANNELS:
        raise ValueError(f"probes: value probes of one call may carry at most {4 * MAX_VALUE_PROBE_CHANNELS} channels "
                         f"in total, got {channels}")
    return tuple(probes)


def check_multiplier(m, b, h, nq, nk, device):
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
    # do not run the Hopper kernel, or carry tags, or at head dim 128 a block multiplier of
    # values other than fp16/bf16, never split.
    "tail_split": _FLAG, "tail_split_tiles": ("an int in [0, 2**31)", _int_in(0, 2**31 - 1)),
    "tail_split_pieces": ("an int in [2, 64]", _int_in(2, 64)),
}


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale as a Python float: ``1 / sqrt(head_dim)`` for ``None``; any real
    number (Python, numpy, a 0-d tensor) that is positive and finite, and whose product with
    log2(e) is a normal float32 number (about 8.2e-39 to 2.4e38: the kernels' exp2 form).
    Anything else is a ValueError naming the argument (a bool, a string, a list, a tensor of
    several values, a meta tensor included: one message for every wrong scale)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    value = as_real(scale)
    if value is None:
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r} ({type(scale).__name__})")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scale must be a positive finite number or None, got {value!r}")
    # The kernels fold log2(e) into the scale in float32: a product that underflows to 0 turns
    # masked scores (-inf * 0) into NaN, one that overflows makes every score inf.
    if not _FP32_NORMAL_MIN <= value * LOG2E <= _FP32_MAX:
        raise ValueError(f"scale must make scale * log2(e) a normal float32 number, i.e. lie in "
                         f"[{_FP32_NORMAL_MIN / LOG2E:.3g}, {_FP32_MAX / LOG2E:.3g}], got {value!r}")
    return value


_FP32_NORMAL_MIN = 2.0 ** -126  # GPUs flush float32 subnormals to zero
_FP32_MAX = 3.4028234663852886e38


def check_kernel_options(options) -> Optional[dict]:
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


def check_pairs(pairs, b, device):
    if pairs is None:
        return None
    if not isinstance(pairs, torch.Tensor):
        if not isinstance(pairs, (list, tuple)) or not all(
                isinstance(pair, (list, tuple)) or (isinstance(pair, torch.Tensor) and pair.dim() == 1)
                for pair in pairs):
            raise TypeError(f"pair_stats must be a list of (b0, b1) pairs or a [P, 2] tensor (one pair: [(b0, b1)]), "
                            f"got {pairs!r}")
        if len({len(pair) for pair in pairs}) > 1:
            raise ValueError(f"pair_stats: every pair must hold two batch indices, got {pairs!r}")
        # Integers only: as_tensor(..., int64) would truncate 1.7 to 1 (and True is no index).
        pairs_list = [[as_integer(i) for i in pair] for pair in pairs]
        if any(i is None for pair in pairs_list for i in pair):
            raise TypeError(f"pair_stats must hold integer batch indices, got {pairs!r}")
        if any(not 0 <= i < b for pair in pairs_list for i in pair):  # also those past int64
            raise ValueError(f"pair_stats indices must lie in [0, {b}), got {pairs_list}")
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
