"""Test helpers: random inputs in either layout, tolerances per dtype, error metrics."""
import pytest
import torch

from iidkern.policy import AttentionPolicy

# Relative-norm tolerances ||out - ref|| / ||ref|| for the attention output, per input dtype
# (bf16/fp16 round P to the input dtype before P @ V, as every flash kernel does).
OUT_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
# Probes are computed in fp32 from the (rounded) inputs, so they stay tight for every dtype.
PROBE_TOL = {torch.float32: 2e-5, torch.float16: 2e-4, torch.bfloat16: 2e-4}
# On a GPU, 16-bit calls multiply fp32 probabilities as tf32 (value probes, group folding), whose
# tensor-core products truncate each operand to 10 mantissa bits: up to ~1e-3 a term.
GPU_PROBE_TOL = 2e-3
# ... and the fused key-group probe takes p as fp16 scaled by 2^14 (bench/NOTES.md 53): 2e-4
# relative only down to ~4e-9 of the row max; below, each term is rounded to fp16's subnormal
# spacing, 2^-24 / 2^14: at most 2^-39 of the running max, so of a probability. A GPU fuzz call
# (scale ~1 at head dim 128: probabilities of 1e-10) was 1e-12 off on an element of 2e-10 (H200,
# both kernels alike). A sum over n keys may be off by n such halves: the bound takes 2^-38 a key.
FP16_SPLIT_TERM_ERROR = 2.0 ** -38


def random_key_groups(nk, span, n_groups, generator, batched=False, b=1, device="cpu"):
    """``TokenGroups.ids`` with random group ids in ``span`` (some tokens there -1, none
    outside): the top id occurs (count = n_groups) and the span is tight."""
    from iidkern import TokenGroups
    lo, hi = span
    shape = (b, nk) if batched else (nk,)
    ids = torch.full(shape, -1, dtype=torch.int32)
    ids[..., lo:hi] = torch.randint(-1, n_groups, shape[:-1] + (hi - lo,), generator=generator, dtype=torch.int32)
    ids[..., lo] = n_groups - 1
    ids[..., hi - 1] = 0
    return TokenGroups.ids(ids.to(device), n_groups, span=(lo, hi))


def make_qkv(b, h, nq, nk, d, dtype=torch.float32, layout="bhnd", device="cpu", generator=None):
    """Fresh random q, k, v (never zeros) in the given layout."""
    def one(n):
        t = torch.randn(b, h, n, d, generator=generator, device="cpu").to(device=device, dtype=dtype)
        return t if layout == "bhnd" else t.transpose(1, 2).contiguous()
    return one(nq), one(nk), one(nk)


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "output holds NaN (an unwritten, poisoned element?)"
    denom = ref.norm().clamp_min(1e-30)
    return ((out - ref).norm() / denom).item()


def assert_close_rel(out, ref, tol, what="output"):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.1e}"


def probe_on(probe, device):
    """``probe`` with its tensors (group ids, head weights, a value probe's x) on ``device``."""
    from iidkern import Probe, TokenGroups, ValueProbe

    def move_heads(heads):
        return heads.to(device) if isinstance(heads, torch.Tensor) else heads

    def move_groups(g):
        if g.kind == "each" or device.type == "cpu":
            return g
        return TokenGroups.ids(g.group_ids.to(device), g.count, span=(g.start, g.stop))
    if isinstance(probe, ValueProbe):
        return ValueProbe(probe.x.to(device), move_groups(probe.queries), heads=move_heads(probe.heads),
                          normalize=probe.normalize)
    return Probe(move_groups(probe.queries), move_groups(probe.keys), heads=move_heads(probe.heads),
                 normalize=probe.normalize)


def assert_within_magnitudes(out, ref, magnitudes, tol, what="probe", floor=0.0):
    """Per element ``|out - ref| <= tol * magnitudes + floor``, where ``magnitudes`` is the sum
    of the absolute values of the terms that ``ref`` sums: the bound of a per-term relative
    error (tf32's truncation), which ``rel_err`` cannot give where signed terms cancel."""
    assert out.shape == ref.shape == magnitudes.shape, f"{what}: shapes {tuple(out.shape)}, {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{what} holds NaN (an unwritten, poisoned element?)"
    err = (out.double() - ref.double()).abs()
    excess = err - tol * magnitudes.double() - floor
    worst = int(excess.argmax())
    assert excess.max() <= 0, (f"{what}: error {err.flatten()[worst]:.3e} at flat index {worst} past {tol:.0e} "
                               f"of its terms' magnitudes {magnitudes.flatten()[worst]:.3e}")


def assert_lse_equal(lse, ref, tol=1e-4):
    assert torch.equal(torch.isinf(lse), torch.isinf(ref)), "LSE -inf pattern differs from the reference"
    fin = torch.isfinite(ref)
    if not fin.any():
        return
    assert (lse[fin].double() - ref[fin].double()).abs().max().item() < tol * max(1.0, ref[fin].abs().max().item())


def random_tags(b, n, nbits=4, density=0.4, generator=None, dtype=torch.int64):
    """Random bit sets: each token holds each bit with probability ``density`` (some hold none)."""
    bits = torch.rand(b, n, nbits, generator=generator) < density
    weights = torch.tensor([1 << i for i in range(nbits)], dtype=torch.int64)
    return (bits.long() * weights).sum(-1).to(dtype)


class RecordSites(AttentionPolicy):
    """A policy that asks for nothing and remembers every attention site it is shown."""

    def __init__(self):
        self.sites = []

    def request(self, site):
        self.sites.append(site)
        return None


def tiny_group_probabilities(b, h, n, d, group_keys, gap, dtype, layout, generator, device="cpu"):
    """q, k, v where every query's probability on the ``group_keys`` range is ~e^-gap of its
    largest one (channel 0 carries the gap, the others small random scores)."""
    q = torch.randn(b, h, n, d, generator=generator) * 0.3
    k = torch.randn(b, h, n, d, generator=generator) * 0.3
    q[..., 0] = 1.0
    k[..., 0] = gap
    k[:, :, group_keys[0]:group_keys[1], 0] = 0.0
    v = torch.randn(b, h, n, d, generator=generator)
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    if layout == "bnhd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    return q, k, v


def assert_raises_naming(exc, words, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` raises ``exc`` whose message holds every one of ``words``
    (the argument's name, what it expects, what it got)."""
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, f"message {message!r} lacks {word!r}"
