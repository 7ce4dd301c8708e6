"""Rectified-flow sampler: schedules equal diffusers', Euler loop, CFG / guidance, hooks, inversion, seeds."""
import numpy as np
import pytest
import torch

from iidkern.mmdit import (FluxConfig, FluxDenoiser, FluxTransformer, PromptEmbeddings, SD3Config, SD3Denoiser,
                           SD3Transformer, euler_step, flux_mu, flux_sigmas, initial_noise, inversion_sigmas,
                           load_state_dict_strict, sample, sd3_sigmas)
from iidkern.mmdit.testing import diffusers_sd3
from iidkern.policy import AttentionPolicy

from helpers import assert_close_rel


def _scheduler(**kw):
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler(**kw)


@pytest.mark.parametrize("num_steps", [1, 4, 28])
def test_sd3_schedule_equals_diffusers(num_steps):
    sched = _scheduler(shift=3.0)
    sched.set_timesteps(num_steps)
    ours = sd3_sigmas(num_steps, shift=3.0)
    assert ours.dtype == torch.float32 and ours.shape == (num_steps + 1,)
    assert torch.allclose(ours, sched.sigmas, atol=1e-7, rtol=0)


@pytest.mark.parametrize("num_steps,seq_len", [(4, 256), (28, 4096), (10, 1000)])
def test_flux_schedule_equals_the_flux_pipeline(num_steps, seq_len):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = _scheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                       base_image_seq_len=256, max_image_seq_len=4096)
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    assert flux_mu(seq_len) == pytest.approx(mu, abs=1e-12)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    assert torch.allclose(flux_sigmas(num_steps, seq_len), sched.sigmas, atol=1e-7, rtol=0)
    # schnell: no shift at all.
    plain = _scheduler(shift=1.0)
    plain.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps))
    assert torch.allclose(flux_sigmas(num_steps, shift=False), plain.sigmas, atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="image_seq_len"):
        flux_sigmas(num_steps)


def _sd3(seed=0, **kw):
    return SD3Transformer.random(SD3Config.tiny(**kw), seed=seed)


def _prompt(config, batch=1, num_text=5, seed=0):
    return PromptEmbeddings.random(batch, num_text, config.joint_attention_dim, config.pooled_projection_dim, seed=seed)


def test_sd3_cfg_loop_equals_diffusers_scheduler_loop():
    """Our CFG sampler == diffusers' SD3 model + FlowMatchEulerDiscreteScheduler, step by step."""
    config = SD3Config.tiny(qk_norm="rms_norm")
    reference = diffusers_sd3(config, seed=21)
    runner = load_state_dict_strict(SD3Transformer(config), reference.state_dict())
    cond, uncond = _prompt(config, 2, seed=1), _prompt(config, 2, seed=2)
    noise = initial_noise((2, 4, 12, 20), seed=3)
    scale, steps = 4.5, 3

    sched = _scheduler(shift=3.0)
    sched.set_timesteps(steps)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            v = reference(torch.cat([x, x]), torch.cat([uncond.text, cond.text]),
                          torch.cat([uncond.pooled, cond.pooled]), t.expand(4)).sample
            v_u, v_c = v.chunk(2)
            x = sched.step(v_u + scale * (v_c - v_u), t, x).prev_sample
        denoiser = SD3Denoiser(runner, cond, uncond, guidance_scale=scale, backend="reference")
        ours = sample(denoiser, noise, sd3_sigmas(steps), progress=False)
    assert_close_rel(ours, x, 1e-5, "CFG sample")


def test_seeded_sampling_is_deterministic():
    model = _sd3()
    prompt = _prompt(model.config)
    denoiser = SD3Denoiser(model, prompt, backend="reference")
    with torch.no_grad():
        runs = [sample(denoiser, initial_noise((1, 4, 8, 8), seed=s), sd3_sigmas(2), progress=False)
                for s in (7, 7, 8)]
    g = torch.Generator().manual_seed(7)
    assert torch.equal(initial_noise((1, 4, 8, 8), generator=g), initial_noise((1, 4, 8, 8), seed=7))
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])
    with pytest.raises(ValueError, match="exactly one of seed"):
        initial_noise((1, 4), seed=1, generator=g)


def test_cfg_combines_the_two_branches():
    model = _sd3(seed=4)
    cond, uncond = _prompt(model.config, seed=5), _prompt(model.config, seed=6)
    x = initial_noise((2, 4, 8, 12), seed=1)
    with torch.no_grad():
        v_c = model(x, cond.text.expand(2, -1, -1), cond.pooled.expand(2, -1), 0.7, backend="reference").float()
        v_u = model(x, uncond.text.expand(2, -1, -1), uncond.pooled.expand(2, -1), 0.7, backend="reference").float()
        guided = SD3Denoiser(model, cond, uncond, guidance_scale=3.0, backend="reference")(x, 0.7)
        plain = SD3Denoiser(model, cond, uncond, guidance_scale=1.0, backend="reference")(x, 0.7)
    assert_close_rel(guided, v_u + 3.0 * (v_c - v_u), 1e-5, "CFG velocity")
    assert_close_rel(plain, v_c, 1e-6, "scale 1 = conditional only")


def test_cfg_prompts_of_different_lengths_are_refused():
    """CFG runs both prompts in one batch: texts of other lengths are a ValueError naming both
    (diffusers' SD3 pipeline pads both to one length), not torch.cat's size error at the first step."""
    model = _sd3(seed=4)
    cond, uncond = _prompt(model.config, num_text=7, seed=5), _prompt(model.config, num_text=5, seed=6)
    with pytest.raises(ValueError, match="prompt.text length 7 and negative.text length 5"):
        SD3Denoiser(model, cond, uncond, guidance_scale=5.0, backend="reference")
    assert SD3Denoiser(model, cond, backend="reference").negative is None  # no negative: nothing to match


def _flux(seed=0, **kw):
    return FluxTransformer.random(FluxConfig.tiny(**kw), seed=seed)


def test_flux_guidance_embedding_is_used():
    model = _flux(seed=2)
    prompt = _prompt(model.config, seed=3)
    x = initial_noise((1, 4, 8, 10), seed=4)
    with torch.no_grad():
        v = [FluxDenoiser(model, prompt, guidance=g, backend="reference")(x, 0.5) for g in (1.0, 3.5, 3.5)]
        default = FluxDenoiser(model, prompt, backend="reference")(x, 0.5)
    assert torch.equal(v[1], v[2]) and torch.equal(default, v[1])  # default guidance is 3.5
    assert not torch.allclose(v[0], v[1])
    with pytest.raises(ValueError, match="guidance_embeds=True"):
        model(torch.randn(1, 20, 16), prompt.text, prompt.pooled, 0.5, img_ids=torch.zeros(20, 3))
    schnell = _flux(guidance_embeds=False)
    with pytest.raises(ValueError, match="guidance_embeds=False"):
        FluxDenoiser(schnell, prompt, guidance=3.5)(x, 0.5)
    assert FluxDenoiser(schnell, prompt, backend="reference")(x, 0.5).shape == x.shape


class RecordSteps(AttentionPolicy):
    def __init__(self):
        self.seen = []

    def request(self, site):
        self.seen.append((site.step, site.num_steps, site.block_kind, site.layer))
        return None


def test_step_reaches_every_attention_site_and_hooks_run():
    model = _flux(seed=5, num_layers=2, num_single_layers=1)
    policy = RecordSteps()
    calls = []

    def velocity_hook(step, t, x, v):
        calls.append(("v", step, t))
        assert x.dtype == torch.float32 and v.shape == x.shape
        return v

    def callback(step, t, latents):
        calls.append(("cb", step, t))
        return None

    sigmas = flux_sigmas(3, 20)
    with torch.no_grad():
        sample(FluxDenoiser(model, _prompt(model.config), policy=policy, backend="reference"),
               initial_noise((1, 4, 8, 10), seed=1), sigmas, callback=callback, velocity_hook=velocity_hook,
               progress=False)
    s = sigmas.tolist()
    assert calls == [x for i in range(3) for x in (("v", i, s[i]), ("cb", i, s[i + 1]))]
    assert policy.seen == [(i, 3, kind, layer) for i in range(3)
                           for layer, kind in enumerate(["double", "double", "single"])]


def test_callback_replaces_latents_and_velocity_hook_replaces_velocity():
    model = _sd3(seed=6)
    denoiser = SD3Denoiser(model, _prompt(model.config), backend="reference")
    noise = initial_noise((1, 4, 8, 8), seed=2)
    blend = initial_noise((1, 4, 8, 8), seed=3)
    with torch.no_grad():
        # A blend at the last step is what comes out.
        out = sample(denoiser, noise, sd3_sigmas(2), progress=False,
                     callback=lambda step, t, x: blend if step == 1 else None)
        assert torch.equal(out, blend)
        # Zero velocity: the latents never move.
        still = sample(denoiser, noise, sd3_sigmas(2), progress=False,
                       velocity_hook=lambda step, t, x, v: torch.zeros_like(v))
        assert torch.equal(still, noise)
        with pytest.raises(ValueError, match="callback must return"):
            sample(denoiser, noise, sd3_sigmas(1), progress=False, callback=lambda s, t, x: x[:, :2])
        with pytest.raises(ValueError, match="velocity_hook must return"):
            sample(denoiser, noise, sd3_sigmas(1), progress=False, velocity_hook=lambda s, t, x, v: None)


def test_inversion_runs_the_ode_backwards():
    """Euler steps in either direction; a linear field v = a*x + c is integrated step by step exactly."""
    a, c = 0.3, torch.linspace(-1, 1, 8).view(1, 2, 2, 2)
    field = lambda x, t, step, num_steps: a * x + c  # noqa: E731
    x0 = torch.randn(1, 2, 2, 2)
    sigmas = sd3_sigmas(4)
    inv = inversion_sigmas(sigmas)
    assert inv[0] == 0 and inv[-1] == 1 and torch.all(inv[1:] >= inv[:-1])
    expected = x0.clone()
    for t, t_next in zip(inv[:-1].tolist(), inv[1:].tolist()):
        expected = expected + (t_next - t) * (a * expected + c)
    assert_close_rel(sample(field, x0, inv, progress=False), expected, 1e-6, "inverted latents")
    one = euler_step(field, x0, 0.25, 0.5)
    assert_close_rel(one, x0 + 0.25 * (a * x0 + c), 1e-6, "single step")


def test_flux_denoiser_layouts():
    """Channel-concat (FluxEdit / Control) and Kontext layouts run end to end with the right shapes."""
    prompt_cfg = FluxConfig.tiny()
    edit = _flux(seed=7, in_channels=32, out_channels=16)  # 4 noisy + 4 source channels, packed x4
    x = initial_noise((2, 4, 8, 10), seed=5)
    source = initial_noise((1, 4, 8, 10), seed=6)
    prompt = _prompt(prompt_cfg)
    with torch.no_grad():
        v = FluxDenoiser(edit, prompt, concat_latents=source, backend="reference")(x, 0.6)
        v2 = FluxDenoiser(edit, prompt, concat_latents=source * 2, backend="reference")(x, 0.6)
    assert v.shape == x.shape and not torch.allclose(v, v2)
    with pytest.raises(ValueError, match="concat_latents must match"):
        FluxDenoiser(edit, prompt, concat_latents=source[..., :4], backend="reference")(x, 0.6)

    kontext = _flux(seed=8)
    seen = []

    class Ranges(AttentionPolicy):
        def request(self, site):
            seen.append((site.text, site.image, site.range("source")))

    src = initial_noise((1, 4, 6, 4), seed=9)
    with torch.no_grad():
        v = FluxDenoiser(kontext, prompt, kontext_latents=src, policy=Ranges(), backend="reference")(x, 0.4)
        v_other = FluxDenoiser(kontext, prompt, kontext_latents=src.flip(-1), backend="reference")(x, 0.4)
    assert v.shape == x.shape and not torch.allclose(v, v_other)
    assert seen == [((0, 5), (5, 25), (25, 31))] * 2
