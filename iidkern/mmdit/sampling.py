"""Rectified-flow sampling: timestep schedules, denoisers (CFG / guidance), an Euler loop with hooks.

Flow convention: ``x_t = (1 - t) x_0 + t * noise``, the model predicts the velocity
``v = noise - x_0``, and one Euler step from ``t`` to ``t_next`` is
``x_next = x + (t_next - t) * v``. The same step with ``t_next > t`` runs the ODE backwards
(image -> noise), which is what RF-Inversion needs: :func:`sample` accepts increasing
``sigmas`` as well, and :func:`euler_step` is the single step.

Schedules (``sigmas``: ``num_steps + 1`` times from 1 to 0, float32):

* :func:`sd3_sigmas` — SD3's fixed shift ``s t / (1 + (s - 1) t)`` (``shift=3``), exactly as
  diffusers' ``FlowMatchEulerDiscreteScheduler`` builds it for the SD3 pipelines.
* :func:`flux_sigmas` — Flux's resolution-dependent shift ``exp(mu) / (exp(mu) + 1/t - 1)``
  with ``mu`` linear in the image token count (:func:`flux_mu`); ``shift=False`` for schnell.

Denoisers turn a model into ``denoiser(x, t, step, num_steps) -> v`` on latents
``[B, C, H, W]`` (both families), in float32:

* :class:`SD3Denoiser` — classifier-free guidance (uncond and cond rows in one batch:
  rows ``[0, B)`` unconditional, ``[B, 2B)`` conditional, which is what a policy sees).
* :class:`FluxDenoiser` — guidance embedding; channel-concatenated source latents
  (FluxEdit / Control); Kontext source tokens.

Hooks of :func:`sample`:

* ``velocity_hook(step, t, x, v) -> v`` — called with every velocity before the step
  (RF-Inversion's controller ``v + eta * (target - v)``);
* ``callback(step, t, latents) -> latents | None`` — called after every step with the new
  latents and the time ``t`` they are at (blend latents with masks; return None to keep).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..policy import AttentionPolicy
from .flux import FluxTransformer, image_ids, pack_latents, unpack_latents
from .sd3 import SD3Transformer

Denoiser = Callable[..., torch.Tensor]  # denoiser(x, t, step, num_steps) -> v
VelocityHook = Callable[[int, float, torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, float, torch.Tensor], Optional[torch.Tensor]]


# ---------------------------------------------------------------------- schedules
def _check_steps(num_steps):
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")


def shift_sigmas(sigmas, shift: float):
    """SD3's shift: ``s t / (1 + (s - 1) t)`` (more steps at high noise for ``s > 1``)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(sigmas, mu: float):
    """Flux's exponential shift: ``exp(mu) / (exp(mu) + (1/t - 1))``."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """``mu`` linear in the number of image tokens: 0.5 at 256 tokens (512^2), 1.15 at 4096 (1024^2)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    intercept = base_shift - slope * base_seq_len  # summed in diffusers' order: the same float bits
    return image_seq_len * slope + intercept


def sd3_sigmas(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """``num_steps + 1`` times as diffusers' SD3 scheduler makes them: first the shifted 1 of its
    float32 table (1, or 1 ulp off it for some shifts), last 0.0."""
    _check_steps(num_steps)
    # The scheduler's float32 training table runs from the shifted 1 (1 - 1 ulp for some shifts)
    # to the shifted 1/1000; inference times span it evenly and are shifted once more, exactly as
    # diffusers does.
    table_end = torch.tensor([1.0, 1.0 / num_train_timesteps], dtype=torch.float32)
    sigma_max, sigma_min = (float(x) for x in shift_sigmas(table_end, shift))
    sigmas = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps) / num_train_timesteps
    sigmas = shift_sigmas(sigmas, shift).astype(np.float32)
    return torch.cat([torch.from_numpy(sigmas), torch.zeros(1)])


def flux_sigmas(num_steps: int, image_seq_len: Optional[int] = None, *, shift: bool = True,
                mu: Optional[float] = None) -> torch.Tensor:
    """``num_steps + 1`` times of the Flux pipelines: ``linspace(1, 1/n, n)``, shifted, then 0.

    ``shift=True`` (dev, Kontext) needs ``image_seq_len`` (packed image tokens, 4096 at 1024^2)
    or an explicit ``mu``; ``shift=False`` is schnell's unshifted schedule.
    """
    _check_steps(num_steps)
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    if shift:
        if mu is None:
            if image_seq_len is None:
                raise ValueError("flux_sigmas(shift=True) needs image_seq_len (packed image tokens) or mu")
            mu = flux_mu(image_seq_len)
        sigmas = time_shift(sigmas, mu)
    return torch.cat([torch.from_numpy(np.asarray(sigmas, dtype=np.float32)), torch.zeros(1)])


def inversion_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """The same times in increasing order, to run the ODE from the image to noise."""
    return sigmas.flip(0)


def initial_noise(shape: Sequence[int], *, seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                  device=None, dtype=torch.float32) -> torch.Tensor:
    """Gaussian latents drawn on the CPU (same numbers on every device) from ``seed`` or ``generator``."""
    if (seed is None) == (generator is None):
        raise ValueError("initial_noise: pass exactly one of seed= or generator=")
    if generator is None:
        generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------- denoisers
def _expand_batch(t: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ValueError(f"{name} has batch {t.shape[0]}, latents have {batch} (use 1 or {batch})")


def _check_same_text_length(prompt, negative) -> None:
    """CFG stacks both prompts in one batch, so their texts need one length (diffusers' SD3
    pipeline pads both to the same length and refuses prompt embeddings of other shapes)."""
    n_pos, n_neg = prompt.text.shape[1], negative.text.shape[1]
    if n_pos != n_neg:
        raise ValueError(f"prompt and negative must have the same number of text tokens (classifier-free "
                         f"guidance runs them in one batch), got prompt.text length {n_pos} and "
                         f"negative.text length {n_neg}; pad the shorter one")


class SD3Denoiser:
    """``v(x, t)`` of an :class:`SD3Transformer` with classifier-free guidance.

    ``v = v_u + guidance_scale * (v_c - v_u)``; with ``negative=None`` or
    ``guidance_scale == 1`` only the conditional pass runs. The CFG pass stacks
    ``[uncond; cond]`` in one batch of ``2B`` rows.
    """

    def __init__(self, model: SD3Transformer, prompt, negative=None, *, guidance_scale: float = 7.0,
                 policy: Optional[AttentionPolicy] = None, backend: str = "auto", block_hook=None):
        if not isinstance(model, SD3Transformer):
            raise TypeError(f"SD3Denoiser needs an SD3Transformer, got {type(model).__name__}")
        if negative is not None:
            _check_same_text_length(prompt, negative)
        self.model, self.prompt, self.negative = model, prompt, negative
        self.guidance_scale = float(guidance_scale)
        self.policy, self.backend, self.block_hook = policy, backend, block_hook

    @property
    def uses_cfg(self) -> bool:
        return self.negative is not None and self.guidance_scale != 1.0

    def __call__(self, x: torch.Tensor, t: float, step: Optional[int] = None,
                 num_steps: Optional[int] = None) -> torch.Tensor:
        b = x.shape[0]
        text = _expand_batch(self.prompt.text, b, "prompt.text")
        pooled = _expand_batch(self.prompt.pooled, b, "prompt.pooled")
        if self.uses_cfg:
            text = torch.cat([_expand_batch(self.negative.text, b, "negative.text"), text])
            pooled = torch.cat([_expand_batch(self.negative.pooled, b, "negative.pooled"), pooled])
            x = torch.cat([x, x])
        v = self.model(x, text, pooled, t, policy=self.policy, step=step, num_steps=num_steps, backend=self.backend,
                       block_hook=self.block_hook).float()
        if self.uses_cfg:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + self.guidance_scale * (v_cond - v_uncond)
        return v


class FluxDenoiser:
    """``v(x, t)`` of a :class:`FluxTransformer` on unpacked latents ``[B, 16, H, W]``.

    Args:
        guidance: guidance scale for guidance-distilled models (default 3.5 when the model
            embeds guidance, else None).
        concat_latents: ``[B, C_src, H, W]`` source / control latents concatenated on the
            channel axis (FluxEdit, Flux-Control, Fill); the model's ``in_channels`` must be
            ``4 * (16 + C_src)``.
        kontext_latents: ``[B, 16, H_src, W_src]`` source image appended as extra tokens
            (Kontext), with position ids of index 1.
    """

    def __init__(self, model: FluxTransformer, prompt, *, guidance: Optional[float] = None,
                 concat_latents: Optional[torch.Tensor] = None, kontext_latents: Optional[torch.Tensor] = None,
                 policy: Optional[AttentionPolicy] = None, backend: str = "auto", block_hook=None):
        if not isinstance(model, FluxTransformer):
            raise TypeError(f"FluxDenoiser needs a FluxTransformer, got {type(model).__name__}")
        if guidance is None and model.config.guidance_embeds:
            guidance = 3.5
        self.model, self.prompt, self.guidance = model, prompt, guidance
        self.concat_latents, self.kontext_latents = concat_latents, kontext_latents
        self.policy, self.backend, self.block_hook = policy, backend, block_hook

    def __call__(self, x: torch.Tensor, t: float, step: Optional[int] = None,
                 num_steps: Optional[int] = None) -> torch.Tensor:
        b, _, h, w = x.shape
        tokens = pack_latents(x)
        if self.concat_latents is not None:
            src = _expand_batch(self.concat_latents, b, "concat_latents")
            if src.shape[-2:] != x.shape[-2:]:
                raise ValueError(f"concat_latents must match the latent size {h}x{w}, got {tuple(src.shape[-2:])}")
            tokens = torch.cat([tokens, pack_latents(src.to(x.dtype))], dim=-1)
        extra = {}
        if self.kontext_latents is not None:
            src = _expand_batch(self.kontext_latents, b, "kontext_latents")
            extra = dict(source=pack_latents(src.to(x.dtype)),
                         source_ids=image_ids(src.shape[-2] // 2, src.shape[-1] // 2, index=1, device=x.device))
        v = self.model(tokens, _expand_batch(self.prompt.text, b, "prompt.text"),
                       _expand_batch(self.prompt.pooled, b, "prompt.pooled"), t,
                       img_ids=image_ids(h // 2, w // 2, device=x.device), guidance=self.guidance,
                       policy=self.policy, step=step, num_steps=num_steps, backend=self.backend,
                       block_hook=self.block_hook, **extra)
        return unpack_latents(v.float(), h, w)


# ---------------------------------------------------------------------- the Euler loop
def euler_step(denoiser: Denoiser, x: torch.Tensor, t: float, t_next: float, *, step: Optional[int] = None,
               num_steps: Optional[int] = None, velocity_hook: Optional[VelocityHook] = None) -> torch.Tensor:
    """One Euler step of the flow ODE from ``t`` to ``t_next`` (either direction), in float32."""
    x = x.float()
    v = denoiser(x, float(t), step, num_steps)
    if velocity_hook is not None:
        v = velocity_hook(step, float(t), x, v)
        if not isinstance(v, torch.Tensor) or v.shape != x.shape:
            raise ValueError(f"velocity_hook must return a tensor of shape {tuple(x.shape)}, got "
                             f"{getattr(v, 'shape', type(v).__name__)}")
    return x + (float(t_next) - float(t)) * v.float()


def sample(denoiser: Denoiser, latents: torch.Tensor, sigmas: Union[torch.Tensor, Sequence[float]], *,
           callback: Optional[StepCallback] = None, velocity_hook: Optional[VelocityHook] = None,
           progress: bool = True, desc: str = "sampling") -> torch.Tensor:
    """Integrate the flow ODE through ``sigmas`` (``num_steps + 1`` times) with Euler steps.

    Decreasing ``sigmas`` generate (noise -> image); increasing ones invert (image -> noise).
    Step ``i`` goes from ``sigmas[i]`` to ``sigmas[i+1]`` and tells every attention call
    ``step=i, num_steps=len(sigmas) - 1``. Returns float32 latents.
    """
    import tqdm

    sigmas = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    if len(sigmas) < 2:
        raise ValueError(f"sigmas needs at least 2 times (one step), got {len(sigmas)}")
    num_steps = len(sigmas) - 1
    x = latents.float()
    for i in tqdm.trange(num_steps, disable=not progress, desc=desc, leave=False):
        x = euler_step(denoiser, x, sigmas[i], sigmas[i + 1], step=i, num_steps=num_steps,
                       velocity_hook=velocity_hook)
        if callback is not None:
            replaced = callback(i, sigmas[i + 1], x)
            if replaced is not None:
                if not isinstance(replaced, torch.Tensor) or replaced.shape != x.shape:
                    raise ValueError(f"callback must return None or a tensor of shape {tuple(x.shape)}, got "
                                     f"{getattr(replaced, 'shape', type(replaced).__name__)}")
                x = replaced.float()
    return x
