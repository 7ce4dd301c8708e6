"""Maps -> masks: ReLU differencing, smoothing, Otsu, and IID mask derivation on planted attention."""
import numpy as np
import pytest
import torch

from iidkern.edit.iid import IIDConfig, IIDMapPolicy
from iidkern.edit.masks import (binarize, disentangle_heads, gaussian_smooth, iid_masks, iou, key_region_masks,
                                otsu_threshold, overlay_masks)
from iidkern.policy import AttentionSite, attend


def test_disentangle_heads_matches_formula():
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(3, 10, 4, generator=g)  # [H, N_img, N]
    out = disentangle_heads(maps)
    for i in range(4):
        others = [k for k in range(4) if k != i]
        expected = torch.relu(maps[..., i] - maps[..., others].sum(-1) / 3)
        assert torch.allclose(out[..., i], expected)
    single = torch.rand(2, 5, 1, generator=g)
    assert torch.equal(disentangle_heads(single), single)


def test_gaussian_smooth_preserves_mass_and_constants():
    g = torch.Generator().manual_seed(2)
    const = torch.full((2, 36), 0.7)
    assert torch.allclose(gaussian_smooth(const, (6, 6), sigma=1.2), const, atol=1e-6)
    spike = torch.zeros(1, 81)
    spike[0, 40] = 1.0  # centre of a 9x9 grid: the kernel fits, so the mass is kept
    out = gaussian_smooth(spike, (9, 9), sigma=1.0)
    assert abs(out.sum().item() - 1.0) < 1e-5 and out[0, 40] < 1.0 and out[0, 39] > 0
    noisy = torch.rand(1, 64, generator=g)
    assert gaussian_smooth(noisy, (8, 8), sigma=1.0).std() < noisy.std()
    assert torch.equal(gaussian_smooth(noisy, (8, 8), sigma=0.0), noisy)


def _mirrored_smooth_1d(x, kernel):
    """Reference: each output sums kernel taps over the half-sample symmetric extension of
    ``x``, written as a loop (``c b a | a b c | c b a | ...``)."""
    n, r = len(x), len(kernel) // 2
    out = []
    for i in range(n):
        total = 0.0
        for t in range(-r, r + 1):
            j = (i + t) % (2 * n)
            total += kernel[t + r] * x[j if j < n else 2 * n - 1 - j]
        out.append(total)
    return out


@pytest.mark.parametrize("grid,sigma", [((2, 3), 2.0), ((3, 1), 4.5), ((7, 9), 1.0), ((4, 5), 1.5)])
def test_gaussian_smooth_mirrors_also_where_the_kernel_is_wider_than_the_grid(grid, sigma):
    """Against a loop over the mirrored extension, row and column passes, kernel radius below and
    above the grid's sides; the sum of a corner spike is kept (a replicated edge would not)."""
    from iidkern.edit.masks import gaussian_kernel1d

    h, w = grid
    g = torch.Generator().manual_seed(h * 10 + w)
    maps = torch.rand(2, h * w, generator=g, dtype=torch.float64)
    kernel = gaussian_kernel1d(sigma).double().tolist()
    expected = []
    for m in maps:
        rows = [_mirrored_smooth_1d(m.view(h, w)[i].tolist(), kernel) for i in range(h)]
        cols = [_mirrored_smooth_1d([rows[i][j] for i in range(h)], kernel) for j in range(w)]
        expected.append([cols[j][i] for i in range(h) for j in range(w)])
    torch.testing.assert_close(gaussian_smooth(maps, grid, sigma=sigma).double(),
                               torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    spike = torch.zeros(1, h * w)
    spike[0, 0] = 1.0
    assert abs(gaussian_smooth(spike, grid, sigma=sigma).sum().item() - 1.0) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_constant_maps_normalize_to_zeros_in_every_dtype(dtype):
    """minmax_normalize's eps rounds to 0 in fp16, where 0 / 0 made a constant map NaN and the
    "fixed" rule then marked no token (every token in fp32)."""
    from iidkern.edit.masks import minmax_normalize

    maps = torch.full((2, 7), 0.3, dtype=dtype)
    assert torch.equal(minmax_normalize(maps), torch.zeros_like(maps))
    assert binarize(maps, "fixed", 0.0).all() and not binarize(maps, "fixed", 0.5).any()
    assert key_region_masks(maps, 0.0).all()
    ramp = torch.linspace(0, 1, 7, dtype=dtype)[None]
    assert torch.equal(minmax_normalize(ramp), ramp)  # a spread map is unchanged


def test_otsu_separates_two_modes():
    g = torch.Generator().manual_seed(3)
    low = 0.2 + 0.05 * torch.rand(300, generator=g)
    high = 0.8 + 0.05 * torch.rand(100, generator=g)
    values = torch.cat([low, high])[torch.randperm(400, generator=g)]
    t = otsu_threshold(values).item()
    assert 0.25 <= t <= 0.8
    mask = binarize(values, "otsu")
    assert torch.equal(mask, values > 0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_otsu_splits_maps_whose_spread_is_tiny_beside_their_values(dtype):
    """The threshold in map units keeps the histogram's two classes: where the spread is a few
    steps of the dtype beside large values, lo + a fraction of it rounds back to lo, and the
    mask took every token. Here two values one or two steps apart, and random maps offset far
    from 0 and scaled down: the split is never all or nothing, t lies above every background
    value and at most the smallest foreground one, and binarize agrees with it."""
    g = torch.Generator().manual_seed(13)
    step = torch.finfo(dtype).eps
    pairs = [(0.5, 0.5 + step / 2), (1.0, 1.0 + 2 * step), (1000.0, 1000.0 + 1000 * step)]
    pattern = torch.tensor([0, 1, 0, 1, 1, 0, 0])
    maps = torch.stack([torch.where(pattern.bool(), torch.tensor(b, dtype=torch.float64), a) for a, b in pairs])
    maps = maps.to(dtype)
    assert (maps.max(-1).values > maps.min(-1).values).all()  # two distinct values in the dtype
    assert torch.equal(binarize(maps, "otsu"), pattern.bool().expand(len(pairs), -1))
    offsets = torch.tensor([0.0, 1.0, -3.0, 100.0], dtype=torch.float64)[:, None]
    spreads = torch.tensor([1.0, 1e-2, 300 * step, 40 * step], dtype=torch.float64)[:, None]
    random_maps = (offsets + spreads * torch.rand(4, 64, generator=g, dtype=torch.float64) *
                   offsets.abs().clamp_min(1)).to(dtype)
    for m in [*maps, *random_maps]:
        t = otsu_threshold(m)
        mask = binarize(m, "otsu")
        assert torch.equal(mask, m >= t) and 0 < mask.sum() < m.numel(), (m, t)
        assert m[~mask].max() < t <= m[mask].min()


def test_threshold_rules():
    g = torch.Generator().manual_seed(4)
    values = torch.rand(2, 50, generator=g)
    top = binarize(values, "top", 0.2)
    assert top.sum(-1).tolist() == [10, 10]
    for row in range(2):
        assert values[row][top[row]].min() >= values[row][~top[row]].max()
    fixed = binarize(values, "fixed", 0.5)
    norm = (values - values.min(-1, keepdim=True).values) / (values.max(-1, keepdim=True).values -
                                                                values.min(-1, keepdim=True).values)
    assert torch.equal(fixed, norm >= 0.5)
    assert torch.equal(key_region_masks(values, 0.2), norm >= 0.2)
    with pytest.raises(ValueError, match="rule"):
        binarize(values, "median")


def test_overlay_tints_only_masked_pixels():
    g = torch.Generator().manual_seed(5)
    image = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, :4] = True  # top row of a 4x4 grid -> top 8 pixel rows
    out = overlay_masks(image, masks, (4, 4))
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(out[8:], image[8:])
    assert not np.array_equal(out[:8], image[:8])


# --------------------------------------------------------------------------- planted attention
def planted_qkv(grid, regions, text_first=True, heads=2, dim=16, tokens_per_instruction=3, strength=6.0, seed=0):
    """q/k/v where image tokens of region i attend strongly to instruction i's tokens.

    Returns q, k, v ([1, N, H, D], bnhd), the site, and the relative instruction ranges.
    """
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    n_img, n_instr = h * w, len(regions)
    n_text = n_instr * tokens_per_instruction + 2  # two shared tokens after the instructions
    n = n_text + n_img
    text = (0, n_text) if text_first else (n_img, n)
    image = (n_text, n) if text_first else (0, n_img)
    instructions = [(i * tokens_per_instruction, (i + 1) * tokens_per_instruction) for i in range(n_instr)]
    q = 0.3 * torch.randn(1, n, heads, dim, generator=g)
    k = 0.3 * torch.randn(1, n, heads, dim, generator=g)
    v = torch.randn(1, n, heads, dim, generator=g)
    directions = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0][:n_instr]  # orthonormal rows
    for i, (a, b) in enumerate(instructions):
        k[0, text[0] + a:text[0] + b] += strength * directions[i]
        rows = torch.nonzero(regions[i].flatten()).flatten() + image[0]
        q[0, rows] += strength * directions[i]
    site = AttentionSite(block=0, block_kind="joint", text=text, image=image, step=3, num_steps=5, layer=1,
                         num_layers=2)
    return q, k, v, site, instructions


def two_regions(grid):
    h, w = grid
    r0 = torch.zeros(h, w, dtype=torch.bool)
    r1 = torch.zeros(h, w, dtype=torch.bool)
    r0[1:h // 2 + 2, 0:w // 2] = True
    r1[h // 2:h - 1, w // 2 + 1:w] = True
    return [r0, r1]


@pytest.mark.parametrize("backend,text_first", [("reference", True), ("reference", False), ("triton", True)])
def test_masks_recover_planted_regions(backend, text_first):
    grid = (10, 10)
    regions = two_regions(grid)
    q, k, v, site, instructions = planted_qkv(grid, regions, text_first=text_first)
    policy = IIDMapPolicy(instructions, grid, IIDConfig(map_step=3, map_layer=-1, sigma=0.8))
    off_site = AttentionSite(**{**site.__dict__, "layer": 0})
    attend(q, k, v, off_site, policy, backend="reference")  # not the map layer: nothing captured
    assert policy.masks is None
    out = attend(q, k, v, site, policy, backend=backend)
    plain = attend(q, k, v, site, None, backend="reference")
    assert torch.allclose(out, plain, atol=1e-4)  # the probe does not change the output
    assert policy.per_head_maps.shape == (2, grid[0] * grid[1], len(regions))
    for i, region in enumerate(regions):
        score = iou(policy.masks[i], region.flatten())
        assert score >= 0.9, f"instruction {i}: IoU {score:.3f} < 0.9 (backend={backend})"


def test_iid_masks_end_to_end_on_random_maps_shape_and_overlap():
    g = torch.Generator().manual_seed(6)
    grid = (6, 6)
    maps = torch.rand(4, 36, 3, generator=g) * 0.05
    maps[:, :18, 0] += 1.0  # instruction 0: top half
    maps[:, 12:30, 1] += 1.0  # instruction 1: middle band, overlapping 0
    masks, soft = iid_masks(maps, grid, sigma=0.0)
    assert masks.shape == (3, 36) and soft.shape == (3, 36)
    assert masks[0, :12].all() and masks[1, 18:30].all()
    assert not masks[0, 30:].any() and not masks[1, :6].any()


def test_a_constant_map_has_no_otsu_foreground_whatever_the_constant():
    """No two classes to split: every constant (0 as well as 0.7 or -3e4) gives an empty mask;
    a map with any spread still splits."""
    g = torch.Generator().manual_seed(11)
    constants = torch.cat([torch.tensor([0.0, 0.7, 1.0, -3e4]), torch.randn(4, generator=g) * 100])
    maps = constants[:, None].expand(-1, 36).clone()
    assert torch.isinf(otsu_threshold(maps)).all()
    assert not binarize(maps, "otsu").any()
    spread = maps.clone()
    spread[:, :5] += 1.0
    assert binarize(spread, "otsu")[:, :5].all() and not binarize(spread, "otsu")[:, 5:].any()
    masks, _ = iid_masks(torch.full((2, 36, 1), 0.3), (6, 6), sigma=1.0)  # one instruction, flat map
    assert not masks.any()


@pytest.mark.parametrize("rule,value", [("fixed", 1.5), ("fixed", -0.1), ("fixed", float("nan")), ("top", 0.0),
                                        ("top", 1.01), ("top", float("nan"))])
def test_threshold_values_outside_the_rule_range_are_refused(rule, value):
    values = torch.rand(2, 16, generator=torch.Generator().manual_seed(12))
    with pytest.raises(ValueError, match=rf"rule '{rule}' takes a value in"):
        binarize(values, rule, value)
    assert binarize(values, "otsu", value).shape == values.shape  # Otsu takes no value
