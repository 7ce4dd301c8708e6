"""The implementations the suite times, each as one callable ``call(q, k, v)`` over a workload.

* ``iidkern``: the fused engine, every extra in the one call (on an H100 at D=128, plain
  calls and calls with tags, head weights, pair statistics, probes or a block multiplier run
  the Hopper Gluon kernel; value probes the Triton kernel).
* ``iidkern_triton``: the same call pinned to the Triton kernel (``kernel_options={"hopper":
  False}``): its plain, probe, multiplier and tag times, for the record.
* ``sdpa_cudnn`` / ``sdpa_flash`` / ``sdpa_efficient``: ``F.scaled_dot_product_attention``
  pinned to one backend (tag features pass the dense bool mask, as a user without a tag
  kernel would). ``sdpa_cudnn+torch``: cuDNN plus the extra done by PyTorch ops after it.
* ``flex``: FlexAttention, compiled once (static shapes), with the tag mask as a BlockMask.
* ``naive``: materialize ``softmax(QK^T)`` in float32, read maps off it by slicing and
  means, then ``P @ V`` (what map-extraction code in editing repos does).

``extract(result)`` turns what a call returns into named tensors for the correctness check.
An implementation that cannot run a workload raises :class:`Unsupported` with the reason.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import iidkern
from iidkern.specs import AttentionResult

from .workloads import TAG_FEATURES, Workload

SDPA_BACKENDS = {
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
}
IMPLEMENTATIONS = ("iidkern", "iidkern_triton", *SDPA_BACKENDS, "sdpa_cudnn+torch", "flex", "naive")
NAIVE_BYTES_PER_SCORE = 14  # bf16 scores + fp32 probs + fp32 softmax temp + bf16 probs for P@V


class Unsupported(Exception):
    """This implementation cannot run this workload (the message says why)."""


@dataclass
class Impl:
    name: str
    call: Callable  # (q, k, v) -> result
    extract: Callable[[object], Dict[str, torch.Tensor]]
    graphable: bool = True  # may be captured in a CUDA graph (no host synchronization inside)
    # The first (checked) call, when it should differ from the timed one: iidkern's fills its
    # outputs with NaN first, so an element its kernels never write fails the check instead
    # of passing with a value an earlier call left in reused memory.
    checked_call: Optional[Callable] = None


# --------------------------------------------------------------------------- helpers
def _sdpa(q, k, v, backend: Optional[SDPBackend], mask=None):
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _pair_stats_torch(out: torch.Tensor, pairs: torch.Tensor) -> Dict[str, torch.Tensor]:
    o = out.float()
    o0, o1 = o[pairs[:, 0]], o[pairs[:, 1]]  # [P, H, N, D]
    return {"dot": (o0 * o1).sum((2, 3)), "norm0_sq": o0.square().sum((2, 3)), "norm1_sq": o1.square().sum((2, 3))}


def _out_only(result) -> Dict[str, torch.Tensor]:
    return {"out": result}


def _naive_probs(q, k, scale: float) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # [B, H, Nq, Nk] in the input dtype
    return torch.softmax(scores.float(), dim=-1)


def _check_naive_memory(w: Workload):
    s = w.shape
    need = NAIVE_BYTES_PER_SCORE * s.batch * s.heads * s.tokens * s.tokens
    free, _ = torch.cuda.mem_get_info(w.device)
    if need > 0.85 * free:
        raise Unsupported(f"naive needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")


_FLEX = None


def compiled_flex():
    """``torch.compile(flex_attention)`` made once; static shapes so each shape gets its own
    specialized kernel (the dynamo recompile limit is raised in bench/conftest.py)."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def _tag_mask_mod(q_tags: torch.Tensor, k_tags: torch.Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_tags[b, q_idx] & k_tags[b, kv_idx]) != 0
    return mask_mod


def _skipped_block_fraction(block_mask, n_k: int) -> float:
    """Fraction of (query block, key block) pairs FlexAttention skips, over the padded
    block grid (``BlockMask.sparsity()`` divides by unpadded sizes and goes negative)."""
    computed = block_mask.kv_num_blocks.sum().item()
    if block_mask.full_kv_num_blocks is not None:
        computed += block_mask.full_kv_num_blocks.sum().item()
    k_blocks = -(-n_k // block_mask.BLOCK_SIZE[1])
    return 1.0 - computed / (block_mask.kv_num_blocks.numel() * k_blocks)


def flex_block_mask(w: Workload):
    """FlexAttention's BlockMask for the workload's tags (None without tags)."""
    if w.q_tags is None:
        return None
    from torch.nn.attention.flex_attention import create_block_mask

    n = w.shape.tokens
    return create_block_mask(_tag_mask_mod(w.q_tags, w.k_tags), w.shape.batch, None, n, n, device=w.device)


# --------------------------------------------------------------------------- builders
def _iidkern(w: Workload, name: str = "iidkern", options: Optional[dict] = None) -> Impl:
    kwargs = w.iidkern_kwargs()
    if options:
        kwargs["kernel_options"] = {**(kwargs.get("kernel_options") or {}), **options}

    def call(q, k, v):
        return iidkern.attention(q, k, v, **kwargs)

    def extract(res):
        if not isinstance(res, AttentionResult):
            return {"out": res}
        named = {"out": res.out}
        named.update({f"probe{i}": p for i, p in enumerate(res.probes)})
        if res.pair_stats is not None:
            ps = res.pair_stats
            named.update(dot=ps.dot, norm0_sq=ps.norm0_sq, norm1_sq=ps.norm1_sq)
        return named

    def checked_call(q, k, v):
        options = {**(kwargs.get("kernel_options") or {}), "poison": True}
        return iidkern.attention(q, k, v, **{**kwargs, "kernel_options": options})

    # Every iidkern call is capturable: pair lists stay on the host (no device sync).
    return Impl(name, call, extract, graphable=True, checked_call=checked_call)


def _sdpa_plain_or_masked(w: Workload, backend: Optional[SDPBackend], name: str) -> Optional[Impl]:
    """SDPA alone covers plain attention and tag features (as a dense boolean mask)."""
    if w.feature == "plain":
        return Impl(name, lambda q, k, v: _sdpa(q, k, v, backend), _out_only)
    if w.feature in TAG_FEATURES:
        mask = w.dense_mask()
        return Impl(name, lambda q, k, v: _sdpa(q, k, v, backend, mask), _out_only)
    return None


def _sdpa_impl(name: str, w: Workload) -> Impl:
    impl = _sdpa_plain_or_masked(w, SDPA_BACKENDS[name], name)
    if impl is None:
        raise Unsupported(f"{name} has no {w.feature} (see sdpa_cudnn+torch / naive)")
    return impl


def _composed(w: Workload, backend: Optional[SDPBackend], name: str) -> Impl:
    """SDPA followed by the extra in PyTorch ops (head weights, pair statistics)."""
    if w.feature == "head_weights":
        hw = w.head_weights[:, :, None, None]

        def call(q, k, v):
            return _sdpa(q, k, v, backend) * hw.to(q.dtype)
        return Impl(name, call, _out_only)
    if w.feature == "pair_stats":
        pairs = w.pairs.to(w.device)

        def call(q, k, v):
            out = _sdpa(q, k, v, backend)
            return out, _pair_stats_torch(out, pairs)
        return Impl(name, call, lambda r: {"out": r[0], **r[1]})
    impl = _sdpa_plain_or_masked(w, backend, name)
    if impl is None:
        raise Unsupported(f"{name} has no {w.feature}")
    return impl


def _flex(w: Workload) -> Impl:
    if w.feature != "plain" and w.feature not in TAG_FEATURES:
        raise Unsupported(f"flex has no {w.feature} (FlexAttention returns no maps or statistics)")
    flex = compiled_flex()
    block_mask = flex_block_mask(w)
    if block_mask is not None:
        w.info["flex_block_sparsity"] = _skipped_block_fraction(block_mask, w.shape.tokens)
    return Impl("flex", lambda q, k, v: flex(q, k, v, block_mask=block_mask), _out_only)


def _naive(w: Workload) -> Impl:
    _check_naive_memory(w)
    scale = w.scale
    if w.feature == "probe":
        (i0, i1), (t0, t1) = w.shape.image_range, w.shape.text_range
        ranges = list(w.instruction_ranges)

        def call(q, k, v):
            p = _naive_probs(q, k, scale)
            per_instruction = torch.stack([p[:, :, i0:i1, a:b].mean(-1) for a, b in ranges], dim=-1)
            text_image = p[:, :, t0:t1, i0:i1].mean(1, keepdim=True)
            return torch.matmul(p.to(q.dtype), v), per_instruction, text_image
        return Impl("naive", call, lambda r: {"out": r[0], "probe0": r[1], "probe1": r[2]}, graphable=False)
    if w.feature == "block_mult":
        m = w.multiplier
        qa, ka = m.query_start, m.key_start
        qb, kb = qa + m.values.shape[-2], ka + m.values.shape[-1]
        values = m.values[:, None]  # shared by heads

        def call(q, k, v):
            p = _naive_probs(q, k, scale)
            p[:, :, qa:qb, ka:kb] *= values  # post-softmax, normalizer unchanged
            return torch.matmul(p.to(q.dtype), v)
        return Impl("naive", call, _out_only, graphable=False)
    raise Unsupported(f"naive is timed only for probe and block_mult, not {w.feature}")


def make_impl(name: str, w: Workload) -> Impl:
    if name == "iidkern":
        return _iidkern(w)
    if name == "iidkern_triton":  # the Triton kernel where the Hopper one would serve (D=128 plain)
        return _iidkern(w, name, {"hopper": False})
    if name in SDPA_BACKENDS:
        return _sdpa_impl(name, w)
    if name == "sdpa_cudnn+torch":
        return _composed(w, SDPBackend.CUDNN_ATTENTION, name)
    if name == "flex":
        return _flex(w)
    if name == "naive":
        return _naive(w)
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {name!r}")


def make_reference(w: Workload) -> Impl:
    """An independent implementation to check results against: SDPA with PyTorch's own
    backend choice (plus PyTorch ops for extras), or the naive path where maps are needed."""
    if w.feature in ("probe", "block_mult"):
        return _naive(w)
    return _composed(w, None, "reference")


def first_call_or_unsupported(impl: Impl, q, k, v):
    """Run the first call; turn an SDPA/Flex 'cannot run this' error into :class:`Unsupported`.

    Errors of iidkern itself propagate: they are failures, not skips.
    """
    if impl.name.startswith("iidkern"):
        return (impl.checked_call or impl.call)(q, k, v)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return impl.call(q, k, v)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            why = "; ".join(str(c.message).strip() for c in caught if "kernel not used" in str(c.message).lower()
                            or "not supported" in str(c.message).lower())
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise Unsupported(f"{impl.name}: {msg}" + (f" ({why[:300]})" if why else "")) from e
