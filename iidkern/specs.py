"""Plain data that describes what an attention call should compute besides its output.

Everything here is declarative (in the spirit of FlexAttention's mask/score API): a spec
says *what* to reduce or mask, the backends in ``iidkern.kernels`` / ``iidkern.reference``
decide *how*. Nothing in this module launches a kernel.

Vocabulary
----------
* **Token groups** (:class:`TokenGroups`): one side (queries or keys) of a probe. Either
  "each token of a range is its own group" (``TokenGroups.each(start, stop)``), or an int
  group id per token with ``-1`` meaning "not probed" (``TokenGroups.ids(...)``).
* **Probe** (:class:`Probe`): ``out[b, h, gq, gk] = sum_{q in gq} sum_{k in gk} A_h[q, k]``
  where ``A_h = softmax(Q_h K_h^T * scale + mask)`` is the exact, normalized, masked
  attention of head ``h`` (before head weights or a block multiplier touch the output).
* **Value probe** (:class:`ValueProbe`): ``out[b, h, gq, c] = sum_{q in gq} (A_h @ x)[q, c]``
  for a small per-key signal ``x`` of shape ``[B, Nk, C]`` (``C <= 16``).
* **Token tags**: an int bit set per query and per key; query ``i`` may attend key ``j``
  iff ``q_tags[i] & k_tags[j] != 0``. :func:`instruction_tags` builds them for IID.
* **Block multiplier** (:class:`BlockMultiplier`): a post-softmax multiplier on one
  query-range x key-range sub-block, ``out = sum_k (M p)_k v_k / sum_k p_k``.
"""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

HeadReduction = Union[str, torch.Tensor]  # "mean" | "sum" | "keep" | per-head weights
_HEAD_MODES = ("mean", "sum", "keep")
_NORMALIZE_MODES = (None, "queries", "keys", "both")
MAX_VALUE_PROBE_CHANNELS = 16


# --------------------------------------------------------------------------- token groups
@dataclass(frozen=True)
class TokenGroups:
    """One side of a probe: which tokens are probed and how they are grouped.

    Build with :meth:`each`, :meth:`ids`, :meth:`single` or :meth:`segments`; do not fill
    the fields by hand.
    """

    kind: str  # "each" | "ids"
    start: int = 0  # "each": first token; "ids": first token that may carry an id >= 0
    stop: int = 0  # "each": one past the last token; "ids": one past the last such token
    group_ids: Optional[torch.Tensor] = None  # "ids": [B, N] or [N] integer, -1 = not probed
    count: int = 0  # number of groups

    @staticmethod
    def each(start: int, stop: int) -> "TokenGroups":
        """Every token in ``[start, stop)`` is its own group (group ``t - start``)."""
        start, stop = index_arg(start, "TokenGroups.each: start"), index_arg(stop, "TokenGroups.each: stop")
        if start < 0 or stop <= start:
            raise ValueError(f"TokenGroups.each: expected 0 <= start < stop, got start={start}, stop={stop}")
        return TokenGroups(kind="each", start=start, stop=stop, count=stop - start)

    @staticmethod
    def ids(group_ids: torch.Tensor, num_groups: Optional[int] = None,
            span: Optional[Tuple[int, int]] = None) -> "TokenGroups":
        """An int group id per token (``[B, N]`` or ``[N]``), ``-1`` = not probed.

        ``num_groups`` defaults to ``max(id) + 1`` and ``span`` (the token range holding
        every id >= 0, which bounds the kernel's loop) to the tight range; both defaults
        read the ids on the host, so pass them to avoid a device synchronization. Ids on the
        CPU are checked against both (a ValueError names what is out of range); ids on a GPU
        are not (the check would synchronize): there an id outside ``[0, num_groups)`` or a
        token outside ``span`` is simply not probed, by every backend.
        """
        if not isinstance(group_ids, torch.Tensor):
            raise TypeError(f"TokenGroups.ids: group_ids must be a torch.Tensor, got {type(group_ids).__name__}")
        check_data_tensor(group_ids, "TokenGroups.ids: group_ids")
        if group_ids.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"TokenGroups.ids: group_ids must have an integer dtype, got {group_ids.dtype}")
        if group_ids.dim() not in (1, 2) or group_ids.shape[-1] == 0:
            raise ValueError(f"TokenGroups.ids: group_ids must have shape [N] or [B, N] with N >= 1, "
                             f"got {tuple(group_ids.shape)}")
        if num_groups is None or span is None:
            probed = (group_ids >= 0).reshape(-1, group_ids.shape[-1]).any(0)
            where = torch.nonzero(probed).flatten()
            if num_groups is None:
                num_groups = int(group_ids.max().item()) + 1 if where.numel() else 0
            if span is None:
                span = (int(where[0]), int(where[-1]) + 1) if where.numel() else (0, 0)
        num_groups = index_arg(num_groups, "TokenGroups.ids: num_groups")
        if num_groups < 1:
            raise ValueError(f"TokenGroups.ids: need at least one group (an id >= 0), got num_groups={num_groups}")
        if num_groups > 2**31 - 1:  # the kernels read ids as int32
            raise ValueError(f"TokenGroups.ids: num_groups must be at most 2**31 - 1, got {num_groups}")
        if not isinstance(span, (tuple, list)) or len(span) != 2:
            raise ValueError(f"TokenGroups.ids: span must be a (start, stop) pair, got {span!r}")
        start, stop = index_arg(span[0], "TokenGroups.ids: span start"), index_arg(span[1], "TokenGroups.ids: span stop")
        if start < 0 or stop < start or stop > group_ids.shape[-1]:
            raise ValueError(f"TokenGroups.ids: span must satisfy 0 <= start <= stop <= N={group_ids.shape[-1]}, got {span}")
        if group_ids.device.type == "cpu" and group_ids.numel():
            low, high = int(group_ids.min()), int(group_ids.max())
            if low < -1 or high >= num_groups:
                raise ValueError(f"TokenGroups.ids: ids must lie in [-1, num_groups={num_groups}), "
                                 f"got values in [{low}, {high}]")
            probed = (group_ids >= 0).reshape(-1, group_ids.shape[-1]).any(0)
            outside = torch.nonzero(probed[:start]).numel() + torch.nonzero(probed[stop:]).numel()
            if outside:
                raise ValueError(f"TokenGroups.ids: {outside} token(s) with an id >= 0 lie outside span={(start, stop)}")
        return TokenGroups(kind="ids", start=start, stop=stop, group_ids=group_ids, count=num_groups)

    @staticmethod
    def single(start: int, stop: int, length: int) -> "TokenGroups":
        """All tokens in ``[start, stop)`` form one group (e.g. a column mean over image queries)."""
        return TokenGroups.segments([(start, stop)], length)

    @staticmethod
    def segments(ranges: Sequence[Tuple[int, int]], length: int, device=None) -> "TokenGroups":
        """Group ``i`` is the token range ``ranges[i]``; other tokens are not probed.

        Ranges may not overlap (a token has one group id); use several probes otherwise.
        ``ranges`` may be any iterable of ``(start, stop)`` pairs (read once); one range is
        ``[(start, stop)]``. The ids are built and checked on the host (no device
        synchronization) and, with ``device``, copied there asynchronously.
        """
        length = index_arg(length, "TokenGroups.segments: length")
        if length < 1:
            raise ValueError(f"TokenGroups.segments: length must be >= 1, got {length}")
        ranges = range_list(ranges, "TokenGroups.segments: ranges", "TokenGroups.segments: range")
        device = device_arg(device, "TokenGroups.segments: device")
        if len(ranges) == 0:
            raise ValueError("TokenGroups.segments: ranges must hold at least one (start, stop) range, got none")
        ids = torch.full((length,), -1, dtype=torch.int32)
        lo, hi = length, 0
        for i, (a, b) in enumerate(ranges):
            a, b = index_arg(a, f"TokenGroups.segments: range {i} start"), index_arg(b, f"TokenGroups.segments: range {i} stop")
            if not 0 <= a < b <= length:
                raise ValueError(f"TokenGroups.segments: range {i}={(a, b)} must lie in [0, {length}) and be non-empty")
            if (ids[a:b] >= 0).any():
                raise ValueError(f"TokenGroups.segments: range {i}={(a, b)} overlaps an earlier range")
            ids[a:b] = i
            lo, hi = min(lo, a), max(hi, b)
        if device is not None:
            ids = ids.to(device, non_blocking=True)
        return TokenGroups.ids(ids, num_groups=len(ranges), span=(lo, hi))

    # ---- helpers shared by the backends
    def dense_ids(self, batch: int, length: int, device) -> torch.Tensor:
        """Group id per token as an ``[B, N]`` int32 tensor (``-1`` = not probed)."""
        if self.kind == "each":
            ids = torch.full((length,), -1, dtype=torch.int32, device=device)
            ids[self.start:self.stop] = torch.arange(self.count, dtype=torch.int32, device=device)
            return ids.expand(batch, length)
        # Kept on this object like group_sizes (a per-call probe pays it once): ``group_ids``
        # must not change in place afterwards.
        return self._cached("_dense_cache", batch, length, device, lambda: self._probed_ids(batch, length, device))

    def _probed_ids(self, batch: int, length: int, device) -> torch.Tensor:
        ids = self.group_ids.to(device=device, dtype=torch.int32)
        ids = ids.expand(batch, length) if ids.dim() == 1 else ids
        # As the kernels read them: ids outside [0, count) or tokens outside the span are
        # not probed (device ids are not checked at construction: that would synchronize).
        tokens = torch.arange(length, device=device)
        probed = (ids >= 0) & (ids < self.count) & (tokens >= self.start) & (tokens < self.stop)
        return torch.where(probed, ids, -1)

    def group_sizes(self, batch: int, length: int, device) -> torch.Tensor:
        """Number of tokens per group, ``[B, G]`` float32.

        Computed once per (batch, length, device) and kept on this object: a probe that is
        built once and reused (the usual case in a policy) normalizes without extra kernels.
        Like the object itself, ``group_ids`` must not change in place afterwards.
        """
        return self._cached("_sizes_cache", batch, length, device,
                            lambda: self._count_group_sizes(batch, length, device))

    def size_divisors(self, batch: int, length: int, device) -> torch.Tensor:
        """What ``normalize`` divides a group's sum by: ``max(size, 1)`` (an empty group's
        zero sum stays zero), ``[B, G]`` float32, kept on this object like group_sizes."""
        return self._per_group("_divisors_cache", batch, length, device, lambda sizes: sizes.clamp_min(1))

    def inverse_sizes(self, batch: int, length: int, device) -> torch.Tensor:
        """``1 / size_divisors``: the fused key-group probe multiplies its sums by it in the
        kernel's epilogue, so a normalized probe costs no kernel after the attention."""
        return self._per_group("_inverse_cache", batch, length, device, lambda sizes: 1.0 / sizes.clamp_min(1))

    def _per_group(self, name: str, batch: int, length: int, device, derive) -> torch.Tensor:
        """``derive(group sizes)``, kept on this object. Host-built ids (segments, single) bound
        for a GPU are counted and derived on the host and copied, so a policy that rebuilds
        its groups every call launches no kernels for them."""
        if self.kind != "each" and self.group_ids.device.type == "cpu" and torch.device(device).type != "cpu":
            return self._cached(name, batch, length, device,
                                lambda: derive(self.group_sizes(batch, length, "cpu")).to(device, non_blocking=True))
        return self._cached(name, batch, length, device, lambda: derive(self.group_sizes(batch, length, device)))

    def _cached(self, name: str, batch: int, length: int, device, make):
        cache = self.__dict__.setdefault(name, {})
        key = (batch, length, str(device))
        if key in cache:
            return cache[key]
        value = make()
        from .kernels.fast_launch import capturing  # (the kernels import this module)
        if not capturing(value):  # built in a CUDA graph capture, it holds values only once the graph replays
            cache[key] = value
        return value

    def _count_group_sizes(self, batch: int, length: int, device) -> torch.Tensor:
        if self.kind == "each":
            return torch.ones(batch, self.count, dtype=torch.float32, device=device)
        ids = self.dense_ids(batch, length, device).long()
        sizes = torch.zeros(batch, self.count + 1, dtype=torch.float32, device=device)
        sizes.scatter_add_(1, torch.where(ids >= 0, ids, self.count), torch.ones_like(ids, dtype=sizes.dtype))
        return sizes[:, : self.count]


def _check_heads(heads, where: str):
    if isinstance(heads, str):
        if heads not in _HEAD_MODES:
            raise ValueError(f"{where}: heads must be one of {_HEAD_MODES} or a tensor of per-head weights, got {heads!r}")
    elif isinstance(heads, torch.Tensor):
        check_data_tensor(heads, f"{where}: heads")
        if heads.dim() not in (1, 2):
            raise ValueError(f"{where}: heads (per-head weights) must have shape [H] or [B, H], got {tuple(heads.shape)}")
        if not heads.is_floating_point():
            raise TypeError(f"{where}: heads (per-head weights) must be floating point, got {heads.dtype}")
    else:
        raise TypeError(f"{where}: heads must be a str or a torch.Tensor, got {type(heads).__name__}")


# --------------------------------------------------------------------------- host-side reductions
def uniform_head_coefficient(heads: str, num_heads: int) -> float:
    """The weight every head gets under a named head mode (``"keep"`` keeps each head as is)."""
    return 1.0 / num_heads if heads == "mean" else 1.0


def head_coefficients(heads, batch: int, num_heads: int, dtype, device) -> Optional[torch.Tensor]:
    """Per-(batch, head) weights of a head reduction, ``[B, H]``; ``None`` for ``"keep"``."""
    if isinstance(heads, str):
        if heads == "keep":
            return None
        return torch.full((batch, num_heads), uniform_head_coefficient(heads, num_heads), dtype=dtype, device=device)
    w = heads.to(device=device, dtype=dtype)
    return w.expand(batch, num_heads) if w.dim() == 1 else w


def reduce_heads(per_head: torch.Tensor, heads) -> torch.Tensor:
    """Apply a head reduction to a ``[B, H, ...]`` tensor (a reduced head dim stays, as 1)."""
    if isinstance(heads, str) and heads != "keep":
        # One reduction kernel, no [B, H] weight tensor to build (this runs on every probe call).
        return per_head.mean(1, keepdim=True) if heads == "mean" else per_head.sum(1, keepdim=True)
    coef = head_coefficients(heads, per_head.shape[0], per_head.shape[1], per_head.dtype, per_head.device)
    if coef is None:
        return per_head
    coef = coef.reshape(coef.shape + (1,) * (per_head.dim() - 2))
    return (per_head * coef).sum(1, keepdim=True)


def normalize_groups(out: torch.Tensor, queries: TokenGroups, keys: Optional[TokenGroups],
                     normalize: Optional[str], n_q: int, n_k: int) -> torch.Tensor:
    """Divide a ``[B, H, Gq, Gk]`` probe result by query and/or key group sizes (groups of
    one token, ``TokenGroups.each``, leave it as it is)."""
    b = out.shape[0]
    if normalize in ("queries", "both") and queries.kind != "each":
        out = out / queries.size_divisors(b, n_q, out.device).to(out.dtype)[:, None, :, None]
    if normalize in ("keys", "both") and keys.kind != "each":
        out = out / keys.size_divisors(b, n_k, out.device).to(out.dtype)[:, None, None, :]
    return out


# --------------------------------------------------------------------------- probes
@dataclass(frozen=True)
class Probe:
    """A grouped reduction of the attention probabilities (see module docstring).

    ``heads``: ``"mean"`` / ``"sum"`` over heads (output head dim 1), ``"keep"`` (output
    head dim H), or a ``[H]`` / ``[B, H]`` tensor of weights for a weighted sum (head dim 1).
    ``normalize``: divide by the query group sizes, the key group sizes, or both.
    Result: float32 ``[B, H or 1, Gq, Gk]``.
    """

    queries: TokenGroups
    keys: TokenGroups
    heads: HeadReduction = "mean"
    normalize: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.queries, TokenGroups) or not isinstance(self.keys, TokenGroups):
            raise TypeError("Probe: queries and keys must be TokenGroups (use TokenGroups.each / TokenGroups.ids)")
        _check_heads(self.heads, "Probe")
        if self.normalize not in _NORMALIZE_MODES:
            raise ValueError(f"Probe: normalize must be one of {_NORMALIZE_MODES}, got {self.normalize!r}")


@dataclass(frozen=True)
class ValueProbe:
    """Propagate a small per-key signal through attention: ``A_h @ x`` summed over query groups.

    ``x``: ``[B, Nk, C]`` (or ``[Nk, C]``), ``C <= 16``. Result: float32 ``[B, H or 1, Gq, C]``.
    With ``x`` the one-hot of key groups this equals a :class:`Probe` with grouped keys.
    """

    x: torch.Tensor
    queries: TokenGroups
    heads: HeadReduction = "mean"
    normalize: Optional[str] = None  # None | "queries"

    def __post_init__(self):
        if not isinstance(self.x, torch.Tensor):
            raise TypeError(f"ValueProbe: x must be a torch.Tensor, got {type(self.x).__name__}")
        check_data_tensor(self.x, "ValueProbe: x")
        if self.x.dim() not in (2, 3):
            raise ValueError(f"ValueProbe: x must have shape [B, Nk, C] or [Nk, C], got {tuple(self.x.shape)}")
        if not 1 <= self.x.shape[-1] <= MAX_VALUE_PROBE_CHANNELS:
            raise ValueError(f"ValueProbe: x must have 1..{MAX_VALUE_PROBE_CHANNELS} channels, got C={self.x.shape[-1]}")
        if not self.x.is_floating_point():
            raise TypeError(f"ValueProbe: x must be floating point, got {self.x.dtype}")
        if not isinstance(self.queries, TokenGroups):
            raise TypeError("ValueProbe: queries must be TokenGroups")
        _check_heads(self.heads, "ValueProbe")
        if self.normalize not in (None, "queries"):
            raise ValueError(f"ValueProbe: normalize must be None or 'queries', got {self.normalize!r}")


def scalar_dtype_kind(x) -> Optional[str]:
    """For a numpy or torch value: ``"b"`` (bool), ``"i"`` (integer), ``"f"`` (real
    floating), ``"c"`` (complex) or ``"x"`` (anything else: strings, dates), and ``"n"``
    for an array or tensor that is not 0-d; None for other objects."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return None
    if getattr(x, "ndim", 0) != 0:
        return "n"
    if isinstance(dtype, torch.dtype):
        if dtype == torch.bool:
            return "b"
        if dtype.is_complex:
            return "c"
        return "f" if dtype.is_floating_point else "i"
    kind = getattr(dtype, "kind", "x")  # numpy: b, i/u, f, c, U/S/M/m/O ...
    return {"b": "b", "i": "i", "u": "i", "f": "f", "c": "c"}.get(kind, "x")


def as_integer(x) -> Optional[int]:
    """``x`` as an int if it is an integer (Python, numpy, 0-d tensor) and not a bool, else None
    (a bool tensor or a tensor of one element but more dims is no index either)."""
    if isinstance(x, bool):
        return None
    if type(x) is int:
        return x
    if scalar_dtype_kind(x) not in (None, "i"):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def as_real(x) -> Optional[float]:
    """``x`` as a float if it is a real number (Python, numpy, 0-d tensor; not a bool, a
    complex, a string or date array), else None. Too large for a float: ``inf``."""
    if isinstance(x, bool):
        return None
    kind = scalar_dtype_kind(x)
    if kind is None and not isinstance(x, numbers.Real):
        return None
    if kind not in (None, "i", "f"):
        return None
    try:
        return float(x)
    except OverflowError:
        return math.inf if x > 0 else -math.inf
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a meta tensor has no value
        return None


def check_data_tensor(t: torch.Tensor, what: str) -> None:
    """A tensor whose values a call reads (tags, group ids, weights, multipliers): dense
    (strided) and holding data, else an error naming ``what`` (torch's own would not)."""
    if t.layout != torch.strided:
        raise TypeError(f"{what} must be a dense (strided) tensor, got layout {t.layout}")
    if t.device.type == "meta":
        raise ValueError(f"{what} is a meta tensor (no values); pass a CPU or CUDA tensor")
    check_not_negated_view(t, what)


def check_not_negated_view(t: torch.Tensor, what: str) -> None:
    """Refuse a view with PyTorch's lazy negation bit (``z.conj().imag``): its memory holds the
    negated values, which the kernels would read as they are."""
    if t.is_neg():
        name = what.split(": ")[-1]  # "ValueProbe: x" -> "x"
        raise TypeError(f"{what} is a lazily negated view (such as z.conj().imag), whose memory holds -{name}; "
                        f"pass {name}.resolve_neg()")


def index_arg(x, what: str) -> int:
    """A token index, count or bit set as an int; a TypeError naming ``what`` otherwise
    (``int(2.7)`` would silently truncate a float to 2)."""
    i = as_integer(x)
    if i is None:
        raise TypeError(f"{what} must be an integer, got {x!r} ({type(x).__name__})")
    return i


def is_sequence(x) -> bool:
    """Iterable and not a string (read letter by letter), a number or a 0-d array/tensor."""
    return not isinstance(x, (str, bytes)) and getattr(x, "ndim", 1) != 0 and hasattr(x, "__iter__")


_RANGE_KINDS = {2: "pair", 3: "triple"}


def range_items(value, what: str, form: str = "(start, stop)") -> tuple:
    """The items of one range ``form`` (a tuple, list, 1-D array or tensor of as many
    items); a TypeError naming ``what`` and showing the value otherwise (a bare int, a
    string, a triple where a pair is expected)."""
    size = form.count(",") + 1
    expected = f"a {form} {_RANGE_KINDS[size]}"
    if not is_sequence(value):
        raise TypeError(f"{what} must be {expected}, got {value!r} ({type(value).__name__})")
    items = tuple(value)
    if len(items) != size:
        raise TypeError(f"{what} must be {expected}, got {value!r} (length {len(items)})")
    return items


def range_list(value, what: str, item: str, form: str = "(start, stop)") -> list:
    """A sequence of ranges (any iterable, a generator included: read once) as a list of
    tuples (:func:`range_items`); ``what`` names the argument, ``item`` one range
    (``f"{item} {i}"``). A bare range (``(3, 4)`` for ``[(3, 4)]``) is refused."""
    expected = f"a sequence of {form} {_RANGE_KINDS[form.count(',') + 1]}s"
    if not is_sequence(value):
        raise TypeError(f"{what} must be {expected}, got {value!r} ({type(value).__name__})")
    items = list(value)
    shown = value if isinstance(value, (list, tuple)) else items
    for i, x in enumerate(items):
        if not is_sequence(x):
            raise TypeError(f"{what} must be {expected} (one range: [{form}]), got {shown!r}: "
                            f"item {i} is {x!r} ({type(x).__name__})")
    return [range_items(x, f"{item} {i}", form) for i, x in enumerate(items)]


def size_arg(x, what: str) -> int:
    """A tensor size (batch, token count) as an int >= 1 (a TypeError / ValueError naming ``what``)."""
    n = index_arg(x, what)
    if n < 1:
        raise ValueError(f"{what} must be >= 1, got {n}")
    return n


def device_arg(device, what: str) -> Optional[torch.device]:
    """``None`` or a ``torch.device`` (from a string, an index or a device); an error naming
    ``what`` where torch's own (a RuntimeError listing device types) would not."""
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        exc = ValueError if isinstance(device, (str, int)) else TypeError
        raise exc(f"{what} must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None


# --------------------------------------------------------------------------- multiplier
@dataclass(frozen=True)
class BlockMultiplier:
    """Post-softmax multiplier on the sub-block ``[query_start, +Mq) x [key_start, +Mk)``.

    ``values``: ``[B, Mq, Mk]`` (shared by heads) or ``[B, H, Mq, Mk]``. Outside the
    sub-block the multiplier is 1. The softmax normalizer is not changed.
    """

    values: torch.Tensor
    query_start: int = 0
    key_start: int = 0

    def __post_init__(self):
        # The kernels take the starts as integers: a numpy or 0-d tensor integer is one, a
        # float is not (it would reach the kernel's pointer arithmetic).
        for name in ("query_start", "key_start"):
            value = getattr(self, name)
            n = as_integer(value)
            if n is None:
                raise TypeError(f"BlockMultiplier.{name} must be an integer, got {value!r} ({type(value).__name__})")
            object.__setattr__(self, name, n)


# --------------------------------------------------------------------------- pair statistics
@dataclass
class PairStats:
    """Per (pair, head) statistics of two batch rows' attention outputs, float32 ``[P, H]``.

    ``dot = <O_b0,h, O_b1,h>``, ``norm0_sq = ||O_b0,h||^2``, ``norm1_sq = ||O_b1,h||^2``,
    summed over all query tokens and channels. The three are floating-point tensors of one
    shape ``[P, H]`` on one device (checked at construction and by :func:`iidkern.router_weights`).
    """

    dot: torch.Tensor
    norm0_sq: torch.Tensor
    norm1_sq: torch.Tensor

    def __post_init__(self):
        self.check("PairStats")

    def check(self, where: str) -> None:
        """Types, dtypes, shapes and devices (no values: that would synchronize a GPU)."""
        fields = {name: getattr(self, name) for name in ("dot", "norm0_sq", "norm1_sq")}
        for name, t in fields.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{where}: {name} must be floating point, got {t.dtype}")
        shapes = {name: tuple(t.shape) for name, t in fields.items()}
        if len(set(shapes.values())) != 1 or self.dot.dim() != 2:
            raise ValueError(f"{where}: dot, norm0_sq and norm1_sq must share one shape [P, H], got {shapes}")
        devices = {name: str(t.device) for name, t in fields.items()}
        if len(set(devices.values())) != 1:
            raise ValueError(f"{where}: dot, norm0_sq and norm1_sq must be on one device, got {devices}")

    def cosine(self) -> torch.Tensor:
        """``dot / (||O_b0,h|| * ||O_b1,h||)`` per (pair, head), 0 where a norm is 0; in the stats'
        dtype, at least float32. Computed in float64 as a product of the two norms: a cosine
        does not depend on the outputs' scale, while the product of two squared norms
        overflows float32 past ~1.8e19 each (float16 past ~256), and a fixed floor on it
        would bend small ones."""
        dot, n0, n1 = (t.double() for t in (self.dot, self.norm0_sq, self.norm1_sq))
        norms = n0.sqrt() * n1.sqrt()
        nonzero = norms > 0
        s = torch.where(nonzero, dot / torch.where(nonzero, norms, torch.ones_like(norms)), torch.zeros_like(dot))
        return s.to(torch.promote_types(self.dot.dtype, torch.float32))


# --------------------------------------------------------------------------- result
@dataclass
class AttentionResult:
    """What :func:`iidkern.attention` returns when more than the output is asked for."""

    out: torch.Tensor
    lse: Optional[torch.Tensor] = None  # [B, H, Nq] float32, natural log, -inf on rows with no allowed key
    probes: Tuple[torch.Tensor, ...] = ()  # one per probe, in the order given
    pair_stats: Optional[PairStats] = None
    tiles_visited: Optional[torch.Tensor] = None  # [B, H, query tiles] int32, triton backend, count_tiles=True
    tile_shape: Optional[Tuple[int, int]] = None  # (BLOCK_M, BLOCK_N) the counts refer to


# --------------------------------------------------------------------------- tags
ALL_BITS = -1  # int64 with every bit set: a key every query sees / a query that sees every key


def tags_from_segments(length: int, segments: Sequence[Tuple[int, int, int]], *, batch: int = 1,
                       default: int = 0, device=None) -> torch.Tensor:
    """Build ``[B, N]`` int64 tags: tokens in ``[start, stop)`` get bit set ``bits`` OR-ed in.

    ``segments``: any iterable of ``(start, stop, bits)`` triples (read once); ``batch`` and
    ``length`` are >= 1."""
    batch, length = size_arg(batch, "tags_from_segments: batch"), size_arg(length, "tags_from_segments: length")
    segments = range_list(segments, "tags_from_segments: segments", "tags_from_segments: segment",
                          "(start, stop, bits)")
    device = device_arg(device, "tags_from_segments: device")
    tags = torch.full((batch, length), _bit_set(default, "tags_from_segments: default"), dtype=torch.int64,
                      device=device)
    for i, (start, stop, bits) in enumerate(segments):
        start = index_arg(start, f"tags_from_segments: segment {i} start")
        stop = index_arg(stop, f"tags_from_segments: segment {i} stop")
        if not 0 <= start <= stop <= length:
            raise ValueError(f"tags_from_segments: segment {i}={(start, stop)} must lie in [0, {length}]")
        tags[:, start:stop] |= _bit_set(bits, f"tags_from_segments: segment {i} bits")
    return tags


def _bit_set(bits, what: str) -> int:
    """An int64 bit set: an integer in [-2^63, 2^64); values >= 2^63 are the bits of a
    negative int64 (ALL_BITS is -1)."""
    bits = index_arg(bits, what)
    if not -(1 << 63) <= bits < (1 << 64):
        raise ValueError(f"{what} must fit in 64 bits, got {bits}")
    return bits - (1 << 64) if bits >= (1 << 63) else bits


def instruction_tags(length: int, *, image: Tuple[int, int], instructions: Sequence[Tuple[int, int]],
                     region_masks: torch.Tensor, background: str = "none",
                     always_visible: Sequence[Tuple[int, int]] = (), device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Query/key tags for IID's masked joint attention (METHODS.md, IID step 5).

    Allow table (``i`` is an instruction, ``IMG`` a bit every image token carries):

    * image token in region ``M_i`` <-> text of instruction ``P_i`` (both ways);
      overlapping regions see the union of their instructions;
    * ``P_i`` sees ``P_i`` and every image token, never ``P_k``;
    * image sees all image;
    * background image tokens see no instruction (``background="none"``) or every
      instruction (``"all"``);
    * tokens in ``always_visible`` ranges (conditioning: source image, time token, shared
      text) are seen by every query and see every key that carries a bit;
    * tokens in none of these ranges (e.g. text padding) carry no bit: they see nothing
      (zero output, LSE ``-inf``) and no query sees them, always-visible ones included.
      Name them in ``always_visible`` to keep them in play.

    ``image`` is one ``(start, stop)`` pair; ``instructions`` and ``always_visible`` are
    iterables of such pairs (read once; one range is ``[(start, stop)]``). Instruction
    ranges may not overlap each other or the image (a token of text belongs to one
    instruction: a shared token would let ``P_i`` see ``P_k``); ``always_visible`` ranges
    may overlap anything and win. ``region_masks``: bool ``[N_instr, N_img]`` or
    ``[B, N_instr, N_img]`` with ``B >= 1``; at most 62 instructions. Returns
    ``(q_tags, k_tags)`` int64 ``[B, N]``.
    """
    length = index_arg(length, "instruction_tags: length")
    image = range_items(image, "instruction_tags: image")
    instructions = range_list(instructions, "instruction_tags: instructions", "instruction_tags: instruction")
    always_visible = range_list(always_visible, "instruction_tags: always_visible",
                                "instruction_tags: always_visible range")
    device = device_arg(device, "instruction_tags: device")
    n_instr = len(instructions)
    if not 1 <= n_instr <= 62:
        raise ValueError(f"instruction_tags: need 1..62 instructions, got {n_instr}")
    if background not in ("none", "all"):
        raise ValueError(f"instruction_tags: background must be 'none' or 'all', got {background!r}")
    img_lo, img_hi = index_arg(image[0], "instruction_tags: image start"), index_arg(image[1], "instruction_tags: image stop")
    if not 0 <= img_lo < img_hi <= length:
        raise ValueError(f"instruction_tags: image range {(img_lo, img_hi)} must lie in [0, {length})")
    if not isinstance(region_masks, torch.Tensor) or region_masks.dtype != torch.bool:
        # A soft map cast to bool would be "any value > 0": threshold it first.
        raise TypeError(f"instruction_tags: region_masks must be a bool torch.Tensor, got "
                        f"{getattr(region_masks, 'dtype', type(region_masks).__name__)}")
    check_data_tensor(region_masks, "instruction_tags: region_masks")
    masks = region_masks
    if masks.dim() == 2:
        masks = masks.unsqueeze(0)
    if masks.dim() != 3 or masks.shape[0] < 1 or masks.shape[1] != n_instr or masks.shape[2] != img_hi - img_lo:
        raise ValueError(f"instruction_tags: region_masks must have shape [N_instr={n_instr}, N_img={img_hi - img_lo}] "
                         f"or [B >= 1, {n_instr}, {img_hi - img_lo}], got {tuple(region_masks.shape)}")
    device = device if device is not None else masks.device
    masks = masks.to(device=device)
    batch = masks.shape[0]
    img_bit = 1 << 62
    instr_bits = torch.tensor([1 << i for i in range(n_instr)], dtype=torch.int64, device=device)
    all_instr = int(sum(1 << i for i in range(n_instr)))

    q_tags = torch.zeros(batch, length, dtype=torch.int64, device=device)
    k_tags = torch.zeros(batch, length, dtype=torch.int64, device=device)
    seen = []
    for i, (a, b) in enumerate(instructions):
        a, b = index_arg(a, f"instruction_tags: instruction {i} start"), index_arg(b, f"instruction_tags: instruction {i} stop")
        if not 0 <= a < b <= length:
            raise ValueError(f"instruction_tags: instruction {i} range {(a, b)} must lie in [0, {length})")
        if a < img_hi and img_lo < b:  # an instruction's text would also be image: its bits would mix
            raise ValueError(f"instruction_tags: instruction {i} range {(a, b)} overlaps the image range "
                             f"{(img_lo, img_hi)}")
        for j, (c, d) in enumerate(seen):
            if a < d and c < b:  # a shared token would carry both bits: P_i would see P_j
                raise ValueError(f"instruction_tags: instruction ranges {j} {(c, d)} and {i} {(a, b)} overlap")
        seen.append((a, b))
        q_tags[:, a:b] |= (1 << i) | img_bit  # P_i sees P_i and all image
        k_tags[:, a:b] |= 1 << i  # P_i is seen only by holders of bit i
    region_bits = (masks.long() * instr_bits[None, :, None]).sum(1)  # [B, N_img], distinct bits: sum == OR
    if background == "all":
        region_bits = torch.where(region_bits == 0, torch.full_like(region_bits, all_instr), region_bits)
    q_tags[:, img_lo:img_hi] |= region_bits | img_bit
    k_tags[:, img_lo:img_hi] |= img_bit
    for i, (a, b) in enumerate(always_visible):
        a = index_arg(a, f"instruction_tags: always_visible range {i} start")
        b = index_arg(b, f"instruction_tags: always_visible range {i} stop")
        if not 0 <= a <= b <= length:
            raise ValueError(f"instruction_tags: always_visible range {i}={(a, b)} must lie in [0, {length}]")
        q_tags[:, a:b] = ALL_BITS
        k_tags[:, a:b] = ALL_BITS
    return q_tags, k_tags


def allowed_pairs(q_tags: torch.Tensor, k_tags: torch.Tensor) -> torch.Tensor:
    """Dense ``[B, Nq, Nk]`` bool allow table of a tag pair (for tests and small references)."""
    return (q_tags.long().unsqueeze(-1) & k_tags.long().unsqueeze(-2)) != 0
