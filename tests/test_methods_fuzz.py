"""Hypothesis fuzz of the building blocks of the two editing methods (``iidkern.edit``) against
float64 re-derivations written here from METHODS.md and the docstrings, never from the
package's own helpers:

IID (METHODS.md, IID)
* ``disentangle_heads``: M_i^j = max(0, A_i^j - 1/(N-1) sum_{k!=i} A_k^j), per head; N = 1 is
  documented to return the maps unchanged;
* ``gaussian_smooth`` (and ``gaussian_kernel1d``): a float64 separable Gaussian on the (rows, cols)
  grid with half-sample symmetric borders (also where the kernel is wider than the grid),
  sigma = 0 the identity, constants kept, sums kept;
* ``otsu_threshold`` / ``binarize("otsu")``: 256-bin histogram Otsu (the docstring's bins) and,
  on maps whose values sit on a 256-level lattice, exact Otsu over the sorted distinct values;
  ties, two-valued maps however close, constant maps (no foreground, threshold +inf);
* ``binarize("fixed")`` / ``key_region_masks`` (min-max normalize, ``>= value``; constants -> 0)
  and ``binarize("top")`` (a ``value`` fraction of the tokens with the highest scores);
* ``iid_masks``: disentangle, head mean, smooth, threshold, end to end;
* ``IIDPolicy`` over a whole run: branch isolation up to S, the map probe at S (through
  ``attend`` on the dense reference backend: per-head means over each instruction's tokens of
  the combined row's image x text attention, averaged over the map layers), the masks, and the
  step-5 allow table of every masked step; ``IIDMaskPolicy`` with masked rows, batched masks and
  ``forwards="first"``; the OmniGen-style image x image map sources of ``IIDMapPolicy``;
* ``blend_branches`` (step 4: sum_i M_i z_i / count inside, the combined latents outside).

HeadRouter (METHODS.md, HeadRouter)
* ``dtr_weights`` (alpha * sigmoid(upsilon * softmax over IMAGE tokens of A^{ZP})) and the code
  form's ``dtr_token_weights``;
* ``HeadRouterPolicy`` through ``attend`` (reference backend): same-call and previous-step DTR,
  both head rules, both layouts, IARouter on the weighted output, the code form;
* the policy door: which calls get pair statistics, a probe, the LSE, a multiplier or nothing;
* ``TextResidual``: 0.1 * (text entering l-1) + 0.9 * (text leaving l-1), edit rows only;
* ``KeyRegionPolicy`` + ``key_region_masks``: sum_h A_h[image rows, token], summed over the
  first forward of each captured (step, block), min-max normalized, >= 0.2;
* RF-Inversion: ``RFEditController`` written in METHODS.md's (paper) time and converted by the
  documented convention, ``InversionController``, ``RFInversionConfig.resolved_stop``.

``router_weights`` itself is tested in tests/test_specs_fuzz.py. Three tests hold minimal
reproducers of deviations from the docstrings that this fuzz found, since fixed (binarize "top" tie
order, "fixed" values rounded to 0 in the map's dtype, thresholds of maps whose spread overflows).

A deeper run: IIDKERN_FUZZ_EXAMPLES=300 pytest tests/test_methods_fuzz.py --hypothesis-seed=N
"""
import math
import os
import warnings

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from iidkern.edit.headrouter import (HeadRouterConfig, HeadRouterPolicy, KeyRegionPolicy, TextResidual,
                                     dtr_token_weights, dtr_weights)
from iidkern.edit.iid import IIDConfig, IIDMapPolicy, IIDMaskPolicy, IIDPolicy, default_map_step
from iidkern.edit.inversion import InversionController, RFEditController, RFInversionConfig
from iidkern.edit.masks import (binarize, disentangle_heads, gaussian_kernel1d, gaussian_smooth, iid_masks,
                                key_region_masks, otsu_threshold)
from iidkern.edit.pipeline import blend_branches
from iidkern.policy import AttentionSite, attend

EXAMPLES = int(os.environ.get("IIDKERN_FUZZ_EXAMPLES", "0"))
SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
SEEDS = st.integers(0, 2 ** 32 - 1)
BINS = 256  # otsu_threshold's documented default


def examples(default: int) -> int:
    return EXAMPLES or default


def fuzz(default: int):
    return settings(max_examples=examples(default), deadline=None, suppress_health_check=SLOW_OK)


GRIDS = st.tuples(st.integers(1, 7), st.integers(1, 7))  # 1x1 and non-square grids included


# =========================================================================== float64 references
def ref_disentangle(a: np.ndarray) -> np.ndarray:
    """METHODS.md IID 3 on ``[..., H, N_img, N]``: per head, instruction i minus the mean of the
    others, then ReLU; one instruction: unchanged (disentangle_heads' docstring)."""
    n = a.shape[-1]
    if n == 1:
        return a.copy()
    out = np.empty_like(a)
    for i in range(n):
        others = sum(a[..., k] for k in range(n) if k != i) / (n - 1)
        out[..., i] = np.maximum(0.0, a[..., i] - others)
    return out


def reflect(m: int, n: int) -> int:
    """Half-sample symmetric extension (``c b a | a b c | c b a``), period 2n."""
    m %= 2 * n
    return m if m < n else 2 * n - 1 - m


def ref_taps(sigma: float, kernel_size=None) -> np.ndarray:
    if kernel_size is None:
        kernel_size = 2 * int(math.ceil(3 * sigma)) + 1
    r = kernel_size // 2
    d = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (d / sigma) ** 2)
    return k / k.sum()


def smoothing_matrix(n: int, taps: np.ndarray) -> np.ndarray:
    r = len(taps) // 2
    t = np.zeros((n, n))
    for i in range(n):
        for d in range(-r, r + 1):
            t[i, reflect(i + d, n)] += taps[d + r]
    return t


def ref_smooth(x: np.ndarray, grid, sigma: float, kernel_size=None) -> np.ndarray:
    """``[..., h*w]`` maps blurred on the row-major (h, w) grid, float64."""
    if sigma <= 0:
        return x.copy()
    h, w = grid
    taps = ref_taps(sigma, kernel_size)
    th, tw = smoothing_matrix(h, taps), smoothing_matrix(w, taps)
    img = x.reshape(x.shape[:-1] + (h, w))
    return np.einsum("ij,...jk,lk->...il", th, img, tw).reshape(x.shape)


def softmax_np(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid_np(x):
    return 1.0 / (1.0 + np.exp(-x))


# --------------------------------------------------------------------------- threshold checkers
def exact_otsu_between(values: np.ndarray):
    """Between-class variance of every split of the sorted distinct values: entry j-1 puts the
    j lowest distinct values in the background."""
    u, c = np.unique(values, return_counts=True)
    w = c / c.sum()
    out = []
    for j in range(1, len(u)):
        w0, w1 = w[:j].sum(), w[j:].sum()
        mu0, mu1 = (w[:j] * u[:j]).sum() / w0, (w[j:] * u[j:]).sum() / w1
        out.append(w0 * w1 * (mu0 - mu1) ** 2)
    return u, np.array(out)


def histogram_otsu(values: np.ndarray, bins: int = BINS):
    """The docstring's histogram Otsu: ``bins`` equal bins over [min, max] (the max in the last),
    between-class variance of the bin-centre values per split. Returns (bin of each value,
    between[k] for 'background = bins <= k' (-1 where a class is empty), ambiguous): a value
    within 2e-4 of a bin edge could fall on either side in float32."""
    lo, hi = values.min(), values.max()
    pos = (values - lo) / (hi - lo) * bins
    idx = np.clip(np.floor(pos).astype(np.int64), 0, bins - 1)
    frac = np.abs(pos - np.round(pos))
    ambiguous = bool(((frac < 2e-4) & (pos > 0.5) & (pos < bins - 0.5)).any())
    counts = np.bincount(idx, minlength=bins).astype(np.float64)
    n = counts.sum()
    centres = (np.arange(bins) + 0.5) / bins
    n0 = np.cumsum(counts)
    w0, w1 = n0 / n, (n - n0) / n
    m0 = np.cumsum(counts * centres) / n
    mt = m0[-1]
    valid = (n0 > 0) & (n0 < n)
    between = np.where(valid, (mt * w0 - m0) ** 2 / np.where(valid, w0 * w1, 1.0), -1.0)
    return idx, between, ambiguous


def check_otsu_mask(values: np.ndarray, mask: np.ndarray, lattice: bool = False) -> None:
    """``mask`` (foreground of one map) is an Otsu split of ``values`` (float64, 1-D)."""
    if values.min() == values.max():
        assert not mask.any(), "a constant map has no foreground (otsu_threshold's docstring)"
        return
    assert mask.any() and (~mask).any(), f"both classes must be non-empty: {values} -> {mask}"
    assert values[mask].min() > values[~mask].max(), "the foreground must be the values above the background"
    if lattice:  # exact Otsu over the sorted distinct values (equal to the histogram's on a lattice)
        u, between = exact_otsu_between(values)
        j = int((u < values[mask].min()).sum())
        assert between[j - 1] >= between.max() * (1 - 1e-4), \
            f"split after {j} of {len(u)} levels: {between[j - 1]} < best {between.max()}"
    idx, between, ambiguous = histogram_otsu(values)
    if ambiguous:
        return
    kb, kf = idx[~mask].max(), idx[mask].min()
    assert kf > kb, "a histogram bin was split between the classes"
    assert between[kb] >= between.max() * (1 - 1e-4), \
        f"split after bin {kb}: between-class variance {between[kb]} < best {between.max()} at bin {between.argmax()}"


def normalized(values: np.ndarray) -> np.ndarray:
    lo, hi = values.min(-1, keepdims=True), values.max(-1, keepdims=True)
    span = hi - lo
    return np.where(span > 0, (values - lo) / np.where(span > 0, span, 1.0), 0.0)


def check_fixed_mask(values: np.ndarray, mask: np.ndarray, value: float) -> None:
    """min-max normalize per map (a constant map -> zeros), ``>= value``; tokens within 1e-5 of
    the threshold (other than the exact minimum and maximum) may go either way in float32."""
    norm = normalized(values)
    expected = norm >= value
    lo, hi = values.min(-1, keepdims=True), values.max(-1, keepdims=True)
    exact = (values == lo) | (values == hi)
    clear = exact | (np.abs(norm - value) > 1e-5)
    assert np.array_equal(mask[clear], expected[clear]), f"fixed {value}: {values} -> {mask}"


def check_top_mask(values: np.ndarray, mask: np.ndarray, value: float) -> None:
    """The ``value`` fraction (rounded, at least 1) of the tokens, with the highest scores."""
    n = values.shape[-1]
    counts = mask.reshape(-1, n).sum(-1)
    allowed = {max(1, math.floor(value * n)), max(1, math.ceil(value * n))}
    assert set(counts.tolist()) <= allowed, f"top {value} of {n}: kept {counts}"
    for v, m in zip(values.reshape(-1, n), mask.reshape(-1, n)):
        if 0 < m.sum() < n:
            assert v[m].min() >= v[~m].max(), "a kept token scores below a dropped one"


def draw_map_values(rng, kind: str, shape):
    """Random maps of several characters (all float64)."""
    if kind == "uniform":
        return rng.random(shape)
    if kind == "normal":
        return rng.normal(size=shape) * 10 ** rng.uniform(-3, 3)
    if kind == "bimodal":
        return np.where(rng.random(shape) < rng.uniform(0.1, 0.9), 1.0, 0.2) + 0.05 * rng.normal(size=shape)
    if kind == "heavy":
        return rng.exponential(size=shape) ** 3
    if kind == "few":  # few distinct values: many ties
        levels = rng.normal(size=rng.integers(1, 4))
        return levels[rng.integers(0, len(levels), size=shape)]
    if kind == "constant":
        return np.full(shape, rng.normal() * 10 ** rng.uniform(-3, 3))
    raise AssertionError(kind)


MAP_KINDS = ["uniform", "normal", "bimodal", "heavy", "few", "constant"]


# =========================================================================== IID: maps -> masks
@fuzz(150)
@given(seed=SEEDS, lead=st.lists(st.integers(1, 3), max_size=2), heads=st.integers(1, 4),
       n_img=st.integers(1, 12), n=st.integers(1, 5), kind=st.sampled_from(["probs", "signed", "equal", "zero"]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_disentangle_heads_equals_the_per_head_relu_difference(seed, lead, heads, n_img, n, kind, dtype):
    rng = np.random.default_rng(seed)
    shape = tuple(lead) + (heads, n_img, n)
    if kind == "probs":
        a = rng.dirichlet(np.ones(n + 2), size=shape[:-1])[..., :n]  # each row: shares of one softmax
    elif kind == "signed":
        a = rng.normal(size=shape)
    elif kind == "equal":  # every instruction the same map: nothing is specific to any of them
        a = np.repeat(rng.random(shape[:-1] + (1,)), n, axis=-1)
    else:
        a = np.zeros(shape)
    x = torch.tensor(a, dtype=dtype)
    got = disentangle_heads(x)
    assert got.shape == x.shape and got.dtype == dtype
    expected = ref_disentangle(np.asarray(x.double()))
    eps = 1e-6 if dtype == torch.float32 else 1e-13
    scale = max(1.0, float(np.abs(a).max()) if a.size else 1.0)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=eps, atol=eps * (n + 1) * scale)
    if n > 1:
        assert bool((got >= 0).all()), "the ReLU is per head: no negative value survives"
    if kind in ("equal", "zero") and n > 1:
        assert float(got.abs().max()) <= eps * (n + 1) * scale


@fuzz(120)
@given(seed=SEEDS, grid=GRIDS, lead=st.lists(st.integers(1, 3), max_size=2),
       sigma=st.one_of(st.just(0.0), st.just(1e-30), st.floats(1e-3, 0.3), st.floats(0.3, 4.0),
                       st.floats(4.0, 25.0)),
       kernel_size=st.one_of(st.none(), st.integers(0, 8).map(lambda k: 2 * k + 1)),
       kind=st.sampled_from(["uniform", "normal", "delta", "constant"]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_gaussian_smooth_equals_a_float64_separable_gaussian(seed, grid, lead, sigma, kernel_size, kind, dtype):
    """Kernel: normalized exp(-d^2 / 2 sigma^2) on d = -r..r, r = ceil(3 sigma) (or kernel_size // 2);
    borders mirrored half-sample symmetric, periodically where the kernel is wider than the grid."""
    rng = np.random.default_rng(seed)
    h, w = grid
    shape = tuple(lead) + (h * w,)
    if kind == "delta":
        a = np.zeros(shape)
        a[..., rng.integers(0, h * w)] = 1.0
    elif kind == "constant":
        a = np.full(shape, rng.normal())
    else:
        a = draw_map_values(rng, kind, shape)
    x = torch.tensor(a, dtype=dtype)
    got = gaussian_smooth(x, grid, sigma, kernel_size)
    assert got.shape == x.shape
    if sigma == 0:  # "sigma <= 0 returns the maps as they are"
        assert torch.equal(got, x) and got.dtype == dtype
        return
    taps = ref_taps(sigma, kernel_size)
    k = gaussian_kernel1d(sigma, kernel_size)
    np.testing.assert_allclose(k.double().numpy(), taps, rtol=1e-6, atol=1e-7)
    expected = ref_smooth(np.asarray(x.double()), grid, sigma, kernel_size)
    scale = max(1e-30, float(np.abs(a).max()))
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5, atol=2e-6 * scale)
    # documented: a constant map stays constant and a map's sum is kept
    if kind == "constant":
        assert bool((got == got[..., :1]).all())
    np.testing.assert_allclose(got.double().sum(-1).numpy(), a.sum(-1), rtol=1e-5, atol=1e-5 * scale * h * w)
    if h == w == 1:  # every tap mirrors onto the single token
        np.testing.assert_allclose(got.double().numpy(), x.double().numpy(), rtol=1e-6, atol=1e-6 * scale)


@fuzz(300)
@given(seed=SEEDS, lead=st.lists(st.integers(1, 3), max_size=2),
       n=st.one_of(st.integers(1, 64), st.integers(65, 600)),
       kind=st.sampled_from(MAP_KINDS + ["lattice", "lattice_few", "two", "tiny_spread"]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float32, torch.float16, torch.bfloat16]))
def test_otsu_maximizes_the_between_class_variance(seed, lead, n, kind, dtype):
    rng = np.random.default_rng(seed)
    shape = tuple(lead) + (n,)
    if kind.startswith("lattice") and dtype in (torch.float16, torch.bfloat16):
        kind = "few"  # 16-bit rounding moves lattice values off their levels
    lattice = kind.startswith("lattice")
    if lattice:
        # levels 0..255 with both ends present: bin of level v is v, so histogram Otsu is exact Otsu
        top = 255
        levels = rng.integers(0, top + 1, size=shape) if kind == "lattice" else \
            rng.choice(np.array([0, top] + list(rng.integers(0, top + 1, size=3))), size=shape)
        flat = levels.reshape(-1, n)
        flat[:, 0], flat[:, -1] = 0, top
        a = rng.uniform(-1, 1) + rng.uniform(0.01, 10) * flat.reshape(shape)
    elif kind == "two":
        lo = rng.normal()
        a = np.where(rng.random(shape) < 0.5, lo, lo + rng.normal() ** 2 + 1e-3)
    elif kind == "tiny_spread":  # a spread of a few float32 steps beside the values
        base = np.float32(rng.uniform(0.25, 4))
        steps = rng.integers(0, 6, size=shape)
        a = np.array([np.float64(base) + s * float(np.spacing(base)) for s in steps.ravel()]).reshape(shape)
    else:
        a = draw_map_values(rng, kind, shape)
    x = torch.tensor(a, dtype=dtype)
    t = otsu_threshold(x)
    assert t.shape == x.shape[:-1] and t.dtype == dtype
    mask = binarize(x, "otsu")
    assert torch.equal(mask, x >= t.unsqueeze(-1)), "foreground is where the map is >= its threshold"
    vals = x.double().numpy().reshape(-1, n)
    for v, m, tt in zip(vals, mask.numpy().reshape(-1, n), t.double().numpy().reshape(-1)):
        if v.min() == v.max():
            assert tt == np.inf, "a constant map's threshold is +inf"
        check_otsu_mask(v, m, lattice=lattice)


@fuzz(60)
@given(seed=SEEDS, n=st.integers(2, 40), ulps=st.integers(1, 4),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]))
def test_otsu_splits_two_values_however_close(seed, n, ulps, dtype):
    """'keeps the histogram's two classes however small the spread': foreground = the larger value."""
    rng = np.random.default_rng(seed)
    lo = torch.tensor(rng.uniform(-8, 8), dtype=dtype)
    hi = lo
    for _ in range(ulps):
        hi = torch.nextafter(hi, torch.tensor(float("inf"), dtype=dtype))
    upper = torch.tensor(rng.random(n) < 0.5)
    upper[0], upper[-1] = False, True
    x = torch.where(upper, hi, lo)
    assert torch.equal(binarize(x, "otsu"), upper)
    assert otsu_threshold(x).dtype == dtype


@fuzz(150)
@given(seed=SEEDS, lead=st.lists(st.integers(1, 3), max_size=2), n=st.integers(1, 40),
       kind=st.sampled_from(MAP_KINDS), rule=st.sampled_from(["fixed", "top", "key"]),
       # (values in (0, 1.4e-45) round to 0 against a float32 map: test_fixed_threshold_is_not_rounded_to_0)
       value=st.one_of(st.sampled_from([0.0, 0.2, 0.5, 1.0]), st.floats(1e-30, 1.0)),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_fixed_and_top_thresholds(seed, lead, n, kind, rule, value, dtype):
    rng = np.random.default_rng(seed)
    a = draw_map_values(rng, kind, tuple(lead) + (n,))
    x = torch.tensor(a, dtype=dtype)
    xs = x.double().numpy()
    if rule == "top":
        value = max(value, 1e-3)  # (0, 1]
        mask = binarize(x, "top", value)
        check_top_mask(xs, mask.numpy(), value)
    elif rule == "fixed":
        check_fixed_mask(xs, binarize(x, "fixed", value).numpy(), value)
    else:  # HeadRouter step 4: min-max normalize, threshold 0.2 by default
        check_fixed_mask(xs, key_region_masks(x).numpy(), 0.2)
        check_fixed_mask(xs, key_region_masks(x, value).numpy(), value)


def test_fixed_threshold_is_not_rounded_to_0():
    """'"fixed" (value in [0, 1] on the min-max normalized map ...; a constant map normalizes to
    zeros)': 0 >= 1e-46 is False, yet a float32 map compares with float32(1e-46) = 0; in float16,
    any value below 6e-8 does the same."""
    assert not binarize(torch.full((4,), 0.5), "fixed", 1e-46).any()
    assert binarize(torch.tensor([0.0, 1.0]), "fixed", 1e-46).tolist() == [False, True]
    assert binarize(torch.tensor([0.0, 1.0], dtype=torch.float16), "fixed", 1e-9).tolist() == [False, True]


def test_thresholds_of_maps_whose_spread_overflows():
    """'a map is foreground where >= t ... A constant map has no two classes': this one has two;
    min-max normalization of [-3e38, 0, 3e38] is [0, 0.5, 1]."""
    assert binarize(torch.tensor([-3e38, -3e38, 3e38, 3e38]), "otsu").tolist() == [False, False, True, True]
    assert binarize(torch.tensor([-3e38, 0.0, 3e38]), "fixed", 0.2).tolist() == [False, True, True]


def _top_ties_picked_by_order():
    for n in (16, 17, 40, 100):
        got = binarize(torch.zeros(n), "top", 0.5).nonzero().flatten().tolist()
        assert got == list(range(round(0.5 * n))), f"n={n}: kept {got[:10]}..."


def test_top_breaks_ties_by_token_order():
    """binarize: '"top" (the value fraction in (0, 1] of tokens with the highest score, ties broken
    by order)'. A constant map of 17 tokens at 0.5 keeps tokens [8, 10, 11, ...], not [0..7]."""
    _top_ties_picked_by_order()


@fuzz(80)
@given(seed=SEEDS, grid=GRIDS, heads=st.integers(1, 4), n=st.integers(1, 4), batched=st.booleans(),
       sigma=st.one_of(st.just(0.0), st.floats(0.2, 3.0)),
       kernel_size=st.one_of(st.none(), st.sampled_from([1, 3, 5])),
       rule=st.sampled_from(["otsu", "fixed", "top"]), value=st.floats(0.05, 1.0),
       kind=st.sampled_from(["probs", "planted", "flat"]))
def test_iid_masks_end_to_end(seed, grid, heads, n, batched, sigma, kernel_size, rule, value, kind):
    """IID step 3: per-head ReLU difference, head mean, smoothing on the grid, threshold."""
    rng = np.random.default_rng(seed)
    h, w = grid
    lead = (int(rng.integers(1, 3)),) if batched else ()
    shape = lead + (heads, h * w, n)
    if kind == "probs":
        a = rng.dirichlet(np.ones(n + 3), size=shape[:-1])[..., :n]
    elif kind == "planted":  # instruction i attended more inside a random region
        a = rng.random(shape) * 0.1
        for i in range(n):
            region = rng.random(h * w) < 0.4
            a[..., region, i] += 0.5
    else:  # every map flat: nothing to find
        a = np.full(shape, rng.random())
    x = torch.tensor(a, dtype=torch.float32)
    masks, soft = iid_masks(x, grid, sigma=sigma, kernel_size=kernel_size, threshold=rule, threshold_value=value)
    assert masks.dtype == torch.bool and masks.shape == lead + (n, h * w) and soft.shape == masks.shape
    m = ref_disentangle(np.asarray(x.double())).mean(-3)  # [..., N_img, N]: mean over heads
    expected = ref_smooth(np.swapaxes(m, -1, -2), grid, sigma, kernel_size)
    np.testing.assert_allclose(soft.double().numpy(), expected, rtol=1e-5, atol=1e-6)
    s = soft.double().numpy().reshape(-1, h * w)
    got = masks.numpy().reshape(-1, h * w)
    for v, mk in zip(s, got):
        if rule == "otsu":
            check_otsu_mask(v, mk)
        elif rule == "fixed":
            check_fixed_mask(v, mk, value)
        else:
            check_top_mask(v, mk, value)
    if kind == "flat" and rule == "otsu":
        assert not masks.any(), "flat maps have no Otsu foreground"


@fuzz(80)
@given(seed=SEEDS, grid=GRIDS, n=st.integers(1, 4), channels=st.integers(1, 3), density=st.floats(0, 1))
def test_blend_averages_branches_inside_masks_and_keeps_the_combined_latents_outside(seed, grid, n, channels,
                                                                                    density):
    """IID step 4 (pipeline's layout): token (r, c) of the grid covers latent pixels (2r..2r+1, 2c..2c+1)."""
    rng = np.random.default_rng(seed)
    h, w = grid
    masks = rng.random((n, h * w)) < density
    branches = rng.normal(size=(n, channels, 2 * h, 2 * w))
    combined = rng.normal(size=(1, channels, 2 * h, 2 * w))
    got = blend_branches(torch.tensor(branches, dtype=torch.float32), torch.tensor(combined, dtype=torch.float32),
                         torch.tensor(masks), grid)
    expected = np.empty_like(combined)
    for y in range(2 * h):
        for xx in range(2 * w):
            token = (y // 2) * w + xx // 2
            inside = [i for i in range(n) if masks[i, token]]
            expected[0, :, y, xx] = np.mean([branches[i, :, y, xx] for i in inside], axis=0) if inside else \
                combined[0, :, y, xx]
    assert got.shape == (1, channels, 2 * h, 2 * w)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-6, atol=1e-6)


# =========================================================================== IID: the policy door
def dense_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """float64 softmax attention ``[B, H, N, N]`` of bnhd q, k."""
    q, k = q.double().transpose(1, 2), k.double().transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)


def allow_of(tags, batch: int) -> np.ndarray:
    """``[B, N, N]``: query i sees key j iff its tags share a bit (README)."""
    qt, kt = tags.q_tags, tags.k_tags
    qt = qt.reshape(1, -1) if qt.dim() == 1 else qt
    kt = kt.reshape(1, -1) if kt.dim() == 1 else kt
    qt, kt = qt.expand(batch, -1).long(), kt.expand(batch, -1).long()
    return ((qt[:, :, None] & kt[:, None, :]) != 0).numpy()


@st.composite
def iid_layouts(draw):
    """Instructions (relative to the text start) with shared text around them, a grid, extra
    ranges, and the ranges laid out in a random order."""
    n = draw(st.integers(1, 4))
    gaps = [draw(st.integers(0, 2)) for _ in range(n + 1)]
    instructions, pos = [], gaps[0]
    for g in gaps[1:]:
        length = draw(st.integers(1, 3))
        instructions.append((pos, pos + length))
        pos += length + g
    n_text = pos
    grid = draw(GRIDS.filter(lambda g: g[0] * g[1] <= 20))
    extras = [(name, draw(st.integers(1, 3))) for name in ("source", "time") if draw(st.booleans())]
    blocks = [("text", n_text), ("image", grid[0] * grid[1])] + extras
    order = draw(st.permutations(range(len(blocks))))
    ranges, start = {}, 0
    for j in order:
        name, size = blocks[j]
        ranges[name] = (start, start + size)
        start += size
    extra = tuple((name, ranges[name]) for name, _ in extras)
    return instructions, grid, ranges["text"], ranges["image"], extra


def token_kinds(seq_len, text, image, extra, instructions, visible_names, shared_text):
    """Each token as ('instr', i), ('img', p), ('vis',) or ('dead',) per IIDConfig's docs:
    extras named in visible_ranges (None = all) and, with shared_text="visible", text outside
    every instruction are conditioning; an extra left out and hidden shared text carry no bit
    (instruction_tags: they see nothing and nothing sees them)."""
    kinds = [("dead",)] * seq_len
    for t in range(*text):
        kinds[t] = ("vis",) if shared_text == "visible" else ("dead",)
    for i, (a, b) in enumerate(instructions):
        for t in range(text[0] + a, text[0] + b):
            kinds[t] = ("instr", i)
    for t in range(*image):
        kinds[t] = ("img", t - image[0])
    for name, (a, b) in extra:
        for t in range(a, b):
            kinds[t] = ("vis",) if visible_names is None or name in visible_names else ("dead",)
    return kinds


def step5_allow(kinds, masks: np.ndarray, background: str) -> np.ndarray:
    """METHODS.md IID step 5 for one batch row: image in M_i sees P_i and not P_k (overlaps: the
    union), background sees no instruction ("none") or all ("all"); P_i sees P_i and all image;
    image sees all image; conditioning seen by and seeing every token that takes part."""
    n_instr = masks.shape[0]
    n = len(kinds)
    allow = np.zeros((n, n), dtype=bool)
    for qi, kq in enumerate(kinds):
        for kj, kk in enumerate(kinds):
            if kq[0] == "dead" or kk[0] == "dead":
                continue
            if kq[0] == "vis" or kk[0] == "vis":
                allow[qi, kj] = True
            elif kq[0] == "instr":
                allow[qi, kj] = kk[0] == "img" or kk[1] == kq[1]
            elif kk[0] == "img":
                allow[qi, kj] = True
            else:
                regions = [i for i in range(n_instr) if masks[i, kq[1]]]
                if not regions and background == "all":
                    regions = list(range(n_instr))
                allow[qi, kj] = kk[1] in regions
    return allow


def isolation_allow(seq_len, text, instructions, keep) -> np.ndarray:
    """A single-instruction branch (instruction ``keep``; None = the combined branch): every token
    reads everything but the other instructions' text."""
    allow = np.ones((seq_len, seq_len), dtype=bool)
    if keep is not None:
        for i, (a, b) in enumerate(instructions):
            if i != keep:
                allow[:, text[0] + a:text[0] + b] = False
    return allow


@fuzz(25)
@given(seed=SEEDS, layout=iid_layouts(), num_steps=st.integers(2, 6), num_layers=st.integers(1, 4),
       data=st.data())
def test_iid_policy_over_a_run(seed, layout, num_steps, num_layers, data):
    """Steps <= S: branch isolation tags; at S, the map layers' probes (through attend, reference
    backend; only a step's first call of a layer) give per-head means over each instruction's
    tokens of the combined row's image x text attention, averaged over the map layers, and the
    masks of IID step 3; steps S+1 .. mask_until: the step-5 allow table; later steps: nothing.
    Precomputed masks: no capture, the step-5 table after S and on calls without a step. A second
    run (the steps go back) captures afresh."""
    instructions, grid, text, image, extra = layout
    n, n_img = len(instructions), grid[0] * grid[1]
    s = data.draw(st.one_of(st.none(), st.integers(0, num_steps - 2)), label="map_step")
    resolved_s = default_map_step(num_steps) if s is None else s
    if resolved_s >= num_steps - 1:
        s = resolved_s = num_steps - 2
    mask_until = data.draw(st.one_of(st.none(), st.integers(resolved_s + 1, num_steps - 1)), label="mask_until")
    layer_int = st.integers(-num_layers, num_layers - 1)
    map_layer = data.draw(st.one_of(layer_int, st.lists(layer_int, min_size=1, max_size=3)), label="map_layer")
    names = [name for name, _ in extra]
    visible = data.draw(st.one_of(st.none(), st.lists(st.sampled_from(names), unique=True) if names else
                                  st.just([])), label="visible_ranges")
    cfg = IIDConfig(map_step=s, map_layer=map_layer, sigma=data.draw(st.sampled_from([0.0, 0.7, 1.5])),
                    threshold=data.draw(st.sampled_from(["otsu", "fixed", "top"])),
                    threshold_value=data.draw(st.sampled_from([0.2, 0.5, 1.0])),
                    background=data.draw(st.sampled_from(["none", "all"])), mask_until=mask_until,
                    visible_ranges=visible, shared_text=data.draw(st.sampled_from(["visible", "hidden"])))
    rng = np.random.default_rng(seed)
    precomputed = rng.random((n, n_img)) < 0.4 if data.draw(st.booleans(), label="precomputed") else None
    runs = data.draw(st.integers(1, 2), label="runs")
    rows = list(range(n)) + [None]  # the pipeline's layout: one branch per instruction, then the combined one
    policy = IIDPolicy(instructions, grid, cfg, row_instruction=rows,
                       masks=None if precomputed is None else torch.tensor(precomputed))
    seq_len = max([text[1], image[1]] + [r[1] for _, r in extra])
    layers = sorted({layer % num_layers for layer in ([map_layer] if isinstance(map_layer, int) else map_layer)})
    g = torch.Generator().manual_seed(seed % 2 ** 63)
    heads = int(torch.randint(1, 4, (1,), generator=g))
    kinds = token_kinds(seq_len, text, image, extra, instructions, visible, cfg.shared_text)
    last = num_steps - 1 if mask_until is None else mask_until

    def check_isolation(req):
        allow = allow_of(req.tags, n + 1)
        for r, keep in enumerate(rows):
            assert np.array_equal(allow[r], isolation_allow(seq_len, text, instructions, keep)), \
                f"isolation, row {r} (instruction {keep})"

    for run in range(runs):
        captured, late_allow = [], None
        if precomputed is not None:
            late_allow = step5_allow(kinds, precomputed, cfg.background)
            req = policy.request(AttentionSite(block=0, block_kind="double", text=text, image=image, extra=extra))
            assert np.array_equal(allow_of(req.tags, 1)[0], late_allow), "a call without a step: masked"
        for step in range(num_steps):
            for layer in range(num_layers):
                site = AttentionSite(block=layer, block_kind="double", text=text, image=image, step=step,
                                     num_steps=num_steps, layer=layer, num_layers=num_layers, extra=extra)
                if step == resolved_s and layer in layers and precomputed is None:
                    q, k, v = (torch.randn(n + 1, seq_len, heads, 4, generator=g) for _ in range(3))
                    req = policy.request(site)
                    assert len(req.probes) == 1
                    check_isolation(req)
                    attend(q, k, v, site, _Replay(policy, req), backend="reference")
                    p = dense_probs(q, k)[n]  # the combined row: nothing hidden from it
                    captured.append(torch.stack([p[:, image[0]:image[1], text[0] + a:text[0] + b].mean(-1)
                                                 for a, b in instructions], dim=-1))  # [H, N_img, N]
                    # a second forward of the capture step (true CFG's negative prompt): not probed
                    assert not policy.request(site).probes
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # an empty captured mask warns
                    req = policy.request(site)
                if step <= resolved_s:
                    assert req is not None and not req.probes and req.tags is not None
                    check_isolation(req)
                elif step <= last:
                    assert req is not None and req.tags is not None and not req.probes
                    if late_allow is None:
                        late_allow = step5_allow(kinds, policy.masks.numpy(), cfg.background)
                    assert np.array_equal(allow_of(req.tags, 1)[0], late_allow), f"step {step}: step-5 allow table"
                else:
                    assert req is None, f"step {step} is past mask_until={mask_until}"
            if step == resolved_s and precomputed is None:
                maps = torch.stack(captured).mean(0)
                torch.testing.assert_close(policy.per_head_maps.double(), maps, rtol=1e-4, atol=1e-6)
                ref = ref_smooth(np.swapaxes(ref_disentangle(maps.numpy()).mean(0), 0, 1), grid, cfg.sigma)
                np.testing.assert_allclose(policy.soft.double().numpy(), ref, rtol=1e-4, atol=1e-5)
                for v, mk in zip(policy.soft.double().numpy(), policy.masks.numpy()):
                    {"otsu": lambda: check_otsu_mask(v, mk),
                     "fixed": lambda: check_fixed_mask(v, mk, cfg.threshold_value),
                     "top": lambda: check_top_mask(v, mk, cfg.threshold_value)}[cfg.threshold]()
        if precomputed is not None:
            assert torch.equal(policy.masks, torch.tensor(precomputed))


class _Replay:
    """Hands attend a request already taken from ``policy`` (the capture counts each request)."""

    def __init__(self, policy, request):
        self.policy, self.req = policy, request

    def request(self, site):
        return self.req

    def receive(self, site, result):
        return self.policy.receive(site, result)


@fuzz(40)
@given(seed=SEEDS, layout=iid_layouts(), data=st.data())
def test_iid_mask_policy_tags_follow_step5(seed, layout, data):
    """IIDMaskPolicy's tags, per row: the step-5 table for masked rows (shared [N, N_img] or
    per-row [B, N, N_img] masks), everything for the others; forwards="first": a repeated
    (step, layer) call of a step runs unmasked; nothing outside the step window."""
    instructions, grid, text, image, extra = layout
    n, n_img = len(instructions), grid[0] * grid[1]
    rng = np.random.default_rng(seed)
    batch = data.draw(st.integers(1, 3), label="batch")
    per_row = data.draw(st.booleans(), label="per_row_masks")
    density = data.draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]), label="density")
    masks = rng.random((batch, n, n_img) if per_row else (n, n_img)) < density
    masked_rows = data.draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=batch, max_size=batch)),
                            label="masked_rows")
    names = [name for name, _ in extra]
    visible = data.draw(st.one_of(st.none(), st.lists(st.sampled_from(names), unique=True) if names else
                                  st.just([])), label="visible_ranges")
    cfg = IIDConfig(background=data.draw(st.sampled_from(["none", "all"])), visible_ranges=visible,
                    shared_text=data.draw(st.sampled_from(["visible", "hidden"])))
    from_step = data.draw(st.one_of(st.none(), st.integers(0, 3)), label="from_step")
    until_step = data.draw(st.one_of(st.none(), st.integers(0, 4)), label="until_step")
    forwards = data.draw(st.sampled_from(["all", "first"]), label="forwards")
    policy = IIDMaskPolicy(instructions, torch.tensor(masks), cfg, from_step=from_step, until_step=until_step,
                           masked_rows=masked_rows, forwards=forwards)
    seq_len = max([text[1], image[1]] + [r[1] for _, r in extra])
    kinds = token_kinds(seq_len, text, image, extra, instructions, visible, cfg.shared_text)
    # (a call without a step is in the window when it has no start: only IIDPolicy documents it)
    for step in ((None,) if from_step is None else ()) + (0, 1, 2, 3, 4):
        for repeat in range(2):  # two forwards of the step
            site = AttentionSite(block=0, block_kind="double", text=text, image=image, step=step, num_steps=5,
                                 layer=0, num_layers=1, extra=extra)
            req = policy.request(site)
            in_window = (step is None and from_step is None) or (
                step is not None and (from_step is None or step >= from_step) and
                (until_step is None or step <= until_step))
            later = forwards == "first" and step is not None and repeat == 1
            if not in_window or later or (masked_rows is not None and not any(masked_rows)):
                assert req is None, (step, repeat)
                continue
            assert req is not None and req.tags is not None
            allow = allow_of(req.tags, batch)
            for r in range(batch):
                if masked_rows is not None and not masked_rows[r]:
                    assert allow[r].all(), f"unmasked row {r}"
                    continue
                expected = step5_allow(kinds, masks[r] if per_row else masks, cfg.background)
                assert np.array_equal(allow[r], expected), f"row {r}, step {step}"


@fuzz(30)
@given(seed=SEEDS, data=st.data())
def test_iid_image_map_sources_per_branch_row(seed, data):
    """OmniGen-style sources (IIDConfig.map_source), per branch row i of instruction i and per head:
    "image_colmean": the column mean over image queries of the attention on the key range (one
    value per key of the grid); "image_propagation": A_h @ x over the key range for a per-key
    signal x (default: its indicator), one value per image query of the grid."""
    n = data.draw(st.integers(1, 3), label="n")
    grid = data.draw(GRIDS.filter(lambda g: g[0] * g[1] <= 16), label="grid")
    source = data.draw(st.sampled_from(["image_colmean", "image_propagation"]), label="source")
    kontext = data.draw(st.booleans(), label="kontext")  # keys: a "source" range of the grid's size
    n_grid = grid[0] * grid[1]
    n_img = n_grid if (source == "image_propagation" or not kontext) else data.draw(st.integers(1, 8), "n_img")
    instructions = [(2 * i, 2 * i + 2) for i in range(n)]
    text = (0, 2 * n)
    image = (text[1], text[1] + n_img)
    extra = (("source", (image[1], image[1] + n_grid)),) if kontext else ()
    seq_len = image[1] + (n_grid if kontext else 0)
    key_range = extra[0][1] if kontext else image
    batch = n + 1
    branch_rows = data.draw(st.permutations(range(batch)), label="rows")[:n]
    g = torch.Generator().manual_seed(seed % 2 ** 63)
    signal = None
    if source == "image_propagation" and data.draw(st.booleans(), label="signal"):
        signal = torch.randn(key_range[1] - key_range[0], 1, generator=g)
    cfg = IIDConfig(map_source=source, map_step=0, map_layer=0, image_key_range="source" if kontext else "image",
                    propagation_signal=signal, sigma=0.0)
    policy = IIDMapPolicy(instructions, grid, cfg, branch_rows=branch_rows)
    heads = data.draw(st.integers(1, 3), label="heads")
    q, k, v = (torch.randn(batch, seq_len, heads, 4, generator=g) for _ in range(3))
    site = AttentionSite(block=0, block_kind="double", text=text, image=image, step=0, num_steps=2, layer=0,
                         num_layers=1, extra=extra)
    attend(q, k, v, site, policy, backend="reference")
    p = dense_probs(q, k)  # [B, H, N, N]
    maps = []
    for r in branch_rows:
        block = p[r, :, image[0]:image[1], key_range[0]:key_range[1]]  # [H, N_img, N_key]
        if source == "image_colmean":
            maps.append(block.mean(1))  # [H, N_key]
        else:
            x = torch.ones(key_range[1] - key_range[0], 1, dtype=torch.float64) if signal is None else signal.double()
            maps.append((block @ x)[..., 0])  # [H, N_img]
    expected = torch.stack(maps, dim=-1)  # [H, N_grid, N]
    torch.testing.assert_close(policy.per_head_maps.double(), expected, rtol=1e-4, atol=1e-6)


# =========================================================================== HeadRouter
@fuzz(150)
@given(seed=SEEDS, lead=st.lists(st.integers(1, 3), max_size=2), n_img=st.integers(1, 12), n_txt=st.integers(1, 6),
       alpha=st.floats(0.01, 10), upsilon=st.floats(-20, 20), kind=st.sampled_from(["probs", "signed", "constant"]))
def test_dtr_weights_take_the_softmax_over_image_tokens(seed, lead, n_img, n_txt, alpha, upsilon, kind):
    rng = np.random.default_rng(seed)
    shape = tuple(lead) + (n_img, n_txt)
    if kind == "probs":
        a = rng.dirichlet(np.ones(n_txt + 4), size=shape[:-1])[..., :n_txt]
    elif kind == "signed":
        a = rng.normal(size=shape) * 5
    else:
        a = np.full(shape, rng.random())
    x = torch.tensor(a, dtype=torch.float32)
    w = dtr_weights(x, alpha, upsilon)
    assert w.shape == x.shape and w.dtype == torch.float32 and w.is_contiguous()
    expected = alpha * sigmoid_np(upsilon * softmax_np(np.asarray(x.double()), axis=-2))  # per text token
    np.testing.assert_allclose(w.double().numpy(), expected, rtol=2e-6, atol=1e-6 * alpha)
    if kind == "constant" or n_img == 1:  # every image token gets 1 / N_img
        np.testing.assert_allclose(w.double().numpy(), alpha * sigmoid_np(upsilon / n_img) * np.ones(shape),
                                   rtol=2e-6)
    # the code form: one weight per image token from its text mass, softmax over the image tokens
    mass = x.sum(-1)
    wt = dtr_token_weights(mass, alpha, upsilon)
    np.testing.assert_allclose(wt.double().numpy(), alpha * sigmoid_np(upsilon * softmax_np(mass.double().numpy(), -1)),
                               rtol=2e-6, atol=1e-6 * alpha)


def random_pairs(rng, batch):
    rows = rng.permutation(batch)
    count = int(rng.integers(1, batch // 2 + 1))
    return tuple((int(rows[2 * p]), int(rows[2 * p + 1])) for p in range(count))


def expected_headrouter(q, k, v, text, image, cfg, kind, multiplier_map=None):
    """One HeadRouter call in float64 from bnhd q, k, v (METHODS.md HeadRouter 1-2).

    Paper DTR: the edit rows' image-query x text-key probabilities times
    w = alpha * sigmoid(upsilon * softmax over image tokens of A^{ZP}) (A^{ZP}: this call's,
    or ``multiplier_map`` [P, 1 or H, N_img, N_txt] for dtr_map='previous'; the normalizer
    unchanged); IARouter on the weighted output; the code form weighs the image-token outputs.
    Returns (out [B, N, H, D], A^{ZP} of the edit rows)."""
    p = dense_probs(q, k)  # [B, H, N, N]
    (i0, i1), (t0, t1) = image, text
    edits = [b for _, b in cfg.pairs]
    kinds = cfg.dtr_kinds()
    here = cfg.dtr_image != "off" and t1 > t0 and i1 > i0 and (kinds is None or kind in kinds)
    zp = torch.stack([p[r, :, i0:i1, t0:t1] for r in edits])  # [P, H, N_img, N_txt]
    if cfg.dtr_heads == "mean":
        zp = zp.mean(1, keepdim=True)
    weighted = p.clone()
    if here and cfg.dtr_image == "paper":
        source = zp if cfg.dtr_map == "same" else multiplier_map
        if source is not None:
            w = cfg.alpha * torch.sigmoid(cfg.upsilon * torch.softmax(source, dim=-2))
            for j, r in enumerate(edits):
                weighted[r, :, i0:i1, t0:t1] = w[j] * p[r, :, i0:i1, t0:t1]
    out = weighted @ v.double().transpose(1, 2)  # [B, H, N, D]
    if cfg.route:
        for a, b in cfg.pairs:
            x0, x1 = out[a].flatten(1), out[b].flatten(1)  # [H, N*D]
            s = (x0 * x1).sum(-1) / (x0.norm(dim=-1) * x1.norm(dim=-1))
            d = (s.max() - s) / max(float(s.max() - s.min()), 1e-6)
            out[b] = out[b] * (1 + cfg.gamma * torch.sigmoid(d - cfg.delta))[:, None, None]
    if here and cfg.dtr_image == "code":
        for r in edits:
            mass = p[r, :, i0:i1, t0:t1].sum(-1).mean(0)  # head-mean text mass per image token
            out[r, :, i0:i1] = out[r, :, i0:i1] * (cfg.alpha * torch.sigmoid(cfg.upsilon * torch.softmax(mass, -1)))[
                None, :, None]
    return out.transpose(1, 2), zp


@fuzz(30)
@given(seed=SEEDS, data=st.data())
def test_headrouter_calls_equal_the_float64_formulas(seed, data):
    rng = np.random.default_rng(seed)
    batch = data.draw(st.integers(2, 4), label="batch")
    pairs = random_pairs(rng, batch)
    form = data.draw(st.sampled_from(["same", "previous", "code", "off"]), label="form")
    cfg = HeadRouterConfig(
        pairs=pairs, route=form != "code" and data.draw(st.booleans(), label="route"),
        dtr_image={"same": "paper", "previous": "paper"}.get(form, form),
        dtr_map="previous" if form == "previous" else "same",
        dtr_heads=data.draw(st.sampled_from(["mean", "keep"]), label="heads"),
        alpha=data.draw(st.sampled_from([2.0, 5.0, 0.5]), label="alpha"),
        upsilon=data.draw(st.sampled_from([5.0, -3.0, 0.0, 40.0]), label="upsilon"),
        gamma=data.draw(st.sampled_from([0.2, 1.0]), label="gamma"), delta=0.5,
        layout=data.draw(st.sampled_from(["bnhd", "bhnd"]), label="layout"))
    n_text, n_img = data.draw(st.integers(1, 5), label="n_text"), data.draw(st.integers(1, 9), label="n_img")
    heads, dim = data.draw(st.integers(1, 3), label="heads"), data.draw(st.sampled_from([2, 4, 8]), label="dim")
    kind = data.draw(st.sampled_from(["double", "single", "joint"]), label="block_kind")
    text, image = ((0, n_text), (n_text, n_text + n_img)) if data.draw(st.booleans(), label="text_first") else \
        ((n_img, n_img + n_text), (0, n_img))
    policy = HeadRouterPolicy(cfg)
    g = torch.Generator().manual_seed(seed % 2 ** 63)
    prev_map = None
    for step in range(2 if form == "previous" else 1):
        q, k, v = (torch.randn(batch, n_text + n_img, heads, dim, generator=g) for _ in range(3))
        site = AttentionSite(block=0, block_kind=kind, text=text, image=image, step=step, num_steps=4)
        lay = (lambda t: t) if cfg.layout == "bnhd" else (lambda t: t.transpose(1, 2))
        out = attend(lay(q), lay(k), lay(v), site, policy, layout=cfg.layout, backend="reference")
        expected, zp = expected_headrouter(q, k, v, text, image, cfg, kind, multiplier_map=prev_map)
        torch.testing.assert_close(lay(out).double(), expected, rtol=1e-4, atol=1e-5)
        prev_map = zp


@fuzz(150)
@given(data=st.data())
def test_headrouter_requests(data):
    """The policy door: outside ``steps`` (a call without a step is outside any window) nothing;
    DTR (a probe) where the form is on, the call has text and image tokens and the block kind is
    in dtr_block_kinds (None: every kind for the paper form, single blocks for the code form);
    IARouter's pair statistics on every routed call, except that same-call DTR takes them on the
    weighted output (so asks for the LSE instead)."""
    cfg = HeadRouterConfig(
        route=data.draw(st.booleans()), dtr_image=data.draw(st.sampled_from(["paper", "code", "off"])),
        dtr_map=data.draw(st.sampled_from(["same", "previous"])),
        dtr_block_kinds=data.draw(st.one_of(st.none(), st.lists(st.sampled_from(["double", "single", "joint"]),
                                                                min_size=1, max_size=2))),
        steps=data.draw(st.one_of(st.none(), st.tuples(st.integers(0, 3), st.integers(0, 5)).filter(
            lambda w: w[0] < w[1]))))
    policy = HeadRouterPolicy(cfg)
    n_text, n_img = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 3))
    text, image = (0, n_text), (n_text, n_text + n_img)
    kind = data.draw(st.sampled_from(["double", "single", "joint"]))
    step = data.draw(st.one_of(st.none(), st.integers(0, 5)))
    req = policy.request(AttentionSite(block=0, block_kind=kind, text=text, image=image, step=step))
    active = cfg.steps is None or (step is not None and cfg.steps[0] <= step < cfg.steps[1])
    kinds = cfg.dtr_block_kinds if cfg.dtr_block_kinds is not None else (
        ("single",) if cfg.dtr_image == "code" else None)
    dtr = cfg.dtr_image != "off" and n_text > 0 and n_img > 0 and (kinds is None or kind in kinds)
    same_call = dtr and cfg.dtr_image == "paper" and cfg.dtr_map == "same"
    stats = cfg.route and not same_call
    if not active or not (dtr or stats):
        assert req is None
        return
    assert req is not None
    assert (req.pair_stats is not None) == stats and (not stats or list(req.pair_stats) == list(cfg.pairs))
    assert len(req.probes) == (1 if dtr else 0)
    assert req.return_lse == same_call
    assert req.block_multiplier is None  # the first call of a block has no previous map


@fuzz(60)
@given(seed=SEEDS, batch=st.integers(1, 4), tokens=st.integers(1, 6), channels=st.integers(1, 4),
       block=st.integers(0, 5), num_blocks=st.integers(1, 6), keep=st.one_of(st.just(0.1), st.floats(0, 1)),
       rows=st.one_of(st.none(), st.lists(st.integers(0, 3), unique=True)))
def test_text_residual_mixes_entering_and_leaving_text(seed, batch, tokens, channels, block, num_blocks, keep, rows):
    """HeadRouter 3: text entering double block l = keep * (entering l-1) + (1 - keep) * (leaving
    l-1), keep = 0.1 by default; only the given rows; the last double block's output left alone."""
    rows = None if rows is None else [r for r in rows if r < batch]
    rng = np.random.default_rng(seed)
    t_in, t_out = rng.normal(size=(2, batch, tokens, channels))
    res = TextResidual(keep, rows=rows)
    got = res(block, num_blocks, torch.tensor(t_in, dtype=torch.float32), torch.tensor(t_out, dtype=torch.float32))
    expected = t_out.copy()
    if block < num_blocks - 1:
        for r in range(batch) if rows is None else rows:
            expected[r] = keep * t_in[r] + (1 - keep) * t_out[r]
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-6, atol=1e-6)
    assert TextResidual().keep == 0.1 and HeadRouterConfig().dtr_text_keep == 0.1


@fuzz(25)
@given(seed=SEEDS, data=st.data())
def test_key_regions_sum_heads_over_first_forwards_and_threshold(seed, data):
    """HeadRouter 4: sum_h A_h[image rows, token] (a token range: its tokens summed), summed over
    the first forward of every captured (step, block), min-max normalized per token, >= 0.2."""
    n_text, n_img = data.draw(st.integers(1, 6), label="n_text"), data.draw(st.integers(1, 12), label="n_img")
    tok = st.integers(0, n_text - 1)
    tokens = data.draw(st.lists(st.one_of(tok, tok.flatmap(lambda a: st.tuples(st.just(a), st.integers(
        a + 1, n_text)))), min_size=1, max_size=3), label="tokens")
    groups = [(t, t + 1) if isinstance(t, int) else t for t in tokens]
    batch = data.draw(st.integers(1, 3), label="batch")
    row = data.draw(st.integers(0, batch - 1), label="row")
    steps = data.draw(st.one_of(st.none(), st.lists(st.integers(0, 3), max_size=3)), label="steps")
    kinds = data.draw(st.one_of(st.none(), st.lists(st.sampled_from(["double", "single"]), min_size=1)),
                      label="block_kinds")
    policy = KeyRegionPolicy(tokens, row=row, steps=steps, block_kinds=kinds)
    text_first = data.draw(st.booleans(), label="text_first")
    text, image = ((0, n_text), (n_text, n_text + n_img)) if text_first else ((n_img, n_img + n_text), (0, n_img))
    g = torch.Generator().manual_seed(seed % 2 ** 63)
    heads = data.draw(st.integers(1, 3), label="heads")
    expected, summed = None, set()
    calls = data.draw(st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["double", "single"]), st.integers(0, 1)),
                               min_size=1, max_size=5), label="calls")
    for step, kind, block in sorted(calls):  # steps only grow within a run
        q, k, v = (torch.randn(batch, n_text + n_img, heads, 4, generator=g) for _ in range(3))
        site = AttentionSite(block=block, block_kind=kind, text=text, image=image, step=step, num_steps=4)
        attend(q, k, v, site, policy, backend="reference")
        taken = (steps is None or step in steps) and (kinds is None or kind in kinds) and \
            (step, kind, block) not in summed
        if taken:
            summed.add((step, kind, block))
            p = dense_probs(q, k)[row].sum(0)  # [N, N] summed over heads
            m = torch.stack([p[image[0]:image[1], text[0] + a:text[0] + b].sum(-1) for a, b in groups])
            expected = m if expected is None else expected + m
    if expected is None:
        assert policy.maps is None
        return
    torch.testing.assert_close(policy.maps.double(), expected, rtol=1e-5, atol=1e-6)
    check_fixed_mask(policy.maps.double().numpy(), policy.masks().numpy(), 0.2)


@fuzz(150)
@given(seed=SEEDS, shape=st.lists(st.integers(1, 3), min_size=1, max_size=4), eta=st.floats(0, 1),
       start=st.integers(0, 5), length=st.integers(0, 5), step=st.integers(0, 12), t=st.floats(1e-3, 1.0),
       rows=st.one_of(st.none(), st.lists(st.integers(0, 2), unique=True)))
def test_rf_edit_controller_is_the_papers_controller_in_our_time(seed, shape, eta, start, length, step, t, rows):
    """METHODS.md HeadRouter 5 in the papers' time s (image at s = 1) and image-ward velocity u:
    u_hat = u + eta * ((y0 - X) / (1 - s) - u) on steps [start, stop). inversion.py's convention:
    s = 1 - t and u = -v (v = dx/dt, t = 1 noise)."""
    rng = np.random.default_rng(seed)
    rows = None if rows is None else [r for r in rows if r < shape[0]]
    y0, x, v = rng.normal(size=(3,) + tuple(shape))
    stop = start + length
    ctrl = RFEditController(torch.tensor(y0[:1] if shape[0] > 1 and rng.random() < 0.3 else y0,
                                         dtype=torch.float32), eta, start, stop, rows=rows)
    y0_used = ctrl.y0.double().numpy()
    got = ctrl(step, t, torch.tensor(x, dtype=torch.float32), torch.tensor(v, dtype=torch.float32))
    s, u = 1.0 - t, -v
    u_hat = u + eta * ((y0_used - x) / (1.0 - s) - u)
    expected = v.copy()
    if start <= step < stop:
        for r in range(shape[0]) if rows is None else rows:
            expected[r] = -u_hat[r]
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5, atol=1e-5 * (1 + np.abs(expected).max()))


@fuzz(100)
@given(seed=SEEDS, shape=st.lists(st.integers(1, 3), min_size=1, max_size=4), gamma=st.floats(0, 1),
       t=st.floats(0.0, 0.999), num_steps=st.integers(1, 60))
def test_inversion_controller_and_the_default_stop(seed, shape, gamma, t, num_steps):
    """Inversion (t: 0 -> 1, target y1): v_hat = v + gamma * ((y1 - x) / (1 - t) - v); the editing
    controller's stop=None is 7/28 of the steps (public: 6-9 of 28), at least 1."""
    rng = np.random.default_rng(seed)
    y1, x, v = rng.normal(size=(3,) + tuple(shape))
    got = InversionController(torch.tensor(y1, dtype=torch.float32), gamma)(
        0, t, torch.tensor(x, dtype=torch.float32), torch.tensor(v, dtype=torch.float32))
    expected = v + gamma * ((y1 - x) / (1 - t) - v)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-4, atol=1e-4 * (1 + np.abs(expected).max()))
    stop = RFInversionConfig().resolved_stop(num_steps)
    assert stop == max(1, round(7 * num_steps / 28))
    assert 6 <= RFInversionConfig().resolved_stop(28) <= 9


def test_documented_defaults():
    """METHODS.md's public values are the defaults."""
    hr = HeadRouterConfig()
    assert (hr.gamma, hr.delta, hr.upsilon, hr.dtr_text_keep) == (0.2, 0.5, 5.0, 0.1) and hr.alpha in (2.0, 5.0)
    inv = RFInversionConfig()
    assert (inv.gamma, inv.eta) == (0.5, 0.9)
    iid = IIDConfig()
    assert iid.map_layer == -2 and iid.threshold == "otsu" and iid.background == "none"
    assert default_map_step(50) == 26  # S = 27 of 50, as a 0-based index
