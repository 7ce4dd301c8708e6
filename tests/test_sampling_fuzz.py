"""Hypothesis fuzz: the runner's sampling and encoding pieces equal diffusers' on random inputs.

What is compared (every model and tokenizer is tiny, random and built offline):

* schedules — :func:`sd3_sigmas` against ``FlowMatchEulerDiscreteScheduler`` set up as the SD3
  pipeline does (``retrieve_timesteps(scheduler, n)``; random steps, shift, ``num_train_timesteps``);
  :func:`flux_sigmas` / :func:`flux_mu` against the scheduler set up as the Flux pipeline does
  (``sigmas=linspace(1, 1/n, n)``, ``mu = calculate_shift(image_seq_len, ...)``), for FLUX.1-dev's
  config, random base/max shifts and sequence lengths, and ``use_dynamic_shifting`` off;
* Euler steps — :func:`sample` (and so :func:`euler_step`) against the pipelines' loop of
  ``scheduler.step`` on the same random velocity field, every step, bit for bit; also started in
  the middle of the schedule as the img2img pipelines do (``strength``, ``set_begin_index``) and
  on custom ``sigmas``;
* latents — :func:`pack_latents` / :func:`unpack_latents` / :func:`image_ids` and the seeded noise
  against ``FluxPipeline.prepare_latents`` / ``_unpack_latents`` / ``_prepare_latent_image_ids``
  (and Kontext's source ids); the VAE codec's shift / scaling against the pipelines' formulas;
* prompts — :class:`FluxTextEncoders` / :class:`SD3TextEncoders` against ``encode_prompt`` of
  ``FluxPipeline`` / ``StableDiffusion3Pipeline`` (one prompt or a list; empty, random and
  truncated prompts; random sequence lengths; SD3 with and without T5, CFG's empty negative);
* RF-Inversion — the controllers of :mod:`iidkern.edit.inversion` against a float64 re-derivation
  of METHODS.md's formula (HeadRouter step 5, paper time), and whole inversion / editing runs
  against a float64 Euler loop.

Not compared, because the runner does not claim it or does it differently on purpose:
``initial_noise`` always draws float32 and casts (diffusers draws in the pipeline's dtype: only
float32 noise is compared); the Flux model is given ``t = sigma`` as BFL does, diffusers
``timesteps / 1000`` (checked to be within one float32 rounding); no ``num_images_per_prompt``,
``prompt_2`` / ``prompt_3``, ``clip_skip``, SD3 dynamic shifting, ``shift_terminal`` / Karras-type
sigmas, ``invert_sigmas`` (the runner inverts on the flipped schedule) or ``strength`` helper (the
img2img start is checked as ``sample`` on ``sigmas[t_start:]``); ``RFInversionConfig``'s default
stop (7/28 of the steps) is a choice, not a published formula. The runner's SD3 model always
multiplies ``t`` by 1000, so only ``num_train_timesteps=1000`` timesteps are what it sees.

A deeper run: IIDKERN_FUZZ_EXAMPLES=300 pytest tests/test_sampling_fuzz.py
"""
import copy
import os
import types

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("tokenizers")

from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,  # noqa: E402
                       StableDiffusion3Pipeline)
from diffusers.image_processor import VaeImageProcessor  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux_img2img import FluxImg2ImgPipeline, retrieve_latents  # noqa: E402

from iidkern.edit.codec import VaeCodec  # noqa: E402
from iidkern.edit.inversion import InversionController, RFEditController, invert  # noqa: E402
from iidkern.edit.text import FluxPromptEncoder  # noqa: E402
from iidkern.mmdit import (FluxTextEncoders, SD3Config, SD3TextEncoders, encode_image, euler_step,  # noqa: E402
                           flux_mu, flux_sigmas, image_ids, initial_noise, pack_latents, sample, sd3_sigmas,
                           text_ids, unpack_latents)
from iidkern.mmdit.sampling import shift_sigmas  # noqa: E402
from iidkern.mmdit.testing import diffusers_sd3  # noqa: E402
from tiny_tokenizers import CHARS, WORDS, clip_tokenizer, t5_tokenizer  # noqa: E402


# A deeper run: IIDKERN_FUZZ_EXAMPLES=300 pytest tests/test_sampling_fuzz.py
EXAMPLES = int(os.environ.get("IIDKERN_FUZZ_EXAMPLES", "0"))
FUZZ = settings(deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CPU = torch.device("cpu")
ULP = 2.0 ** -23  # float32's relative spacing at 1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every tensor here is tiny: intra-op threads only add synchronization (a tiny VAE's convolutions
    took 300x longer with 2 threads than with 1 on a loaded 2-core machine). Both sides of every
    comparison run under the same setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scheduler(**kw):
    return FlowMatchEulerDiscreteScheduler(**kw)


def flux_dev_scheduler(num_train_timesteps=1000, **kw):
    """FLUX.1-dev's scheduler config (scheduler/scheduler_config.json)."""
    return _scheduler(**{**dict(num_train_timesteps=num_train_timesteps, shift=3.0, use_dynamic_shifting=True,
                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
                         **kw})


def flux_pipeline_schedule(sched, num_steps, image_seq_len):
    """Step 5 of ``FluxPipeline.__call__``: linspace sigmas, ``mu`` from the scheduler config, then
    ``retrieve_timesteps(scheduler, n, device, sigmas=sigmas, mu=mu)``."""
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    c = sched.config
    mu = calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    timesteps, n = retrieve_timesteps(sched, num_steps, CPU, sigmas=sigmas, mu=mu)
    assert n == num_steps
    return timesteps, mu


# --------------------------------------------------------------------------- schedules
shifts = st.sampled_from([1.0, 3.0, 2.0, 6.0, 1.5]) | st.floats(0.5, 12.0)


@settings(FUZZ, max_examples=EXAMPLES or 100)
@given(num_steps=st.integers(1, 60), shift=shifts, num_train=st.just(1000) | st.integers(1, 5000))
def test_sd3_schedule_equals_the_sd3_pipeline(num_steps, shift, num_train):
    """``sd3_sigmas`` == the SD3 pipeline's ``retrieve_timesteps(scheduler, n)`` (no custom sigmas,
    no dynamic shifting), bit for bit (also where diffusers' shifted table starts 1 ulp off 1), and
    ``sigma * num_train_timesteps`` are its timesteps (at 1000: what the runner's SD3 model makes
    of ``t``, the timestep diffusers feeds its model)."""
    sched = _scheduler(shift=shift, num_train_timesteps=num_train)
    timesteps, n = retrieve_timesteps(sched, num_steps, CPU)
    ours = sd3_sigmas(num_steps, shift=shift, num_train_timesteps=num_train)
    assert ours.dtype == torch.float32 and ours.shape == (n + 1,) == sched.sigmas.shape
    assert ours[-1] == 0 and abs(float(ours[0]) - 1) <= 2 * ULP
    assert torch.equal(ours, sched.sigmas)
    assert torch.equal(ours[:-1] * num_train, timesteps)


def test_sd3_schedule_when_sigma_max_is_not_one():
    """Found by the test above: sd3_sigmas spanned [sigma_min, 1] while diffusers spans its float32
    table's [sigma_min, sigma_max], and the shifted 1.0 is 1 - 1 ulp at shift 1.18."""
    sched = _scheduler(shift=1.18)
    sched.set_timesteps(1)  # diffusers: [0.99999988, 0.0]
    assert torch.equal(sd3_sigmas(1, shift=1.18), sched.sigmas)  # runner: [1.0, 0.0]


@settings(FUZZ, max_examples=EXAMPLES or 120)
@given(num_steps=st.integers(1, 60), grid=st.tuples(st.integers(1, 128), st.integers(1, 128)),
       mode=st.sampled_from(["dev", "custom", "static"]), num_train=st.just(1000) | st.integers(1, 5000),
       data=st.data())
def test_flux_schedule_equals_the_flux_pipeline(num_steps, grid, mode, num_train, data):
    """``flux_sigmas`` == the Flux pipeline's scheduler sigmas: FLUX.1-dev's dynamic shift with
    ``mu`` from the packed token count, a random base/max shift config, and dynamic shifting off
    (schnell: shift 1 = ``shift=False``; another shift = ``shift_sigmas`` of the unshifted times)."""
    seq_len = grid[0] * grid[1]  # packed image tokens, FluxPipeline's latents.shape[1]
    if mode == "dev":
        sched = flux_dev_scheduler(num_train)
        timesteps, mu = flux_pipeline_schedule(sched, num_steps, seq_len)
        assert flux_mu(seq_len) == mu  # diffusers' order of operations: the same bits
        ours = flux_sigmas(num_steps, seq_len)
        assert torch.equal(ours, sched.sigmas)
    elif mode == "custom":
        base_seq = data.draw(st.integers(1, 1024), "base_image_seq_len")
        max_seq = base_seq + data.draw(st.integers(256, 8192), "max_image_seq_len - base")
        base_shift, max_shift = data.draw(st.floats(0.0, 1.5), "base_shift"), data.draw(st.floats(0.0, 3.0), "max")
        # exp(mu) overflows float32 past mu = 88: both sides give NaN times, no schedule
        assume(calculate_shift(seq_len, base_seq, max_seq, base_shift, max_shift) < 50)
        sched = flux_dev_scheduler(num_train, base_shift=base_shift, max_shift=max_shift,
                                   base_image_seq_len=base_seq, max_image_seq_len=max_seq)
        timesteps, mu = flux_pipeline_schedule(sched, num_steps, seq_len)
        ours_mu = flux_mu(seq_len, base_seq, max_seq, base_shift, max_shift)
        assert ours_mu == mu
        ours = flux_sigmas(num_steps, mu=mu)
        assert torch.equal(ours, sched.sigmas)
        assert torch.equal(flux_sigmas(num_steps, mu=ours_mu), sched.sigmas)
    else:
        shift = data.draw(st.just(1.0) | st.floats(0.5, 8.0), "shift")
        sched = _scheduler(num_train_timesteps=num_train, shift=shift)  # the pipeline still passes mu
        timesteps, _ = flux_pipeline_schedule(sched, num_steps, seq_len)
        plain = flux_sigmas(num_steps, shift=False)
        ours = plain if shift == 1.0 else torch.cat([shift_sigmas(plain[:-1], shift), torch.zeros(1)])
        assert torch.equal(ours, sched.sigmas)
    assert ours.dtype == torch.float32 and ours.shape == (num_steps + 1,) and ours[-1] == 0
    assert torch.equal(ours[:-1] * num_train, timesteps)
    # FluxPipeline feeds timesteps / 1000 (the model multiplies by 1000 again); the runner feeds
    # sigma itself, as BFL does: the two differ by at most one float32 rounding.
    if num_train == 1000:
        assert torch.allclose(timesteps / 1000, ours[:-1], rtol=ULP, atol=0)


# --------------------------------------------------------------------------- Euler steps
def _random_schedule(data, num_steps):
    """``(scheduler set up as a pipeline does, the runner's sigmas)`` of a random kind."""
    kind = data.draw(st.sampled_from(["sd3", "flux", "schnell", "custom"]), "schedule")
    if kind == "sd3":
        shift = data.draw(st.sampled_from([3.0, 1.0, 2.0, 6.0]), "shift")
        sched = _scheduler(shift=shift)
        retrieve_timesteps(sched, num_steps, CPU)
        return sched, sd3_sigmas(num_steps, shift=shift)
    if kind in ("flux", "schnell"):
        seq_len = data.draw(st.integers(1, 8192), "image_seq_len")
        sched = flux_dev_scheduler() if kind == "flux" else _scheduler(shift=1.0)
        flux_pipeline_schedule(sched, num_steps, seq_len)
        return sched, flux_sigmas(num_steps, seq_len, shift=kind == "flux")
    # custom sigmas (the pipelines' sigmas= argument): strictly decreasing, in (0, 1]
    cuts = data.draw(st.lists(st.floats(2.0 ** -10, 1.0, width=32), min_size=num_steps, max_size=num_steps,
                              unique=True), "sigmas")
    custom = sorted(cuts, reverse=True)
    sched = _scheduler(shift=1.0)
    retrieve_timesteps(sched, None, CPU, sigmas=custom)
    return sched, torch.cat([torch.tensor(custom, dtype=torch.float32), torch.zeros(1)])


@settings(FUZZ, max_examples=EXAMPLES or 80)
@given(num_steps=st.integers(1, 60), shape=st.tuples(st.integers(1, 3), st.integers(1, 16), st.integers(1, 9),
                                                      st.integers(1, 9)),
       seed=st.integers(0, 2**31 - 1), strength=st.none() | st.floats(1e-3, 1.0), data=st.data())
def test_euler_loop_equals_scheduler_steps(num_steps, shape, seed, strength, data):
    """``sample`` (Euler steps through ``sigmas``) == the pipelines' ``scheduler.step`` loop on
    the same random velocity field, latents equal bit for bit after every step including the last;
    with ``strength`` the run starts where the img2img pipelines start (``get_timesteps``,
    ``set_begin_index``) and the runner is given ``sigmas[t_start:]``."""
    sched, sigmas = _random_schedule(data, num_steps)
    assert torch.equal(sigmas, sched.sigmas)
    fresh = copy.deepcopy(sched)  # for the single step at the end
    g = torch.Generator().manual_seed(seed)
    scale = float(torch.rand((), generator=g)) * 10 + 0.1
    x0 = torch.randn(shape, generator=g) * scale
    a = torch.randn(num_steps, *shape, generator=g)
    b = torch.randn(num_steps, *shape, generator=g) * scale

    t_start = 0
    timesteps = sched.timesteps
    if strength is not None:  # StableDiffusion3Img2ImgPipeline / FluxImg2ImgPipeline.get_timesteps
        init_timestep = min(num_steps * strength, num_steps)
        t_start = int(max(num_steps - init_timestep, 0))
        timesteps = sched.timesteps[t_start * sched.order:]
        sched.set_begin_index(t_start * sched.order)

    reference, x = [], x0.clone()
    for i, t in enumerate(timesteps):
        x = sched.step(a[t_start + i] * x + b[t_start + i], t, x).prev_sample
        reference.append(x)

    run_sigmas = sigmas[t_start:]
    seen = []

    def denoiser(x, t, step, n):
        assert n == len(run_sigmas) - 1 and t == float(run_sigmas[step]) and x.dtype == torch.float32
        return a[t_start + step] * x + b[t_start + step]

    def record(step, t, latents):
        assert t == float(run_sigmas[step + 1])
        seen.append(latents.clone())

    out = sample(denoiser, x0, run_sigmas, callback=record, progress=False)
    assert len(seen) == len(reference) == num_steps - t_start
    for i, (ours, ref) in enumerate(zip(seen, reference)):
        assert torch.equal(ours, ref), f"step {t_start + i} of {num_steps}"
    assert torch.equal(out, reference[-1])

    # one step at a random index (a scheduler started there), with a random velocity
    i = data.draw(st.integers(0, num_steps - 1), "step index")
    v = torch.randn(shape, generator=g) * scale
    fresh.set_begin_index(i)
    ref = fresh.step(v, fresh.timesteps[i], x0).prev_sample
    ours = euler_step(lambda *_: v, x0, float(sigmas[i]), float(sigmas[i + 1]), step=i, num_steps=num_steps)
    assert torch.equal(ours, ref)


# --------------------------------------------------------------------------- latents
@pytest.fixture(scope="module")
def bare_flux_pipeline():
    return FluxPipeline(scheduler=_scheduler(), vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=None)


@settings(FUZZ, max_examples=EXAMPLES or 80)
@given(batch=st.integers(1, 3), channels=st.integers(1, 16), grid=st.tuples(st.integers(1, 12), st.integers(1, 12)),
       extra=st.tuples(st.integers(0, 15), st.integers(0, 15)), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_flux_latent_packing_equals_the_flux_pipeline(bare_flux_pipeline, batch, channels, grid, extra, seed, dtype):
    """pack / unpack / ids == ``FluxPipeline``'s for a ``16 h + r`` x ``16 w + s`` picture; the seeded
    ``initial_noise`` packed == ``prepare_latents``' packed noise from a generator of that seed;
    Kontext's source ids; odd latent sizes are refused."""
    pipe = bare_flux_pipeline
    rows, cols = grid
    height, width = 16 * rows + extra[0], 16 * cols + extra[1]  # pixels; the pipeline floors to 16
    h, w = 2 * rows, 2 * cols
    # float32 noise only: diffusers draws in the pipeline's dtype, the runner always in float32
    # (then casts), so bf16 / fp16 pipelines start from other numbers (see the module doc)
    packed, ids = pipe.prepare_latents(batch, channels, height, width, torch.float32, CPU,
                                       torch.Generator().manual_seed(seed))
    assert torch.equal(pack_latents(initial_noise((batch, channels, h, w), seed=seed)), packed)
    assert torch.equal(image_ids(rows, cols), ids)
    noise = initial_noise((batch, channels, h, w), seed=seed, dtype=dtype)
    assert torch.equal(pack_latents(noise), FluxPipeline._pack_latents(noise, batch, channels, h, w))

    tokens = torch.randn(batch, rows * cols, 4 * channels, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    ours = unpack_latents(tokens, h, w)
    assert torch.equal(ours, FluxPipeline._unpack_latents(tokens, height, width, pipe.vae_scale_factor))
    assert torch.equal(pack_latents(ours), tokens) and torch.equal(unpack_latents(pack_latents(noise), h, w), noise)

    kontext = FluxPipeline._prepare_latent_image_ids(batch, rows, cols, CPU, torch.float32)
    kontext[..., 0] = 1  # FluxKontextPipeline.prepare_latents: the source image's ids
    assert torch.equal(image_ids(rows, cols, index=1), kontext)

    odd = torch.zeros(batch, channels, h + 1, w) if seed % 2 else torch.zeros(batch, channels, h, w + 1)
    with pytest.raises(ValueError, match="even height and width"):
        pack_latents(odd)
    with pytest.raises(ValueError, match="do not fill"):
        unpack_latents(tokens, h + 2, w)


@pytest.fixture(scope="module")
def vae():
    """A tiny random AutoencoderKL (factor 2); each example sets its own scaling / shift factors."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                             latent_channels=4, norm_num_groups=4, sample_size=16).eval()


@settings(FUZZ, max_examples=EXAMPLES or 40)
@given(scale=st.floats(0.05, 4.0), shift=st.just(0.0) | st.floats(-1.0, 1.0), batch=st.integers(1, 2),
       size=st.tuples(st.integers(1, 6), st.integers(1, 6)), seed=st.integers(0, 2**31 - 1))
def test_vae_codec_factors_equal_the_pipelines(vae, scale, shift, batch, size, seed):
    """``VaeCodec`` (``encode_image`` / ``decode_latents``) == the pipelines' formulas with the VAE's
    config: img2img / Kontext ``(z - shift) * scale`` (posterior mean = ``retrieve_latents(argmax)``;
    a draw with a seeded generator = ``FluxImg2ImgPipeline._encode_vae_image``), decoding
    ``z / scale + shift`` then the image processor's denormalization; the latent factor."""
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    codec = VaeCodec(vae)
    pipe = FluxPipeline(scheduler=_scheduler(), vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=None)
    assert codec.factor == pipe.vae_scale_factor == 2 and codec.latent_channels == vae.config.latent_channels
    g = torch.Generator().manual_seed(seed)
    f = codec.factor
    image = torch.rand(batch, 3, f * size[0], f * size[1], generator=g) * 2 - 1
    with torch.no_grad():
        mean = (retrieve_latents(vae.encode(image), sample_mode="argmax") - vae.config.shift_factor) * \
            vae.config.scaling_factor
        drawn = FluxImg2ImgPipeline._encode_vae_image(types.SimpleNamespace(vae=vae), image,
                                                      torch.Generator().manual_seed(seed))
    assert torch.equal(codec.encode(image), mean)
    assert torch.equal(encode_image(vae, image, mode="sample", generator=torch.Generator().manual_seed(seed)), drawn)

    z = torch.randn(batch, vae.config.latent_channels, size[0], size[1], generator=g) * 2
    with torch.no_grad():
        decoded = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    expected = VaeImageProcessor(vae_scale_factor=2 * f).postprocess(decoded, output_type="pt")  # [0, 1]
    assert torch.equal(codec.decode(z) * 0.5 + 0.5, expected)


# --------------------------------------------------------------------------- prompts
def _clip(vocab, hidden, projection=None, layers=2):
    cfg = transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=77,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=projection or 8)
    cls = transformers.CLIPTextModel if projection is None else transformers.CLIPTextModelWithProjection
    return cls(cfg).eval()


def _t5(vocab, d_model):
    return transformers.T5EncoderModel(transformers.T5Config(vocab_size=vocab, d_model=d_model, d_kv=8,
                                                             d_ff=2 * d_model, num_layers=1, num_heads=2)).eval()


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Tiny random CLIP / T5 encoders with real tokenizers, the runner's wrappers and diffusers'
    Flux and SD3 pipelines (SD3 with and without T5) holding the same modules."""
    levels = diffusers.utils.logging.get_verbosity(), transformers.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # truncation warnings of every long prompt
    transformers.logging.set_verbosity_error()
    clip_tok, clip_vocab = clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"), model_max_length=77)
    t5_tok, t5_vocab = t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(31)
        clip, t5 = _clip(clip_vocab, 8, layers=1), _t5(t5_vocab, 16)
        clip_l, clip_g, t5_xxl = _clip(clip_vocab, 8, 6), _clip(clip_vocab, 12, 10), _t5(t5_vocab, 32)
    flux = FluxPipeline(scheduler=_scheduler(), vae=None, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=None)
    sd3_model = diffusers_sd3(SD3Config.tiny(joint_attention_dim=32, pooled_projection_dim=16))

    def sd3(with_t5):
        return StableDiffusion3Pipeline(transformer=sd3_model, scheduler=_scheduler(shift=3.0), vae=None,
                                        text_encoder=clip_l, tokenizer=clip_tok, text_encoder_2=clip_g,
                                        tokenizer_2=clip_tok, text_encoder_3=t5_xxl if with_t5 else None,
                                        tokenizer_3=t5_tok if with_t5 else None)

    yield types.SimpleNamespace(
        flux=flux, flux_ours=FluxTextEncoders(clip, clip_tok, t5, t5_tok),
        sd3={True: sd3(True), False: sd3(False)},
        sd3_ours={True: SD3TextEncoders(clip_l, clip_tok, clip_g, clip_tok, t5_xxl, t5_tok, joint_dim=32),
                  False: SD3TextEncoders(clip_l, clip_tok, clip_g, clip_tok, joint_dim=32)})
    diffusers.utils.logging.set_verbosity(levels[0])
    transformers.logging.set_verbosity(levels[1])


_words = st.sampled_from(WORDS + ["zebra", "Castle!", "\u00e9t\u00e9", "DUSK,"])
_chars = CHARS + "  XYZ\u00e9\u00df"
one_prompt = st.one_of(
    st.just(""),
    st.lists(_words, max_size=12).map(" ".join),
    st.text(alphabet=_chars, max_size=30),
    # long: past CLIP's 77 tokens (one per character here) and most T5 lengths drawn below
    st.lists(_words, min_size=25, max_size=60).map(" ".join),
    st.text(alphabet=_chars, min_size=80, max_size=200))
prompts = st.lists(one_prompt, min_size=1, max_size=3)


@settings(FUZZ, max_examples=EXAMPLES or 50)
@given(batch=prompts, as_string=st.booleans(), max_length=st.integers(1, 40) | st.just(512))
def test_flux_prompt_encoding_equals_the_flux_pipeline(encoders, batch, as_string, max_length):
    """``FluxTextEncoders.encode`` == ``FluxPipeline.encode_prompt`` (T5 states padded / cut to
    ``max_sequence_length``, CLIP's pooled output of 77 tokens) and ``text_ids`` == its text ids;
    the editing encoder's full-length prompt and pooled vector too."""
    p = batch[0] if as_string else batch
    with torch.no_grad():
        text, pooled, ids = encoders.flux.encode_prompt(p, max_sequence_length=max_length)
    ours = encoders.flux_ours.encode(p, max_length=max_length)
    assert torch.equal(ours.text, text) and torch.equal(ours.pooled, pooled)
    assert ours.text.shape == (len(batch) if not as_string else 1, max_length, 16)
    assert torch.equal(text_ids(ours.text.shape[1]), ids)
    if max_length == 512:  # FluxPromptEncoder: one prompt padded to the pipeline's default length
        if not as_string:  # batch-1 against batch-1 (a batch's rows may differ in the last bit)
            with torch.no_grad():
                text, pooled, _ = encoders.flux.encode_prompt(batch[0])
        edit = FluxPromptEncoder(encoders.flux_ours)
        one = edit.encode(batch[0], length=512)
        assert torch.equal(one.text, text) and torch.equal(one.pooled, pooled)
        assert torch.equal(edit.pooled(batch[0]), pooled)


@settings(FUZZ, max_examples=EXAMPLES or 60)
@given(batch=prompts, as_string=st.booleans(), max_length=st.integers(1, 40) | st.just(256),
       with_t5=st.booleans(), cfg=st.booleans())
def test_sd3_prompt_encoding_equals_the_sd3_pipeline(encoders, batch, as_string, max_length, with_t5, cfg):
    """``SD3TextEncoders.encode`` == ``StableDiffusion3Pipeline.encode_prompt``: [CLIP-L ‖ CLIP-G]
    penultimate states zero-padded to the T5 width, then T5 (or ``max_sequence_length`` zero
    tokens without T5) on the token axis; pooled [CLIP-L ‖ CLIP-G] projections; CFG's negative
    is the empty prompt's encoding."""
    p = batch[0] if as_string else batch
    with torch.no_grad():
        text, negative, pooled, negative_pooled = encoders.sd3[with_t5].encode_prompt(
            p, None, None, do_classifier_free_guidance=cfg, max_sequence_length=max_length)
    enc = encoders.sd3_ours[with_t5]
    ours = enc.encode(p, max_length=max_length)
    rows = 1 if as_string else len(batch)
    assert ours.text.shape == (rows, 77 + max_length, 32) and ours.pooled.shape == (rows, 16)
    assert torch.equal(ours.text, text) and torch.equal(ours.pooled, pooled)
    if cfg:
        empty = enc.encode([""] * rows, max_length=max_length)
        assert torch.equal(empty.text, negative) and torch.equal(empty.pooled, negative_pooled)


# --------------------------------------------------------------------------- RF-Inversion
def paper_edit_velocity(v, x, y0, t, eta):
    """METHODS.md, HeadRouter 5, in the paper's time ``s`` (noise at 0, image at 1):
    ``u_hat = u + eta ((y0 - X_s) / (1 - s) - u)`` with ``u = dX/ds``. The runner's ``t`` is
    ``1 - s`` and its ``v = dx/dt = -u``; returns the runner's ``v_hat = -u_hat`` (float64)."""
    s = 1.0 - t
    u = -v
    u_hat = u + eta * ((y0 - x) / (1.0 - s) - u)
    return -u_hat


def paper_inversion_velocity(v, x, y1, t, gamma):
    """RF-Inversion's controlled forward ODE (image at 0, noise at 1, the runner's own time):
    ``u_hat = u + gamma ((y1 - Y_t) / (1 - t) - u)``, the pull toward the noise sample ``y1``."""
    return v + gamma * ((y1 - x) / (1.0 - t) - v)


@settings(FUZZ, max_examples=EXAMPLES or 120)
@given(batch=st.integers(1, 3), shape=st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5)),
       t=st.floats(1e-3, 1 - 1e-3), eta=st.floats(0.0, 1.0), gamma=st.floats(0.0, 1.0),
       window=st.tuples(st.integers(0, 30), st.integers(0, 30)), step=st.integers(0, 30),
       seed=st.integers(0, 2**31 - 1), data=st.data())
def test_rf_controllers_equal_the_published_formula(batch, shape, t, eta, gamma, window, step, seed, data):
    """``RFEditController`` == METHODS.md's controller (re-derived in float64 from the paper's
    time) on steps ``[start, stop)`` and on its ``rows`` only, identity elsewhere;
    ``InversionController`` == the controlled forward ODE toward ``y1``."""
    g = torch.Generator().manual_seed(seed)
    full = (batch, *shape)
    x, v, y1 = (torch.randn(full, generator=g) * 3 for _ in range(3))
    y0 = torch.randn((1 if data.draw(st.booleans(), "broadcast y0") else batch, *shape), generator=g) * 3
    start, stop = min(window), max(window)
    rows = data.draw(st.none() | st.lists(st.integers(0, batch - 1), unique=True), "rows")

    out = RFEditController(y0, eta, start, stop, rows=rows)(step, t, x, v)
    expected = v.double()
    if start <= step < stop:
        hat = paper_edit_velocity(v.double(), x.double(), y0.double(), t, eta)
        expected = expected.clone()
        for r in (range(batch) if rows is None else rows):
            expected[r] = hat[r]
    target = ((x.double() - y0.double()) / t).abs()
    assert ((out.double() - expected).abs() <= 1e-6 * (v.double().abs() + target + 1)).all()

    out = InversionController(y1, gamma)(step, t, x, v)
    expected = paper_inversion_velocity(v.double(), x.double(), y1.double(), t, gamma)
    target = ((y1.double() - x.double()) / (1 - t)).abs()
    assert ((out.double() - expected).abs() <= 1e-6 * (v.double().abs() + target + 1)).all()


@settings(FUZZ, max_examples=EXAMPLES or 60)
@given(num_steps=st.integers(1, 30), seq_len=st.integers(1, 4096), gamma=st.floats(0.0, 1.0),
       eta=st.floats(0.0, 1.0), window=st.tuples(st.integers(0, 30), st.integers(0, 30)),
       shape=st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 6), st.integers(1, 6)),
       seed=st.integers(0, 2**31 - 1))
def test_rf_inversion_and_editing_runs_equal_a_float64_loop(num_steps, seq_len, gamma, eta, window, shape, seed):
    """``invert`` (image -> noise on the flipped schedule, pulled toward ``y1``) and an editing
    ``sample`` with ``RFEditController`` == float64 Euler loops of the published controlled ODEs,
    on a random linear velocity field."""
    g = torch.Generator().manual_seed(seed)
    sigmas = flux_sigmas(num_steps, seq_len)
    y0, y1 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    a = torch.rand(num_steps, generator=g) * 2 - 1
    b = torch.randn(num_steps, *shape, generator=g)
    start, stop = min(window), max(window)

    def denoiser(x, t, step, n):
        return a[step] * x + b[step]

    def reference(x, times, control):
        x = x.double()
        for i in range(len(times) - 1):
            t, t_next = float(times[i]), float(times[i + 1])
            x = x + (t_next - t) * control(i, t, x, a[i].double() * x + b[i].double())
        return x

    # float32 against float64, over at most 30 steps: a few ulps of the terms' size per step (an
    # element may cancel to ~0, so the bound is absolute in that size, not relative to the result)
    x1 = invert(denoiser, y0, sigmas, gamma=gamma, y1=y1)
    ref = reference(y0, sigmas.flip(0),
                    lambda i, t, x, v: paper_inversion_velocity(v, x, y1.double(), t, gamma))
    size = max(1.0, *(float(z.abs().max()) for z in (y0, y1, b, ref)))
    torch.testing.assert_close(x1.double(), ref, rtol=0, atol=3e-6 * size, msg="inverted latents")

    edited = sample(denoiser, x1, sigmas, velocity_hook=RFEditController(y0, eta, start, stop), progress=False)
    ref = reference(x1, sigmas, lambda i, t, x, v: paper_edit_velocity(v, x, y0.double(), t, eta)
                    if start <= i < stop else v)
    size = max(1.0, *(float(z.abs().max()) for z in (x1, y0, b, ref)))
    torch.testing.assert_close(edited.double(), ref, rtol=0, atol=3e-6 * size, msg="edited latents")
