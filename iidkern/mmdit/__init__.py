"""A compact from-scratch MM-DiT runner (SD3 / SD3.5 and Flux) whose every attention goes through iidkern.

Models (``nn.Module``, parameter names = diffusers' checkpoint keys)
--------------------------------------------------------------------
* :class:`SD3Transformer` (``SD3Config.sd3_medium() / sd35_medium() / sd35_large() / tiny()``)::

      v = model(latents[B,16,H,W], text[B,N,4096], pooled[B,2048], t, *,
                policy=None, step=None, num_steps=None, backend="auto", block_hook=None)  # -> [B,16,H,W]

  Attention sites: kind ``"joint"`` per block (sequence ``[text; image]``) and ``"image"``
  for SD3.5-medium's second attention (``attn2``, image tokens only).
* :class:`FluxTransformer` (``FluxConfig.dev(num_double=19, num_single=38, **kw) / schnell() / tiny()``)::

      v = model(x[B,N_img,C_in], text[B,N_txt,4096], pooled[B,768], t, *, img_ids[N_img,3],
                txt_ids=None, guidance=None, source=None, source_ids=None,
                policy=None, step=None, num_steps=None, backend="auto", block_hook=None)  # -> [B,N_img,C_out]

  Sites: ``"double"`` then ``"single"`` blocks, sequence ``[text; image(; source)]``, Kontext
  source tokens as ``site.extra == (("source", (a, b)),)``. Latent helpers:
  :func:`pack_latents`, :func:`unpack_latents`, :func:`image_ids` (``index=1`` for a Kontext source).
  FluxEdit / Control: ``FluxConfig.dev(in_channels=128, out_channels=64)`` with source latents
  concatenated on channels.

Both: ``t`` is the flow time in ``[0, 1]`` (1 = noise; the model multiplies by 1000).
``Model.random(config, seed=0, device=None, dtype=torch.float32)`` builds a seeded random
model directly on a device (benchmark: ``FluxTransformer.random(FluxConfig.dev(num_double=2,
num_single=2), device="cuda", dtype=torch.bfloat16)``). ``backend``: ``"auto" | "triton" |
"reference"`` go through :func:`iidkern.policy.attend`; ``"sdpa"`` is PyTorch's SDPA, a
baseline for benchmarks that refuses a policy.

Every attention call is ``attend(q, k, v, site, policy, layout="bnhd", backend=...)`` with an
:class:`~iidkern.policy.AttentionSite` (``block``, ``block_kind``, ``text``/``image`` ranges,
``step``, ``num_steps``, ``layer`` = call index within one forward, ``num_layers`` = calls per
forward, ``extra``). Sites are built only when a policy is given; a policy whose
``request`` returns None gets the plain fused attention.

``block_hook(kind, index, (text_in, image_in), (text_out, image_out)) -> None | (text, image)``
runs after every block (HeadRouter's text-token routing); for SD3's last block ``text_out`` is None.

Weights (:mod:`iidkern.mmdit.loading`)
--------------------------------------
* ``load_weights(model, path, layout="auto"|"diffusers"|"bfl", allow_cast=False)``: a file, a
  list of shards or a directory; strict: raises :class:`WeightLoadError` listing every missing,
  unexpected, mis-shaped and wrong-dtype key before copying anything.
* ``load_sd3(path, config=None, device=None, dtype=torch.bfloat16)`` /
  ``load_flux(path, config=None, ..., layout="auto")``: build on ``device`` in ``dtype`` and load
  a local diffusers folder / pipeline root (config from ``config.json``) or a BFL file.
* ``save_weights(model, path)`` (diffusers layout).

Sampling (:mod:`iidkern.mmdit.sampling`)
----------------------------------------
* schedules (``num_steps + 1`` times, 1 -> 0): ``sd3_sigmas(n, shift=3.0)``,
  ``flux_sigmas(n, image_seq_len, shift=True)`` (``shift=False`` for schnell), ``flux_mu``,
  ``inversion_sigmas(sigmas)`` (0 -> 1).
* denoisers ``d(x[B,C,H,W], t, step, num_steps) -> v`` (float32):
  ``SD3Denoiser(model, prompt, negative=None, guidance_scale=7.0, policy=None, backend="auto",
  block_hook=None)`` (CFG batch ``[uncond; cond]``) and ``FluxDenoiser(model, prompt,
  guidance=None, concat_latents=None, kontext_latents=None, policy=None, backend="auto",
  block_hook=None)``.
* ``sample(denoiser, latents, sigmas, callback=None, velocity_hook=None, progress=True)``:
  Euler; step ``i`` goes ``sigmas[i] -> sigmas[i+1]`` with ``step=i, num_steps=len(sigmas)-1``.
  ``velocity_hook(step, t, x, v) -> v`` before each update; ``callback(step, t_next, latents)
  -> latents | None`` after it. Increasing sigmas invert (RF-Inversion).
* ``euler_step(denoiser, x, t, t_next, step=None, num_steps=None, velocity_hook=None)``: one step, either direction.
* ``initial_noise(shape, seed=... | generator=..., device=None)``: CPU-drawn, device-independent.

Encoders (:mod:`iidkern.mmdit.encoders`)
----------------------------------------
:class:`PromptEmbeddings` ``(text, pooled)`` is all the runners need. Optional local-only
loaders: ``FluxTextEncoders.from_pretrained(root)``, ``SD3TextEncoders.from_pretrained(root)``
(``.encode(prompts) -> PromptEmbeddings``), ``load_vae(root)``, ``encode_image(vae, img)``,
``decode_latents(vae, z)``. A missing path raises FileNotFoundError naming it.
"""
from .encoders import FluxTextEncoders, PromptEmbeddings, SD3TextEncoders, decode_latents, encode_image, load_vae
from .flux import FluxConfig, FluxTransformer, image_ids, pack_latents, rope_tables, text_ids, unpack_latents
from .loading import (WeightLoadError, bfl_flux_to_diffusers, load_flux, load_sd3, load_state_dict_strict,
                      load_weights, save_weights)
from .sampling import (FluxDenoiser, SD3Denoiser, euler_step, flux_mu, flux_sigmas, initial_noise, inversion_sigmas,
                       sample, sd3_sigmas)
from .sd3 import SD3Config, SD3Transformer

__all__ = [
    "SD3Config", "SD3Transformer", "FluxConfig", "FluxTransformer",
    "pack_latents", "unpack_latents", "image_ids", "text_ids", "rope_tables",
    "WeightLoadError", "load_weights", "load_state_dict_strict", "load_sd3", "load_flux", "save_weights",
    "bfl_flux_to_diffusers",
    "sd3_sigmas", "flux_sigmas", "flux_mu", "inversion_sigmas", "initial_noise", "euler_step", "sample",
    "SD3Denoiser", "FluxDenoiser",
    "PromptEmbeddings", "FluxTextEncoders", "SD3TextEncoders", "load_vae", "encode_image", "decode_latents",
]
