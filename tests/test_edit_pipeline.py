"""Editing pipelines on the tiny runner: IID and its baselines on equal footing, blending,
RF-Inversion round trips, HeadRouter's two-branch run."""
import pytest
import torch

from iidkern.edit.codec import PixelCodec, demo_picture
from iidkern.edit.headrouter import HeadRouterConfig
from iidkern.edit.iid import IIDConfig
from iidkern.edit.inversion import RFEditController, RFInversionConfig, invert
from iidkern.edit.models import EditModel
from iidkern.edit.pipeline import blend_branches, headrouter_edit, iid_edit, token_masks_to_latents
from iidkern.edit.text import HashTextEncoder
from iidkern.mmdit.sampling import FluxDenoiser, flux_sigmas, sample
from helpers import assert_raises_naming

INSTRUCTIONS = ["make the sky a sunset", "turn the house red"]


@pytest.fixture(scope="module")
def picture():
    return demo_picture(64)  # 8x8 latent, 4x4 tokens


@pytest.fixture(scope="module")
def concat_model():
    return EditModel.tiny("concat", device="cpu", backend="reference")


def test_blend_branches_averages_overlaps_and_keeps_background():
    g = torch.Generator().manual_seed(0)
    branches, combined = torch.randn(2, 3, 4, 4, generator=g), torch.randn(1, 3, 4, 4, generator=g)
    masks = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)  # 2x2 token grid, overlap on token 1
    out = blend_branches(branches, combined, masks, (2, 2))
    lat = token_masks_to_latents(masks, (2, 2))  # [2, 1, 4, 4]
    assert torch.equal(out[0, :, :2, :2], branches[0, :, :2, :2])  # token 0: M_0 only
    assert torch.allclose(out[0, :, :2, 2:], (branches[0, :, :2, 2:] + branches[1, :, :2, 2:]) / 2)  # overlap
    assert torch.equal(out[0, :, 2:, :2], branches[1, :, 2:, :2])  # token 2: M_1 only
    assert torch.equal(out[0, :, 2:, 2:], combined[0, :, 2:, 2:])  # background
    assert lat.shape == (2, 1, 4, 4) and lat[1, 0, 0, 2] == 1


@pytest.mark.parametrize("layout", ["concat", "kontext"])
def test_iid_and_baselines_run_on_equal_footing(layout, picture):
    model = EditModel.tiny(layout, device="cpu", backend="reference")
    outs = {}
    for method in ("iid", "step", "combined"):
        r = iid_edit(model, picture, INSTRUCTIONS, method=method, num_steps=5, seed=3, progress=False)
        assert r.image.shape == picture.shape and torch.isfinite(r.image).all()
        assert r.latents.shape == (1, 4, 8, 8) and "total" in r.timings
        outs[method] = r
    assert outs["iid"].masks.shape == (2, 16) and outs["iid"].masks.dtype == torch.bool
    assert outs["step"].masks is None and outs["combined"].masks is None
    again = iid_edit(model, picture, INSTRUCTIONS, method="iid", num_steps=5, seed=3, progress=False)
    assert torch.equal(again.latents, outs["iid"].latents)  # seeded: repeatable
    assert not torch.allclose(outs["iid"].latents, outs["combined"].latents, atol=1e-4)


def test_iid_branches_equal_single_instruction_runs(concat_model, picture):
    """With S = the last step (blend only), tokens in M_0 alone equal a run of P_0 alone, and
    background tokens equal the combined run: one batched forward == separate runs."""
    steps = 4
    cfg = IIDConfig(map_step=steps - 1, sigma=0.0, threshold="top", threshold_value=0.4)
    iid = iid_edit(concat_model, picture, INSTRUCTIONS, method="iid", num_steps=steps, seed=1, config=cfg,
                   progress=False)
    alone = iid_edit(concat_model, picture, INSTRUCTIONS[:1], method="step", num_steps=steps, seed=1, progress=False)
    combined = iid_edit(concat_model, picture, INSTRUCTIONS, method="combined", num_steps=steps, seed=1,
                        progress=False)
    lat = token_masks_to_latents(iid.masks, iid.grid)[:, 0].bool()  # [2, 8, 8]
    only0, background = lat[0] & ~lat[1], ~(lat[0] | lat[1])
    assert only0.any() and background.any()
    assert torch.allclose(iid.latents[0][:, only0], alone.latents[0][:, only0], atol=1e-4)
    assert torch.allclose(iid.latents[0][:, background], combined.latents[0][:, background], atol=1e-4)
    assert not torch.allclose(alone.latents[0][:, only0], combined.latents[0][:, only0], atol=1e-3)


def test_iid_rejects_bad_input(concat_model, picture):
    with pytest.raises(ValueError, match="method"):
        iid_edit(concat_model, picture, INSTRUCTIONS, method="parallel")
    with pytest.raises(ValueError, match="instructions"):
        iid_edit(concat_model, picture, [])
    with pytest.raises(ValueError, match="multiples"):
        iid_edit(concat_model, torch.rand(1, 3, 40, 40) * 2 - 1, INSTRUCTIONS)
    with pytest.raises(ValueError, match="headrouter"):
        iid_edit(EditModel.tiny("t2i", device="cpu"), picture, INSTRUCTIONS)
    # pictures outside the [-1, 1] contract: 0..255 bytes, a [0, 255] float picture, NaN
    with pytest.raises(TypeError, match=r"image must be a floating-point tensor in \[-1, 1\], got torch.uint8"):
        iid_edit(concat_model, ((picture + 1) * 127.5).to(torch.uint8), INSTRUCTIONS)
    with pytest.raises(ValueError, match=r"image must hold values in \[-1, 1\], got values in"):
        iid_edit(concat_model, (picture + 1) * 127.5, INSTRUCTIONS)
    with pytest.raises(ValueError, match=r"image must hold values in \[-1, 1\], got values in \[nan"):
        iid_edit(concat_model, torch.full_like(picture, float("nan")), INSTRUCTIONS)
    with pytest.raises(TypeError, match="instructions must be a sequence of names, got None"):
        iid_edit(concat_model, picture, None)
    with pytest.raises(TypeError, match=r"instructions must be a sequence of names, e.g. \('make it red',\)"):
        iid_edit(concat_model, picture, "make it red")
    with pytest.raises(ValueError, match=r"num_steps must be <= 10000, got 100000000000000000000"):
        iid_edit(concat_model, picture, INSTRUCTIONS, num_steps=10 ** 20)
    with pytest.raises(ValueError, match=r"seed must be in \[-2\*\*63, 2\*\*64\), got 2361183241434822606848"):
        iid_edit(concat_model, picture, INSTRUCTIONS, seed=2 ** 71)


@pytest.mark.parametrize("kwargs,message", [
    (dict(map_layer=4), r"map_layer 4 is out of range .* 4 attention layers"),  # tiny: 2 double + 2 single
    (dict(map_layer=-5), r"map_layer -5 is out of range"),
    (dict(map_step=3), r"map_step must be in \[0, num_steps=3\), got 3"),
    # two instructions: rows 0, 1 (their branches) and 2 (combined)
    (dict(map_row=5), r"map_row must index this run's batch of 3 rows .* \[-3, 3\), got 5"),
    (dict(map_row=-4), r"map_row must index this run's batch of 3 rows .* got -4"),
])
def test_iid_checks_the_config_against_the_run_before_sampling(concat_model, picture, monkeypatch, kwargs, message):
    import iidkern.edit.pipeline as pipeline

    def no_sampling(*args, **kw):
        raise AssertionError("sampled before checking the config")

    monkeypatch.setattr(pipeline, "euler_step", no_sampling)
    with pytest.raises(ValueError, match=message):
        iid_edit(concat_model, picture, INSTRUCTIONS, num_steps=3, config=IIDConfig(**kwargs), progress=False)


def test_iid_on_concat_names_the_key_ranges_it_has(concat_model, picture):
    cfg = IIDConfig(map_source="image_colmean", image_key_range="source")
    with pytest.raises(ValueError, match=r"image_key_range='source'.*\('text', 'image'\)"):
        iid_edit(concat_model, picture, INSTRUCTIONS, num_steps=2, config=cfg, progress=False)


def test_pipelines_reset_their_policies_at_the_start_of_a_run(concat_model, t2i_model, picture, monkeypatch):
    from iidkern.edit.headrouter import HeadRouterPolicy, KeyRegionPolicy
    from iidkern.edit.iid import IIDPolicy

    calls = []
    for cls in (IIDPolicy, HeadRouterPolicy, KeyRegionPolicy):
        original = cls.reset

        def spy(self, _original=original, _name=cls.__name__):
            calls.append((_name, self.masks is None if _name == "IIDPolicy" else None))
            return _original(self)

        monkeypatch.setattr(cls, "reset", spy)
    iid_edit(concat_model, picture, INSTRUCTIONS, num_steps=2, progress=False)
    headrouter_edit(t2i_model, picture, "a house", "a red house", num_steps=2, progress=False)
    assert calls[0] == ("IIDPolicy", True)  # before the run's capture
    assert {name for name, _ in calls} == {"IIDPolicy", "HeadRouterPolicy", "KeyRegionPolicy"}


# --------------------------------------------------------------------------- inversion
@pytest.fixture(scope="module")
def t2i_model():
    return EditModel.tiny("t2i", device="cpu", backend="reference")


def test_inversion_then_reconstruction_returns_to_the_source(t2i_model, picture):
    y0 = t2i_model.codec.encode(picture)
    prompt = t2i_model.text.encode("a white house on a hill")
    den = FluxDenoiser(t2i_model.transformer, prompt, guidance=3.5, backend="reference")

    def round_trip(steps, gamma=0.0, eta=0.0):
        sigmas = flux_sigmas(steps, image_seq_len=16)
        noise = invert(den, y0, sigmas, gamma=gamma, seed=2)
        back = sample(den, noise, sigmas, velocity_hook=RFEditController(y0, eta, 0, steps), progress=False)
        return ((back - y0).norm() / y0.norm()).item(), noise

    coarse, _ = round_trip(8)
    fine, noise = round_trip(40)
    assert fine < 0.1 and fine < coarse / 2  # the plain ODE round trip converges with the step count
    assert noise.std() > 0.3  # and it really went to noise
    controlled, _ = round_trip(12, gamma=0.5, eta=0.9)
    assert controlled < 0.06


def test_controllers_follow_the_formulas():
    g = torch.Generator().manual_seed(5)
    y0, x, v = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
    hook = RFEditController(y0, eta=0.9, start=1, stop=3, rows=(1,))
    assert torch.equal(hook(0, 0.8, x, v), v) and torch.equal(hook(3, 0.3, x, v), v)  # outside [start, stop)
    out = hook(2, 0.5, x, v)
    assert torch.equal(out[0], v[0])
    assert torch.allclose(out[1], v[1] + 0.9 * ((x[1] - y0[1]) / 0.5 - v[1]))
    assert RFInversionConfig().resolved_stop(28) == 7 and RFInversionConfig(stop=9).resolved_stop(28) == 9


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(gamma="a"), TypeError, ["RFInversionConfig: gamma", "'a'"]),
    (dict(eta=1.5), ValueError, ["RFInversionConfig: eta", "[0, 1]"]),
    (dict(start=1.5), TypeError, ["RFInversionConfig: start", "1.5"]),
    (dict(start=-3), ValueError, ["RFInversionConfig: start", ">= 0"]),
    (dict(stop=-1), ValueError, ["RFInversionConfig: stop", ">= 0"]),
    (dict(start=5, stop=2), ValueError, ["stop must be >= start", "start=5, stop=2"]),
])
def test_inversion_config_refuses_wrong_values_when_built(kwargs, exc, words):
    assert_raises_naming(exc, words, RFInversionConfig, **kwargs)
    import numpy as np
    c = RFInversionConfig(gamma=np.float32(0.25), start=np.int64(1), stop=torch.tensor(4))
    assert (c.gamma, c.start, c.stop) == (0.25, 1, 4) and type(c.start) is int and type(c.stop) is int


# --------------------------------------------------------------------------- HeadRouter
def test_headrouter_pipeline(t2i_model, picture):
    r = headrouter_edit(t2i_model, picture, "a white house on a hill", "a red castle on a hill", num_steps=4,
                        progress=False)
    assert r.image.shape == picture.shape and r.extra["reconstruction"].shape == picture.shape
    assert r.mask_labels == ["red", "castle"] and r.masks.shape == (2, 16)
    assert not torch.allclose(r.image, r.extra["reconstruction"], atol=1e-3)
    # key_words in any case: the prompt's words are compared lowercased ("Castle" was "no word")
    named = headrouter_edit(t2i_model, picture, "a white house on a hill", "a red castle on a hill", num_steps=2,
                            key_words=["Castle"], progress=False)
    assert named.mask_labels == ["castle"] and named.masks.shape == (1, 16)
    # Routing, DTR and the text residual off, same prompt in both rows: the branches coincide.
    plain = HeadRouterConfig(route=False, dtr_image="off", dtr_text=False)
    same = headrouter_edit(t2i_model, picture, "a house", "a house", num_steps=3, config=plain, progress=False)
    assert torch.allclose(same.image, same.extra["reconstruction"], atol=1e-5)
    with pytest.raises(ValueError, match="t2i"):
        headrouter_edit(EditModel.tiny("concat", device="cpu"), picture, "a", "b")


def test_headrouter_refuses_a_layout_the_runner_does_not_use(t2i_model, picture):
    with pytest.raises(ValueError, match=r"layout must be 'bnhd' .* got 'bhnd'"):
        headrouter_edit(t2i_model, picture, "a house", "a red house", num_steps=2,
                        config=HeadRouterConfig(layout="bhnd"), progress=False)


def test_pipelines_refuse_wrong_arguments_before_encoding(concat_model, t2i_model, picture):
    """Named, before any work: another method's config, a string step count, and HeadRouter
    pairs outside the run's two-row batch (found only after the inversion before)."""
    with pytest.raises(TypeError, match="config must be an instance of IIDConfig .* got HeadRouterConfig"):
        iid_edit(concat_model, picture, INSTRUCTIONS, num_steps=2, config=HeadRouterConfig(), progress=False)
    with pytest.raises(TypeError, match="num_steps must be an integer, got '2'"):
        iid_edit(concat_model, picture, INSTRUCTIONS, num_steps="2", progress=False)
    with pytest.raises(ValueError, match="instructions: IID masks at most 62 instructions .* got 63"):
        iid_edit(concat_model, picture, [f"word{i}" for i in range(63)], num_steps=2, progress=False)
    with pytest.raises(ValueError, match="mask_until must be > map_step .* map_step=1, mask_until=1"):
        iid_edit(concat_model, picture, INSTRUCTIONS, num_steps=4, config=IIDConfig(mask_until=1), progress=False)
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        headrouter_edit(t2i_model, picture, "a house", "a red house", num_steps=0, progress=False)
    with pytest.raises(TypeError, match="config must be an instance of HeadRouterConfig"):
        headrouter_edit(t2i_model, picture, "a house", "a red house", num_steps=2, config=IIDConfig(), progress=False)
    with pytest.raises(ValueError, match=r"pairs must be \(\(0, 1\),\) or \(\(1, 0\),\) .* got \(\(0, 2\),\)"):
        headrouter_edit(t2i_model, picture, "a house", "a red house", num_steps=2,
                        config=HeadRouterConfig(pairs=((0, 2),)), progress=False)
    with pytest.raises(ValueError, match=r"start=3 is past the editing controller's stop 1 for 4 steps"):
        headrouter_edit(t2i_model, picture, "a house", "a red house", num_steps=4,
                        inversion=RFInversionConfig(start=3), progress=False)
    with pytest.raises(TypeError, match="inversion must be an instance of RFInversionConfig"):
        headrouter_edit(t2i_model, picture, "a house", "a red house", num_steps=4, inversion=IIDConfig(),
                        progress=False)
    with pytest.raises(TypeError, match=r"key_words must be a sequence of names, e.g. \('red',\)"):
        headrouter_edit(t2i_model, picture, "a house", "a red house", num_steps=2, key_words="red", progress=False)
    with pytest.raises(ValueError, match=r"key_words \['blue'\] name no word of the target prompt"):
        headrouter_edit(t2i_model, picture, "a house", "a red house", num_steps=2, key_words=["blue"],
                        progress=False)


def test_hash_encoder_and_pixel_codec():
    enc = HashTextEncoder(24, 20)
    a, b = enc.encode("A red house!"), enc.encode("a RED house")
    assert torch.equal(a.text, b.text) and a.text.shape == (1, 3, 24)  # words, case and punctuation folded
    assert not torch.allclose(enc.encode("a blue house").text, a.text)
    text, ranges = enc.encode_segments(["make it red", "add a tree"])
    assert ranges == [(0, 3), (3, 6)] and text.text.shape == (1, 6, 24)
    assert enc.encode("a house", length=5).text.shape[1] == 5
    codec = PixelCodec(4)
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(codec.decode(codec.encode(flat)), flat, atol=1e-5)


def test_edit_model_refuses_parts_that_do_not_fit():
    """EditModel names the layout or widths that do not fit together (the transformer's
    channels against the layout, its latent channels against the codec's)."""
    from iidkern.mmdit import FluxConfig, FluxTransformer

    concat = FluxTransformer.random(FluxConfig.tiny(in_channels=32, out_channels=16), seed=1)
    plain = FluxTransformer.random(FluxConfig.tiny(in_channels=16, out_channels=16), seed=1)
    text, codec = HashTextEncoder(24, 20), PixelCodec(4)
    EditModel(concat, text, codec, "concat")
    EditModel(plain, text, codec, "kontext")
    with pytest.raises(ValueError, match="layout must be one of"):
        EditModel(concat, text, codec, "side-by-side")
    with pytest.raises(ValueError, match=r"layout 'concat' \(FluxEdit\) needs in_channels == 2 \* out_channels"):
        EditModel(plain, text, codec, "concat")
    with pytest.raises(ValueError, match="layout 't2i' needs in_channels == out_channels, got 32 and 16"):
        EditModel(concat, text, codec, "t2i")
    with pytest.raises(ValueError, match="works on 4 latent channels, the codec gives 8"):
        EditModel(plain, text, PixelCodec(8), "t2i")
    with pytest.raises(ValueError, match="layout must be one of"):
        EditModel.tiny("side-by-side", device="cpu")
    unguided = FluxTransformer.random(FluxConfig.tiny(in_channels=16, out_channels=16, guidance_embeds=False), seed=1)
    assert EditModel(unguided, text, codec, "t2i").guidance is None  # no guidance embedding: none passed
