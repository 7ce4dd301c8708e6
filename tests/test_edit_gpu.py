"""GPU checks of the editing methods: the fused (Triton) path against the reference path on the
tiny runner, and the pipelines at Flux's real width and 1024^2 token counts (random weights)."""
import time

import pytest
import torch

from iidkern.edit.codec import demo_picture
from iidkern.edit.iid import IIDConfig, IIDMapPolicy
from iidkern.edit.masks import iou
from iidkern.edit.models import EditModel
from iidkern.edit.pipeline import headrouter_edit, iid_edit
from iidkern.mmdit.flux import FluxConfig, FluxTransformer

pytestmark = pytest.mark.cuda


def test_planted_masks_on_gpu_at_flux_shape():
    """Planted regions on a 64x64 token grid (1024^2), 24 heads x 128, bf16: IoU >= 0.9."""
    from test_edit_masks import planted_qkv, two_regions

    grid = (64, 64)
    regions = two_regions(grid)
    q, k, v, site, instructions = planted_qkv(grid, regions, heads=24, dim=128, tokens_per_instruction=20,
                                              strength=5.0)
    q, k, v = (t.cuda().to(torch.bfloat16) for t in (q, k, v))
    policy = IIDMapPolicy(instructions, grid, IIDConfig(map_step=3, map_layer=-1, sigma=1.0))
    from iidkern.policy import attend

    attend(q, k, v, site, policy, backend="triton")
    for i, region in enumerate(regions):
        assert iou(policy.masks[i].cpu(), region.flatten()) >= 0.9


@pytest.mark.parametrize("method", ["iid", "step", "combined"])
def test_tiny_pipeline_triton_matches_reference(method):
    image = demo_picture(128)
    cfg = IIDConfig(sigma=0.0, threshold="top", threshold_value=0.3)  # a top fraction: no ties at a threshold
    out = {}
    for backend in ("triton", "reference"):
        model = EditModel.tiny("concat", device="cuda", backend=backend)
        out[backend] = iid_edit(model, image, ["make the sky red", "add a tree"], method=method, num_steps=6,
                                seed=1, config=cfg, progress=False)
    err = (out["triton"].latents - out["reference"].latents).norm() / out["reference"].latents.norm()
    assert err < 1e-3, f"{method}: triton vs reference latents differ by {err:.2e}"
    if method == "iid":
        for i in range(2):
            assert iou(out["triton"].masks[i], out["reference"].masks[i]) >= 0.9


def test_tiny_headrouter_triton_matches_reference():
    image = demo_picture(128)
    out = {}
    for backend in ("triton", "reference"):
        model = EditModel.tiny("t2i", device="cuda", backend=backend)
        out[backend] = headrouter_edit(model, image, "a house", "a castle", num_steps=6, progress=False)
    err = (out["triton"].latents - out["reference"].latents).norm() / out["reference"].latents.norm()
    assert err < 1e-3


def _flux_width_model(layout):
    """Flux-dev width (24 heads x 128, 4096-d text) with 2 double + 2 single blocks, random, bf16."""
    packed = 64
    in_ch = 2 * packed if layout == "concat" else packed
    cfg = FluxConfig.dev(num_double=2, num_single=2, in_channels=in_ch, out_channels=packed)
    transformer = FluxTransformer.random(cfg, device="cuda", dtype=torch.bfloat16)
    from iidkern.edit.codec import PixelCodec
    from iidkern.edit.text import HashTextEncoder

    return EditModel(transformer, HashTextEncoder(4096, 768), PixelCodec(16), layout, name=f"flux-width-{layout}")


@pytest.mark.parametrize("layout", ["concat", "kontext"])
def test_iid_at_1024(layout, capsys):
    model = _flux_width_model(layout)
    image = demo_picture(1024)
    instructions = ["make the sky a sunset with orange clouds", "turn the house into a red barn", "add snow"]
    times = {}
    for method in ("iid", "combined"):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = iid_edit(model, image, instructions, method=method, num_steps=8, seed=0, progress=False)
        times[method] = time.perf_counter() - t0
        assert torch.isfinite(r.latents).all()
    with capsys.disabled():
        print(f"\n[IID 1024^2 {layout}, 2+2 blocks, 8 steps] iid {times['iid']:.2f}s, combined "
              f"{times['combined']:.2f}s, phases {({k: round(v, 3) for k, v in r.timings.items()})}")


def test_headrouter_at_1024(capsys):
    model = _flux_width_model("t2i")
    image = demo_picture(1024)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    r = headrouter_edit(model, image, "a white house on a green hill", "a stone castle on a green hill",
                        num_steps=8, progress=False)
    assert torch.isfinite(r.latents).all() and r.masks.shape[1] == 64 * 64
    with capsys.disabled():
        print(f"\n[HeadRouter 1024^2, 2+2 blocks, 8 steps] {time.perf_counter() - t0:.2f}s, phases "
              f"{({k: round(v, 3) for k, v in r.timings.items()})}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim,image_first", [(128, False), (64, True)])
def test_same_call_dtr_on_gpu(dtype, dim, image_first):
    """HeadRouter's default paper form on the kernels (the Hopper kernel at head dim 128 on sm_90):
    the plain call plus the small text-key call against one float64 pass weighted by the call's
    own map, at token counts off the tiles (77 text, 1000 image tokens) and both stream orders."""
    from test_edit_headrouter import dense_headrouter

    from iidkern.edit.headrouter import HeadRouterConfig, HeadRouterPolicy
    from iidkern.policy import AttentionSite, attend

    n_text, n_img, heads = 77, 1000, 4
    g = torch.Generator().manual_seed(dim + image_first)
    q, k, v = (torch.randn(2, n_text + n_img, heads, dim, generator=g).to("cuda", dtype) for _ in range(3))
    text, image = ((n_img, n_img + n_text), (0, n_img)) if image_first else ((0, n_text), (n_text, n_text + n_img))
    where = AttentionSite(block=0, block_kind="joint", text=text, image=image, step=0, num_steps=4)
    cfg = HeadRouterConfig(alpha=5.0, upsilon=5.0)
    out = attend(q, k, v, where, HeadRouterPolicy(cfg), backend="triton")
    expected = dense_headrouter(q, k, v, text, image, cfg)
    err = ((out.double() - expected).norm() / expected.norm()).item()
    assert err < 1e-2, f"relative error {err:.2e}"
    plain = dense_headrouter(q, k, v, text, image, HeadRouterConfig(route=False, dtr_image="off"))
    assert ((out[1].double() - plain[1]).norm() / plain[1].norm()).item() > 5 * err  # the weighting is visible


def _steps_without_synchronizing(policy, seed):
    """Four steps of one call (77 text + 1024 image tokens, 4 heads x 128, bf16) through
    ``policy``; the last two under torch's sync debug mode "error", after warm-up calls
    (compilation, caches, a tag mask's one read-back)."""
    from iidkern.policy import AttentionSite, attend

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 77 + 1024, 4, 128, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
    for step in range(4):
        if step == 2:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            site = AttentionSite(block=0, block_kind="double", text=(0, 77), image=(77, 1101), step=step, num_steps=4)
            attend(q, k, v, site, policy, backend="triton")
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("form", [dict(), dict(route=False), dict(dtr_map="previous"), dict(dtr_image="off"),
                                  dict(dtr_image="code", dtr_block_kinds=("double",))])
def test_headrouter_calls_do_not_synchronize(form):
    """Every HeadRouter form runs its calls without a host-device synchronization (a list index,
    an .item(), a host copy), so a model's host work runs ahead of the GPU: torch's sync debug
    mode turns the synchronizing calls it detects (not all, says torch) into errors, after
    warm-up calls (compilation, caches)."""
    from iidkern.edit.headrouter import HeadRouterConfig, HeadRouterPolicy

    policy = HeadRouterPolicy(HeadRouterConfig(**form))
    _steps_without_synchronizing(policy, seed=7)


@pytest.mark.parametrize("masked_rows", [None, (False, True)])
def test_iid_masked_calls_do_not_synchronize(masked_rows):
    """After S every block of every step runs IID's masked attention: once a layout's tag mask is
    built (its tile lists read back once), the calls run without a host-device synchronization
    that torch's sync debug mode detects, and so do the key-region probes HeadRouter's pipeline
    sums per call."""
    from iidkern.edit.headrouter import KeyRegionPolicy
    from iidkern.edit.iid import IIDMaskPolicy
    from iidkern.policy import ChainPolicy

    masks = torch.rand(2, 1024, generator=torch.Generator().manual_seed(9)).to("cuda") < 0.5
    policy = ChainPolicy(IIDMaskPolicy([(0, 20), (20, 41)], masks, masked_rows=masked_rows),
                         KeyRegionPolicy(tokens=[3, (5, 9)], row=1))
    _steps_without_synchronizing(policy, seed=8)
