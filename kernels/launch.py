"""Host side of the Triton backend: pick tile shapes, lay out arguments, launch the kernels.

Arguments arrive validated by ``iidkern.attention``; nothing here re-checks user input.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import torch

from iidkern.specs import AttentionResult, BlockMultiplier, PairStats, Probe, ValueProbe, reduce_heads, \
    head_coefficients, normalize_groups, uniform_head_coefficient

from . import hopper_fwd
from .fast_launch import Launcher, capturing, device_guard
from .flash_fwd import LOG2E, attn_fwd_kernel
from .kernel_args import KeyGroupArgs, MultiplierArgs, scales_p_for_key_groups
from .pair_stats import pair_stats_kernel
from .probe import probe_kernel
from .tiles import TagMask, cdiv, pow2_at_least

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Launches go through cached compiled kernels (see fast_launch.py): ~45 us less host time each (H100 host).
# A length of 1 takes the kernel's generic twin (fast_launch.generic_twin: Triton's unit
# specialization of the main pass read out of bounds on an H200, NOTES.md 80).
_ATTN = Launcher(attn_fwd_kernel, generic_when_one=("n_q", "n_k"))
_PROBE = Launcher(probe_kernel, generic_when_one=("n_q", "n_k"))
_PAIR_STATS = Launcher(pair_stats_kernel, generic_when_one=("n_tokens",))
PROBE_GROUP_BLOCK = 16  # group ids per output tile on a grouped probe side
MAX_VALUE_CHANNELS = 64  # all value probes of one call share one padded side channel
MAX_FUSED_KEY_GROUPS = 32  # a grouped-key probe with at most this many groups rides in the main pass
# Plain calls with fewer keys than this run on the Triton kernel (SHORT_KEYS_CONFIG, or ONE_WAVE_CONFIG below) where
# the Hopper kernel would serve them: its 128-row programs spend a short key loop filling and
# draining their pipeline. H100, bf16, graph replays, Triton time over Hopper time at B=1,
# 24 heads (NOTES.md 45): 0.66x at 300 keys, 0.88x at 768 (Flux 256²), 0.99x at 1024, 1.04x at
# 1152, 1.07x at 1536. More programs narrow the gain (768 keys: 0.94x at B=2, 1.01x at B=4).
HOPPER_MIN_KEYS = 1024
SHORT_KEYS_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
# Short plain calls (up to SHORT_MAX_KEYS keys) whose 64-row tiles make a grid of more than
# two programs an SM but at most three: 64 x 32 tiles under a 168-register cap (64 KB of
# shared memory each) run three programs an SM, so the grid is one wave instead of two. H100,
# bf16, paired graph ratios against cuDNN over 20 shapes (NOTES.md 59): Flux 256² (288
# programs) 1.025x -> 0.99x, 1024 keys at 24 heads (384) Hopper 1.14x -> 1.03x, 48 heads on
# 512 keys 1.11x -> 0.96x; outside that band the 64 x 64 tiles or the Hopper kernel are faster
# (192 programs 0.97x vs 1.08x, 576 programs 1.15x vs 1.19x). With at most two programs an SM
# the 64 x 64 tiles also beat the Hopper kernel at 1024 keys (16 heads: 1.04x vs 1.13x).
ONE_WAVE_CONFIG = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3, maxnreg=168)
SHORT_MAX_KEYS = HOPPER_MIN_KEYS  # the largest key count measured (1024)
# kernel_options that configure the Triton kernel's main pass: naming one selects that kernel
# (the Hopper kernel has none of them, and would silently ignore them).
MAIN_PASS_OPTIONS = frozenset({"BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "maxnreg", "warp_specialize",
                               "kg_split", "mult_split", "kg_half_dot"})


def _poisoned(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _fp32_product_precision(dtype: torch.dtype) -> str:
    """Precision of products of fp32 probabilities (value probes, the fused key-group probe's
    fp32 mode; the probe pass's group folds where they may not take three bf16 products,
    :func:`_fold_split_allowed`).

    fp32 inputs get true fp32 products; half inputs get one tf32 product, far cheaper than
    fp32 FMAs. The tensor cores read an fp32 operand's top 19 bits (a truncation, not a
    rounding): up to 1e-3 a term, biased toward zero (a value probe on one key came out 6e-4
    low on an H200). tf32x3 (three products) measured ~1e-7 but was not verified beside the
    fused key-group probe's fp16 split on the GPU (NOTES.md 74, ``scratch/tf32x3_products.patch``).
    """
    return "ieee" if dtype == torch.float32 or _INTERPRET else "tf32"


# Host cost matters at small shapes (a Flux 256^2 call is ~30 us of GPU work), so the hot
# path uses plain integer helpers (tiles.cdiv / pow2_at_least) and caches what does not change.
_DUMMIES = {}
_UNIT_SCALES = {}  # per device: ones for the key-group columns of a probe without key normalization
# A fused key-group probe's ``normalize``: the kernel's epilogue divides by the key groups'
# sizes (KeyGroupArgs.column_scale) where it names keys; this is what is left to do after it.
_NORMALIZE_AFTER_KERNEL = {"keys": None, "both": "queries"}


def placeholders() -> tuple:
    """Every placeholder tensor made so far; they live as long as the process."""
    return tuple(t for pair in _DUMMIES.values() for t in pair)


def output_allocator(kernel_options: Optional[dict]):
    """How a call allocates its outputs: ``torch.empty``, or NaN-filled with ``poison=True`` (tests)."""
    return _poisoned if (kernel_options or {}).get("poison") else torch.empty


def _dummies(device):
    """One int32 and one fp32 placeholder per device for pointer arguments a launch ignores."""
    key = (device.type, device.index)
    if key not in _DUMMIES:
        _DUMMIES[key] = (torch.empty(1, dtype=torch.int32, device=device),
                         torch.empty(1, dtype=torch.float32, device=device))
    return _DUMMIES[key]


def default_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile shape and launch options for the main kernel (overridable by ``kernel_options``)."""
    return dict(_default_config(head_dim, dtype))


@functools.lru_cache(maxsize=None)
def _default_config(head_dim: int, dtype: torch.dtype) -> dict:
    block_d = max(16, pow2_at_least(head_dim))
    if _INTERPRET:
        # The interpreter runs programs one by one: small tiles keep tests fast and make
        # modest sequence lengths span several tiles.
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if block_d <= 64:
        # H100 sweep: 64x64 beats 128x64 at SD3. Its speed comes from 3 programs per SM
        # (150 registers a thread); tags or key groups push a program past the 168 that
        # allow 3, so the register cap keeps them there (NOTES.md). A multiplier gets no
        # cap (see triton_attention) and is tested per tile: its split range costs more here.
        # Key groups are tested per tile too: under the cap their split range cost 1.23x plain
        # at SD3 against 1.15x for the per-tile test (H100, interleaved A/B, NOTES.md 27).
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, maxnreg=168, mult_split=False,
                    kg_split=False)
    if block_d <= 128:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)


def short_plain_config(batch_heads: int, n_q: int, n_k: int, device: torch.device) -> Optional[dict]:
    """The Triton kernel's launch options for a plain call that the Hopper kernel could serve
    but that runs faster on the Triton kernel's small tiles (short key sequences), or None."""
    sms = _device_sms(device)
    programs = batch_heads * cdiv(n_q, SHORT_KEYS_CONFIG["BLOCK_M"])
    if n_k <= SHORT_MAX_KEYS and 2 * sms < programs <= 3 * sms:
        return ONE_WAVE_CONFIG
    if n_k < HOPPER_MIN_KEYS or (n_k <= SHORT_MAX_KEYS and programs <= 2 * sms):
        return SHORT_KEYS_CONFIG
    return None


def _device_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 0 elsewhere (no wave to fill)."""
    return hopper_fwd.sm_count(hopper_fwd.device_index(device)) if device.type == "cuda" else 0


def _strides_bhn(t: torch.Tensor, layout: str):
    """(batch, head, token) strides of a 4-D tensor in either layout; the channel stride is 1."""
    if layout == "bhnd":
        return t.stride(0), t.stride(1), t.stride(2)
    return t.stride(0), t.stride(2), t.stride(1)


def triton_attention(q, k, v, *, layout: str, scale: float, tags: Optional[TagMask],
                     head_weights: Optional[torch.Tensor], probes: Sequence,
                     block_multiplier: Optional[BlockMultiplier], pair_stats: Optional[torch.Tensor],
                     need_lse: bool, count_tiles: bool, kernel_options: Optional[dict]) -> AttentionResult:
    if layout == "bhnd":
        batch, heads, n_q, head_dim = q.shape
        n_k = k.shape[2]
    else:
        batch, n_q, heads, head_dim = q.shape
        n_k = k.shape[1]
    device = q.device
    hopper = _hopper_serves(q, k, v, layout, tags, probes, count_tiles, kernel_options, block_multiplier)
    plain = tags is None and not probes and head_weights is None and block_multiplier is None and \
        pair_stats is None and not need_lse
    short_cfg = None
    if hopper and plain and (kernel_options or {}).get("hopper") is None:
        short_cfg = short_plain_config(batch * heads, n_q, n_k, device)
    if short_cfg is not None:
        hopper = False  # short keys: the Triton kernel's small tiles (hopper=True keeps the Hopper kernel)
        cfg = dict(short_cfg)
    else:
        cfg = default_config(head_dim, q.dtype)
    cfg.update(kernel_options or {})
    # Tests pass poison=True: outputs start as NaN so an element the kernels never write shows.
    alloc = output_allocator(cfg)
    block_m, block_n = int(cfg["BLOCK_M"]), int(cfg["BLOCK_N"])
    block_d = max(16, pow2_at_least(head_dim))
    out = alloc(q.shape, dtype=q.dtype, device=device)  # contiguous, in the caller's layout
    # fp32 inputs get fp32 products (not tf32), so the backend honours the dtype's precision.
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    qk_scale = scale * LOG2E
    fused = _fused_probe_index(probes, cfg)
    # The probe-pass probes need the row LSE; a fused probe does not.
    store_lse = need_lse or any(isinstance(p, Probe) and i != fused for i, p in enumerate(probes))
    lse = alloc((batch, heads, n_q), dtype=torch.float32, device=device) if store_lse else None
    # One probe with few key groups (IID's image x instruction map) rides in the main pass:
    # per (batch, head, probed query) the sums over each key group, [B, H, rows, G].
    key_groups = _key_group_args(probes[fused], batch, heads, n_k, device, alloc) if fused is not None else None

    # The pair pass's tickets (kernels/pair_stats.py) start at zero: the Hopper kernel zeroes
    # them as it runs; other paths pay for a memset.
    pair_counters = None
    if pair_stats is not None:
        counters_shape = (pair_stats.shape[0], heads)
        pair_counters = (torch.empty if hopper else torch.zeros)(counters_shape, dtype=torch.int32, device=device)
    if hopper:
        # The Hopper kernel needs none of the Triton kernel's launch setup (host time per call).
        hopper_fwd.hopper_attention(
            q, k, v, out, layout=layout, scale=scale, head_weights=head_weights, lse=lse, key_groups=key_groups,
            head_weight_strides=_head_weight_strides(head_weights) if head_weights is not None else (0, 0, 0),
            multiplier=MultiplierArgs.of(block_multiplier) if block_multiplier is not None else None, tags=tags,
            split=_tail_split_option(kernel_options), zero_counters=pair_counters)
        tiles = x_out = None
        tile_shape = None
    else:
        tiles, x_out = _triton_main_pass(
            q, k, v, out, lse, layout, tags, head_weights, probes, block_multiplier, key_groups, count_tiles,
            cfg, kernel_options, batch, heads, n_q, n_k, head_dim, block_d, qk_scale, dot_precision, alloc)
        tile_shape = (block_m, block_n) if count_tiles else None  # what the counts refer to

    results = []
    col = 0
    for i, p in enumerate(probes):
        if i == fused:
            kgo, kg_q0 = key_groups.sums, key_groups.q0
            del key_groups  # free the raw sums (unless they are the result) before the probe pass
            folded = _fold_query_groups(kgo, p.queries, kg_q0, n_q)
            del kgo
            rest = _NORMALIZE_AFTER_KERNEL.get(p.normalize, p.normalize)
            results.append(normalize_groups(reduce_heads(folded, p.heads), p.queries, p.keys, rest, n_q, n_k))
            del folded
        elif isinstance(p, Probe):
            results.append(_run_probe(p, q, k, lse, layout, tags, batch, heads, n_q, n_k, head_dim, qk_scale,
                                      block_d, dot_precision, cfg, alloc))
        else:
            w = p.x.shape[-1]
            results.append(_finish_value_probe(p, x_out[..., col:col + w], n_q))
            col += w

    stats = None
    if pair_stats is not None:
        stats = _pair_stats(out, pair_stats, pair_counters, layout, heads, n_q, head_dim, block_d, alloc)
    return AttentionResult(
        # Each probe its own contiguous tensor (as the reference backend gives): a result may be
        # a slice of a padded kernel buffer, which would keep the whole buffer alive (no copy
        # where it is contiguous already, as the full-range results of the bench's probes are).
        out=out, lse=lse if need_lse else None, probes=tuple(r.contiguous() for r in results), pair_stats=stats,
        tiles_visited=tiles.view(batch, heads, cdiv(n_q, block_m)) if count_tiles else None,
        tile_shape=tile_shape,
    )


def _tail_split_option(kernel_options: Optional[dict]):
    """hopper_attention's ``split`` from the kernel options: "auto", False, or a forced plan."""
    options = kernel_options or {}  # validated: both counts or neither (validate.check_kernel_options)
    forced = [options.get("tail_split_tiles"), options.get("tail_split_pieces")]
    if not options.get("tail_split", True):
        return False
    return tuple(forced) if forced[0] is not None else "auto"


def _key_group_args(probe: Probe, batch: int, heads: int, n_k: int, device, alloc) -> KeyGroupArgs:
    _, k0, k1, ids, ids_stride, n_groups = _group_side(probe.keys, batch, n_k, device)
    q0, q1 = probe.queries.start, probe.queries.stop
    sums = alloc((batch, heads, q1 - q0, n_groups), dtype=torch.float32, device=device)
    # the kernel divides by the groups' sizes (the rest of the normalization follows it)
    scale = probe.keys.inverse_sizes(batch, n_k, device) if probe.normalize in _NORMALIZE_AFTER_KERNEL \
        else _unit_column_scale(device)
    scale_stride = scale.stride(0) if scale.shape[0] > 1 else 0  # one row: shared by the batch
    return KeyGroupArgs(ids, ids_stride, q0, q1, k0, k1, n_groups, sums, scale, scale_stride)


def _unit_column_scale(device) -> torch.Tensor:
    """Ones for every key-group column, one row shared by the batch (a probe without key normalization)."""
    key = (device.type, device.index)
    if key in _UNIT_SCALES:
        return _UNIT_SCALES[key]
    ones = torch.ones(1, MAX_FUSED_KEY_GROUPS, dtype=torch.float32, device=device)
    if not capturing(ones):  # built in a CUDA graph capture, it holds ones only once the graph replays
        _UNIT_SCALES[key] = ones
    return ones


def _triton_main_pass(q, k, v, out, lse, layout, tags, head_weights, probes, block_multiplier, key_groups,
                      count_tiles, cfg, kernel_options, batch, heads, n_q, n_k, head_dim, block_d, qk_scale,
                      dot_precision, alloc):
    """Launch the Triton kernel (flash_fwd.py); returns (tile counts, value-probe rows), each or None."""
    device = q.device
    block_m, block_n = int(cfg["BLOCK_M"]), int(cfg["BLOCK_N"])
    launch_opts = {} if _INTERPRET else dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    # The register cap of the D=64 config keeps 3 programs per SM with tags or key groups;
    # a multiplier's M tiles need the registers (H100: 1.40x with the cap, 1.31x without).
    maxnreg = cfg.get("maxnreg")
    if block_multiplier is not None and "maxnreg" not in (kernel_options or {}):
        maxnreg = None
    if maxnreg and not _INTERPRET:
        launch_opts["maxnreg"] = int(maxnreg)
    upcast_dots = _INTERPRET and q.dtype == torch.bfloat16
    value_probes = [p for p in probes if isinstance(p, ValueProbe)]
    kg_mode, x_precision = _key_group_products(cfg, q.dtype, key_groups, block_multiplier, block_d, device,
                                               even_d=head_dim == block_d)
    n_q_tiles = cdiv(n_q, block_m)
    n_k_tiles = cdiv(n_k, block_n)
    dummy, dummy_f = _dummies(device)

    # ---- token tags -> per-query-tile lists of partial and full key tiles
    has_lists = True
    if tags is not None:
        q_tags, k_tags = tags.batched(batch)
        lists = tags.tile_lists(block_m, block_n, batch)
        has_lists = lists.has_lists
        tag_args = (q_tags, k_tags, q_tags.stride(0), k_tags.stride(0),
                    lists.partial_count, lists.partial_index, lists.full_count, lists.full_index,
                    lists.run_start, lists.run_stop, lists.ragged_full)
    else:
        tag_args = (dummy, dummy, 0, 0, dummy, dummy, dummy, dummy, dummy, dummy, dummy)

    # ---- head weights, broadcast to [B, H, Nq] through zero strides (no copy)
    if head_weights is not None:
        hw_args = (head_weights, *_head_weight_strides(head_weights))
    else:
        hw_args = (dummy_f, 0, 0, 0)

    mult_args = MultiplierArgs.of(block_multiplier) if block_multiplier is not None else MultiplierArgs.absent(dummy_f)

    # ---- value probes share one padded side channel: x_all [B, Nk, X_PAD]
    x_pad = 16
    x_out = None
    if value_probes:
        widths = [vp.x.shape[-1] for vp in value_probes]
        x_pad = max(16, pow2_at_least(sum(widths)))
        x_all = torch.zeros(batch, n_k, x_pad, dtype=torch.float32, device=device)
        col = 0
        for vp, w in zip(value_probes, widths):
            x_all[:, :, col:col + w] = vp.x.to(device=device, dtype=torch.float32)
            col += w
        x_out = alloc((batch, heads, n_q, x_pad), dtype=torch.float32, device=device)
        x_args = (x_all, x_all.stride(0), x_all.stride(1), x_out)
    else:
        x_args = (dummy_f, 0, 0, dummy_f)

    # ---- the fused key-group probe (see triton_attention)
    g_pad = 16 if key_groups is None else max(16, pow2_at_least(key_groups.n_groups))
    kg_args = key_groups if key_groups is not None else KeyGroupArgs.absent(dummy, dummy_f)

    tiles = torch.full((batch * heads * n_q_tiles,), -1, dtype=torch.int32, device=device) if count_tiles else dummy

    grid = (n_q_tiles, batch * heads)
    _ATTN[grid](
        q, k, v, out, lse if lse is not None else dummy_f,
        *_strides_bhn(q, layout), *_strides_bhn(k, layout), *_strides_bhn(v, layout), *_strides_bhn(out, layout),
        heads, n_q, n_k, head_dim, qk_scale,
        *tag_args, n_q_tiles, n_k_tiles,
        *hw_args, *mult_args, *x_args, *kg_args, tiles,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, X_PAD=x_pad, G_PAD=g_pad,
        HAS_TAGS=tags is not None, HAS_HW=head_weights is not None, HAS_MULT=block_multiplier is not None,
        HAS_X=bool(value_probes), HAS_KG=key_groups is not None, STORE_LSE=lse is not None,
        COUNT_TILES=count_tiles, DOT_PRECISION=dot_precision,
        EVEN_D=head_dim == block_d, X_PRECISION=x_precision, UPCAST_DOTS=upcast_dots, KG_HALF_DOT=kg_mode,
        KG_SPLIT=bool(cfg.get("kg_split", True)), MULT_SPLIT=bool(cfg.get("mult_split", True)),
        WARP_SPECIALIZE=bool(cfg.get("warp_specialize", False)),
        RAGGED_TAIL=tags is not None and n_k % block_n != 0, HAS_LISTS=has_lists,
        **launch_opts,
    )
    return (tiles if count_tiles else None), x_out


def _head_weight_strides(hw: torch.Tensor) -> tuple:
    """(batch, head, query) strides that broadcast ``[H]``, ``[B, H]`` or ``[B, H, Nq]`` head
    weights to ``[B, H, Nq]`` (zero strides, no copy)."""
    if hw.dim() == 1:
        return 0, hw.stride(0), 0
    if hw.dim() == 2:
        return hw.stride(0), hw.stride(1), 0
    return tuple(hw.stride())


def _key_group_products(cfg: dict, dtype: torch.dtype, key_groups, block_multiplier, block_d: int,
                        device: torch.device, even_d: bool = True) -> tuple:
    """flash_fwd's ``(KG_HALF_DOT, X_PRECISION)``: the key-group sums' mode
    (:func:`_kg_half_dot_mode`) and the precision of fp32-probability products.

    fp16 inputs with a multiplier take the fp32 product (mode 0, not by ``kg_half_dot=False``):
    there the products are exact, as the fp16 split is for other calls (tf32 is ~5e-4 a term;
    value probes beside them get them too; only the tiles that hold grouped keys pay for it),
    up to head dim 64 on an H100. At head dim 128 the exact products' staging needs more shared
    memory than the H100 has (233984 of 232448 bytes, measured), and GPUs with less shared
    memory were not tried: there they stay tf32, as they do at a head dim that is not a power
    of two (``even_d=False``), where the exact products were not tried on the GPU."""
    mode = _kg_half_dot_mode(cfg, dtype, key_groups, block_multiplier, even_d)
    precision = _fp32_product_precision(dtype)
    if mode == 0 and key_groups is not None and dtype != torch.float32 and cfg.get("kg_half_dot", True) and even_d \
            and block_d <= 64 and device.type == "cuda" and hopper_fwd._is_sm90(hopper_fwd.device_index(device)):
        precision = "ieee"
    return mode, precision


def _kg_half_dot_mode(cfg: dict, dtype: torch.dtype, key_groups, block_multiplier, even_d: bool = True) -> int:
    """flash_fwd's ``KG_HALF_DOT``: 0 without key groups, fp32 inputs or ``kg_half_dot=False``
    (one fp32 product); else the fp16 hi + lo split with p scaled by 2^14 (2) where
    ``kernel_args.scales_p_for_key_groups`` allows it. Where it does not (fp16 inputs with a
    block multiplier) also 0: the split of unscaled p (mode 1) loses p below fp16's smallest
    normal (a group with p ~1e-6 of the row max came out 2-7% off), while the fp32 product
    has fp32's range (:func:`_key_group_products` makes it exact up to head dim 64 on an H100,
    else tf32). A bf16 split for every half input was slower at SD3 (1.15x -> 1.21x of plain) and
    faulted on the H100 (NOTES.md 66).

    A head dim that is not a power of two (``even_d=False``: K and V loaded with a channel
    mask) also takes mode 0: there Triton 3.6 miscompiled the fp16 split on an H200 (the group
    sums 50-110% off, and an out-of-bounds shared-memory read in the second fp16 product at
    head dim 40, found by tests/test_attention_fuzz_extras.py; the same call at head dim 64,
    and mode 0 at head dim 40 with tf32x3 products, were exact; mode 0 with the tf32 product
    shipped here was not run there, NOTES.md 74). The interpreter takes the same route, so CPU
    tests cover what the GPU runs.

    An unpipelined main pass (``num_stages=1`` in ``kernel_options``) on a GPU takes mode 0
    too: there triton 3.6 miscompiled the fp16 split on an H200 at head dim 128 (group sums ~3x
    off at every key count) and read shared memory out of bounds at head dim 64, while mode 0
    met the oracle at both (NOTES.md 80). The interpreter, which ignores stages and runs with
    1, keeps the split."""
    if key_groups is None or dtype == torch.float32 or not cfg.get("kg_half_dot", True) or not even_d:
        return 0
    if not _INTERPRET and int(cfg.get("num_stages", 2)) < 2:
        return 0
    return 2 if scales_p_for_key_groups(block_multiplier is not None, dtype == torch.float16) else 0


def _hopper_serves(q, k, v, layout, tags, probes, count_tiles, kernel_options, block_multiplier=None) -> bool:
    """The Hopper kernel (hopper_fwd.py) takes calls whose extras it has: tags, head weights,
    LSE, a fused key-group probe, a block multiplier, and what runs after the main pass
    (probe-pass probes, pair statistics). Value probes and tile counts live in the Triton
    kernel, and so do calls that configure its main pass or set ``hopper=False``
    (``triton_attention`` also keeps short plain calls there, see ``short_plain_config``).
    At head dim 64 the key count that takes the Hopper kernel depends on whether the
    call's extras run inside the main pass (``hopper_fwd.serves_head_dim``)."""
    options = kernel_options or {}
    if not options.get("hopper", True) or MAIN_PASS_OPTIONS.intersection(options):
        return False
    if count_tiles or _INTERPRET:
        return False
    if any(not isinstance(p, Probe) for p in probes):  # value probes accumulate A @ x in the main pass
        return False
    in_kernel_extras = tags is None and (block_multiplier is not None or
                                         _fused_probe_index(probes, options) is not None)
    return hopper_fwd.usable(q, k, v, layout, in_kernel_extras)


def _probe_config(spread_and_reduced: bool, block_d: int, dtype: torch.dtype) -> dict:
    """Probe-pass tiles (``PROBE_BLOCK_M`` etc. in ``kernel_options`` override them).

    A probe has no PV product, so its tiles can differ from the main pass. An output tile
    that is token x token with heads reduced (a text x image head-mean map) reloads q and
    k once per head: at head dim 128, 64 x 128 tiles with 4 warps and 2 stages measured
    best on the H100 (bench/NOTES.md 43: 1.17x plain at Flux 1024² and 1.09x at Flux-edit,
    against 1.19x / 1.10x for 128 x 128 with 8 warps: twice the programs, two a SM, so one's
    exp overlaps the other's products). Other probes have few output tiles to spread over
    the SMs and keep smaller ones (at head dim 64, 64 x 64 stayed best).
    """
    if _INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=16, NUM_WARPS=1, NUM_STAGES=1)
    if dtype == torch.float32 or block_d > 128:
        return dict(BLOCK_M=64, BLOCK_N=32, NUM_WARPS=4, NUM_STAGES=2)
    if spread_and_reduced and block_d > 64:
        return dict(BLOCK_M=64, BLOCK_N=128, NUM_WARPS=4, NUM_STAGES=2)
    return dict(BLOCK_M=64, BLOCK_N=64, NUM_WARPS=4, NUM_STAGES=3)


def _group_side(groups, batch, length, device):
    """(spread?, lo, hi, ids tensor, ids batch stride, number of output rows/cols)."""
    if groups.kind == "each":
        return True, groups.start, groups.stop, None, 0, groups.count
    ids = groups.group_ids
    if ids.dtype != torch.int32 or ids.device != device:
        # Host-built ids (TokenGroups.segments/single): an asynchronous copy, so a probe
        # rebuilt by a policy on every call does not synchronize the stream.
        ids = ids.to(dtype=torch.int32).to(device, non_blocking=True)
    if ids.stride(-1) != 1:  # the kernels step through a row's ids one element at a time
        ids = ids.contiguous()
    stride = 0 if ids.dim() == 1 else ids.stride(0)
    return False, groups.start, groups.stop, ids, stride, groups.count


def _run_probe(p: Probe, q, k, lse, layout, tags, batch, heads, n_q, n_k, head_dim, qk_scale, block_d,
               dot_precision, cfg, alloc):
    device = q.device
    q_spread, q_lo, q_hi, q_ids, q_ids_stride, gq = _group_side(p.queries, batch, n_q, device)
    k_spread, k_lo, k_hi, k_ids, k_ids_stride, gk = _group_side(p.keys, batch, n_k, device)
    keep = isinstance(p.heads, str) and p.heads == "keep"
    out_heads = heads if keep else 1
    # String head modes are one scalar for every head: no [B, H] tensor to build per call.
    if isinstance(p.heads, str):
        coef, coef_value = None, uniform_head_coefficient(p.heads, heads)
    else:
        coef, coef_value = head_coefficients(p.heads, batch, heads, torch.float32, device).contiguous(), 1.0
    pcfg = _probe_config(q_spread and k_spread and not keep, block_d, q.dtype)
    pcfg.update({key[len("PROBE_"):]: val for key, val in cfg.items() if key.startswith("PROBE_")})
    block_m, block_n = int(pcfg["BLOCK_M"]), int(pcfg["BLOCK_N"])
    launch_opts = {} if _INTERPRET else dict(num_warps=int(pcfg["NUM_WARPS"]), num_stages=int(pcfg["NUM_STAGES"]))
    g_block = PROBE_GROUP_BLOCK
    rows = block_m if q_spread else g_block
    cols = block_n if k_spread else g_block
    grid = (cdiv(gq, rows), cdiv(gk, cols), batch * out_heads)
    result = alloc((batch, out_heads, gq, gk), dtype=torch.float32, device=device)
    dummy, dummy_f = _dummies(device)
    if tags is not None:
        q_tags, k_tags = tags.batched(batch)
        tag_args = (q_tags, k_tags, q_tags.stride(0), k_tags.stride(0))
    else:
        tag_args = (dummy, dummy, 0, 0)
    _PROBE[grid](
        q, k, lse, result,
        *_strides_bhn(q, layout), *_strides_bhn(k, layout),
        heads, n_q, n_k, head_dim, qk_scale,
        *tag_args,
        q_ids if q_ids is not None else dummy, k_ids if k_ids is not None else dummy, q_ids_stride, k_ids_stride,
        q_lo, q_hi, k_lo, k_hi, gq, gk, coef if coef is not None else dummy_f, coef_value, out_heads,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, G_BLOCK=g_block, ROWS=rows, COLS=cols,
        HAS_COEF=coef is not None, KEEP_HEADS=keep, Q_SPREAD=q_spread, K_SPREAD=k_spread, HAS_TAGS=tags is not None,
        DOT_PRECISION=dot_precision,
        FOLD_SPLIT=_fold_split_allowed(q.dtype, q_spread and k_spread, head_dim == block_d),
        ONEHOT_PRECISION=_fp32_product_precision(q.dtype),
        UPCAST_DOTS=_INTERPRET and q.dtype != torch.float32, **launch_opts,
    )
    return normalize_groups(result, p.queries, p.keys, p.normalize, n_q, n_k)


def _fold_split_allowed(dtype: torch.dtype, token_by_token: bool, even_d: bool) -> bool:
    """probe_kernel's ``FOLD_SPLIT``: fold 16-bit calls' probabilities into groups as three
    bf16 products (exact to fp32) rather than one tf32 product (~1e-3 a term). Not for fp32
    inputs (their fold is an fp32 product), not for a token x token map (nothing to fold), and
    not at a head dim that is not a power of two (Q and K loaded with a channel mask): there
    Triton 3.6 compiled the bf16 fold into an out-of-bounds shared-memory read on an H200
    (NOTES.md 76), as it did the fused key-group probe's fp16 split (74); those keep tf32."""
    return dtype != torch.float32 and not token_by_token and even_d


def _fused_probe_index(probes: Sequence, cfg: dict) -> Optional[int]:
    """The probe that rides in the main pass: the first one whose keys are grouped into at
    most ``MAX_FUSED_KEY_GROUPS`` groups (its result is a few columns per query row, so it
    accumulates beside the output). ``kernel_options={"fuse_key_groups": False}`` runs it
    in the probe pass instead."""
    if not cfg.get("fuse_key_groups", True):
        return None
    for i, p in enumerate(probes):
        if isinstance(p, Probe) and p.keys.kind == "ids" and p.keys.count <= MAX_FUSED_KEY_GROUPS:
            return i
    return None


def _fold_query_groups(per_query: torch.Tensor, groups, row0: int, n_q: int) -> torch.Tensor:
    """``[B, H, rows, C]`` per-query results for queries ``row0 ...`` -> ``[B, H, Gq, C]``.

    Deterministic, as every probe result is: a ``scatter_add`` would add in the order its
    CUDA atomics land (run-to-run differences of ~1e-6). The rows are sorted by group (a
    stable sort) and each group's run summed on its own in float64 (``segment_reduce``: one
    sequential sum per group, so a small group keeps its precision after large ones).
    """
    batch, heads, rows, channels = per_query.shape
    if groups.kind == "each":
        return per_query[:, :, groups.start - row0:groups.stop - row0]
    ids = groups.dense_ids(batch, n_q, per_query.device)[:, row0:row0 + rows].long()
    slot = torch.where(ids >= 0, ids, groups.count)  # unprobed rows sort last, into a dropped segment
    # contiguous: ids from a transposed [N, B] tensor give a sort result in its strides, which
    # searchsorted reads correctly but warns about (a warning on every call of such a probe).
    slot, order = torch.sort(slot.contiguous(), dim=1, stable=True)
    ordered = per_query.double().gather(2, order[:, None, :, None].expand(batch, heads, rows, channels))
    starts = torch.searchsorted(slot, torch.arange(groups.count + 2, device=slot.device).expand(batch, -1).contiguous())
    lengths = (starts[:, 1:] - starts[:, :-1])[:, None, :].expand(batch, heads, groups.count + 1)
    sums = torch.segment_reduce(ordered, "sum", lengths=lengths, axis=2)
    return sums[:, :, :groups.count].float()


def _finish_value_probe(vp: ValueProbe, per_query: torch.Tensor, n_q: int) -> torch.Tensor:
    """Fold the per-query, per-head ``A_h @ x`` rows into query groups and reduce heads."""
    folded = reduce_heads(_fold_query_groups(per_query, vp.queries, 0, n_q), vp.heads)
    return normalize_groups(folded, vp.queries, None, vp.normalize, n_q, 0)


def output_pair_stats(out: torch.Tensor, pairs: Sequence, layout: str) -> PairStats:
    """The pair-statistics pass alone, over an output made outside the kernels (HeadRouter's
    same-call DTR weighs the output after the call): ``pairs`` a list of in-range
    ``(b0, b1)`` batch rows, ``out`` 16/32-bit float ``[B, H, N, D]`` / ``[B, N, H, D]`` with a
    unit channel stride (callers check; this is the kernels' side)."""
    heads, n_q, head_dim = (out.shape[1], out.shape[2], out.shape[3]) if layout == "bhnd" else \
        (out.shape[2], out.shape[1], out.shape[3])
    with device_guard(out.device):
        counters = torch.zeros((len(pairs), heads), dtype=torch.int32, device=out.device)
        return _pair_stats(out, torch.as_tensor(pairs, dtype=torch.int64), counters, layout, heads, n_q, head_dim,
                           max(16, pow2_at_least(head_dim)), torch.empty)


def _pair_stats(out, pairs, counters, layout, heads, n_q, head_dim, block_d, alloc) -> PairStats:
    """One launch per pair, with the batch rows as scalars: no index tensor on the device, so
    no host-to-device copy (which would synchronize the stream) on this hot path. ``counters``
    [pairs, heads] int32 are zero (the tickets of ``pair_stats_kernel``)."""
    pair_list = pairs.tolist()
    block_t = 16
    n_progs = _pair_stats_programs(cdiv(n_q, block_t), heads, out.device)
    partial = torch.empty((len(pair_list), heads, n_progs, 3), dtype=torch.float32, device=out.device)
    sums = alloc((len(pair_list), heads, 3), dtype=torch.float32, device=out.device)
    for p, (b0, b1) in enumerate(pair_list):
        _PAIR_STATS[(n_progs, heads)](
            out, partial[p], counters[p], sums[p], b0, b1, *_strides_bhn(out, layout), heads, n_q, head_dim, n_progs,
            BLOCK_T=block_t, BLOCK_D=block_d, PROGS_POW2=pow2_at_least(n_progs), num_warps=1 if _INTERPRET else 8,
        )
    return PairStats(dot=sums[..., 0], norm0_sq=sums[..., 1], norm1_sq=sums[..., 2])


def _pair_stats_programs(n_tiles: int, heads: int, device: torch.device) -> int:
    """Programs per head of the pair-statistics pass: about four per SM over all heads
    (16-row tiles, 8 warps; H100 sweep, NOTES.md 42), each walking several token tiles. The
    interpreter takes two, so tests walk the loop."""
    if _INTERPRET or device.type != "cuda":
        return max(1, min(n_tiles, 2))
    return max(1, min(n_tiles, 4 * _device_sms(device) // heads))
