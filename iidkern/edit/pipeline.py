"""End-to-end editing runs on the from-scratch runner (:mod:`iidkern.mmdit`).

IID and its two baselines share one entry point, :func:`iid_edit`, so they run with the
same model, seed, schedule and step count:

* ``method="iid"`` — our default branch layout for IID step 4 (the paper leaves it open):
  up to step S one batch holds N single-instruction branches (row i sees only P_i, by
  :class:`~iidkern.edit.iid.BranchIsolationPolicy` tags) and the combined branch (all
  instructions); all start from the same noise. During step S the combined branch's
  penultimate-layer maps give the masks M_i. The latents step S produced are blended,
  ``z = sum_i M_i z^(i) / #{i: token in M_i}`` inside the masks (overlaps averaged) and
  ``z = z^(combined)`` in the background, and from step S+1 on one row runs with the
  combined prompt under IID's masked joint attention.
* ``method="combined"`` — one run with all instructions in the text slot, no masks.
* ``method="step"`` — step-by-step editing: N full runs, run i edits the latents run i-1
  produced (no decode/encode round trip between runs) with instruction i alone.

:func:`headrouter_edit`: RF-Inversion of the source picture with the source prompt, then
one two-row batch ``[reconstruction, editing]`` from the inverted noise with
:class:`~iidkern.edit.headrouter.HeadRouterPolicy` in every attention call, the DTR text
residual across double blocks (the runner's ``block_hook``), and the RF-Inversion editing
controller on ``[start, stop)``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..mmdit.encoders import PromptEmbeddings
from ..mmdit.sampling import FluxDenoiser, euler_step, flux_sigmas, initial_noise, sample
from ..policy import ChainPolicy
from . import checks
from .headrouter import HeadRouterConfig, HeadRouterPolicy, KeyRegionPolicy, TextResidual
from .iid import MAX_MASKED_INSTRUCTIONS, IIDConfig, IIDPolicy, check_mask_window
from .inversion import RFEditController, RFInversionConfig, invert
from .models import EditModel

IID_METHODS = ("iid", "step", "combined")


@dataclass
class EditResult:
    """What an editing run produced. Images are ``[1, 3, H, W]`` in ``[-1, 1]`` on the CPU.

    ``masks``: bool ``[M, N_img]`` on the token ``grid`` (IID: one per instruction;
    HeadRouter: key regions of ``mask_labels``); ``soft_maps``: the maps they came from.
    ``timings``: seconds per phase. ``extra``: method-specific pictures (e.g. HeadRouter's
    reconstruction row).
    """

    method: str
    image: torch.Tensor
    latents: torch.Tensor
    source: torch.Tensor
    grid: Tuple[int, int]
    masks: Optional[torch.Tensor] = None
    soft_maps: Optional[torch.Tensor] = None
    mask_labels: List[str] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)
    extra: Dict[str, torch.Tensor] = field(default_factory=dict)


class _Clock:
    """Wall-clock phases, synchronizing CUDA so GPU work is charged to the right phase."""

    def __init__(self, device):
        device = torch.device(device)
        self.cuda_device = device if device.type == "cuda" else None
        self.times: Dict[str, float] = {}
        self._start = time.perf_counter()

    def _now(self):
        if self.cuda_device is not None:
            torch.cuda.synchronize(self.cuda_device)
        return time.perf_counter()

    def phase(self, name):
        clock = self

        class _Phase:
            def __enter__(self):
                self.t0 = clock._now()

            def __exit__(self, *exc):
                clock.times[name] = clock.times.get(name, 0.0) + clock._now() - self.t0

        return _Phase()

    def total(self) -> Dict[str, float]:
        return {**self.times, "total": self._now() - self._start}


def token_masks_to_latents(masks: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """``[N, h*w]`` token masks (2x2 packed Flux tokens) -> float ``[N, 1, 2h, 2w]`` latent masks."""
    m = masks.float().reshape(-1, 1, grid[0], grid[1])
    return F.interpolate(m, scale_factor=2, mode="nearest")


def blend_branches(branches: torch.Tensor, combined: torch.Tensor, masks: torch.Tensor,
                   grid: Tuple[int, int]) -> torch.Tensor:
    """IID step 4: ``sum_i M_i z_i / count`` inside the masks (overlaps averaged), ``combined`` elsewhere.

    ``branches``: ``[N, C, H, W]``; ``combined``: ``[1, C, H, W]``; ``masks``: bool ``[N, h*w]``.
    """
    m = token_masks_to_latents(masks, grid).to(branches.device)  # [N, 1, H, W]
    count = m.sum(0, keepdim=True)
    inside = (m * branches).sum(0, keepdim=True) / count.clamp_min(1)
    return torch.where(count > 0, inside, combined)


def _source_kwargs(model: EditModel, source_latents: torch.Tensor) -> dict:
    if model.layout == "concat":
        return dict(concat_latents=source_latents)
    if model.layout == "kontext":
        return dict(kontext_latents=source_latents)
    raise ValueError(f"instruction editing needs a 'concat' (FluxEdit) or 'kontext' model, got layout "
                     f"{model.layout!r} (a text-to-image model edits through --method headrouter)")


MAX_STEPS = 10_000  # far past any sampler's schedule; a bound, so a typo is an error, not an allocation


def _check_run(num_steps, seed) -> Tuple[int, int]:
    num_steps = checks.integer(num_steps, "num_steps", minimum=1)
    if num_steps > MAX_STEPS:
        raise ValueError(f"num_steps must be <= {MAX_STEPS}, got {num_steps}")
    seed = checks.integer(seed, "seed")
    if not -2 ** 63 <= seed < 2 ** 64:  # what torch.Generator.manual_seed takes
        raise ValueError(f"seed must be in [-2**63, 2**64), got {seed}")
    return num_steps, seed


def _check_config(config, kind, name: str = "config"):
    """``config`` checked again (fields assigned after construction), or the method's defaults
    for None; another config class is a TypeError."""
    return checks.config(config, kind, name)


def _check_image(image: torch.Tensor, factor: int):
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[:2] != (1, 3):
        raise ValueError(f"image must be a [1, 3, H, W] tensor in [-1, 1], got "
                         f"{getattr(image, 'shape', type(image).__name__)}")
    if image.shape[2] % (2 * factor) or image.shape[3] % (2 * factor):
        raise ValueError(f"image height and width must be multiples of {2 * factor}, got {tuple(image.shape[2:])}")
    if not image.is_floating_point():
        raise TypeError(f"image must be a floating-point tensor in [-1, 1], got {image.dtype} (a uint8 picture "
                        "in [0, 255] is x / 127.5 - 1)")
    if image.numel():
        lo, hi = (x.item() for x in torch.aminmax(image))  # one pass over the picture
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(f"image must hold values in [-1, 1], got values in [{lo}, {hi}] (a [0, 1] picture "
                             "is 2 * x - 1)")


def _encode_source(model: EditModel, image: torch.Tensor, num_steps: int):
    """Source latents ``[1, C, h, w]``, the token grid (2x2 patches) and the step schedule."""
    latents = model.codec.encode(image.to(model.device))
    h, w = latents.shape[2:]
    grid = (h // 2, w // 2)
    return latents, grid, flux_sigmas(num_steps, image_seq_len=grid[0] * grid[1])


def _denoise(model: EditModel, prompt: PromptEmbeddings, x: torch.Tensor, sigmas: torch.Tensor, source_kwargs,
             policy=None, progress=True, desc="sampling") -> torch.Tensor:
    den = FluxDenoiser(model.transformer, prompt, guidance=model.guidance, policy=policy, backend=model.backend,
                       **source_kwargs)
    return sample(den, x, sigmas, progress=progress, desc=desc)


@torch.no_grad()
def iid_edit(model: EditModel, image: torch.Tensor, instructions: Sequence[str], *, method: str = "iid",
             num_steps: int = 28, seed: int = 0, config: Optional[IIDConfig] = None,
             progress: bool = True) -> EditResult:
    """Apply ``instructions`` to ``image`` with IID or a baseline (see the module doc)."""
    if method not in IID_METHODS:
        raise ValueError(f"method must be one of {IID_METHODS}, got {method!r}")
    if instructions is None:
        raise TypeError("instructions must be a sequence of names, got None")
    instructions = list(checks.names(instructions, "instructions"))
    if not instructions or any(not s.strip() for s in instructions):
        raise ValueError(f"instructions must be a non-empty list of non-empty strings, got {instructions!r}")
    _check_image(image, model.factor)
    num_steps, seed = _check_run(num_steps, seed)
    config = _check_config(config, IIDConfig)
    if method == "iid":
        _check_iid_config(model, config, num_steps, len(instructions) + 1)  # before encoding anything
    device = model.device
    clock = _Clock(device)
    with clock.phase("encode"):
        src, grid, sigmas = _encode_source(model, image, num_steps)
        noise = initial_noise(tuple(src.shape), seed=seed, device=device)
        text, ranges = model.text.encode_segments(instructions)
        text = text.to(device)
    result = EditResult(method, image, src, image.cpu(), grid, mask_labels=list(instructions))

    if method == "combined":
        with clock.phase("sampling"):
            z = _denoise(model, text, noise, sigmas, _source_kwargs(model, src), progress=progress,
                         desc="combined prompt")
    elif method == "step":
        z = src
        for i, instruction in enumerate(instructions):
            with clock.phase("encode"):
                single, _ = model.text.encode_segments([instruction])
            with clock.phase("sampling"):
                z = _denoise(model, single.to(device), noise, sigmas, _source_kwargs(model, z), progress=progress,
                             desc=f"step-by-step {i + 1}/{len(instructions)}")
    else:
        z, policy = _iid_run(model, text, ranges, instructions, noise, sigmas, src, grid, config, clock, progress)
        result.masks, result.soft_maps = policy.masks.cpu(), policy.soft.cpu()
    with clock.phase("decode"):
        result.image = model.codec.decode(z).cpu()
    result.latents = z.cpu()
    result.timings = clock.total()
    return result


def _check_iid_config(model: EditModel, config: IIDConfig, num_steps: int, batch: int) -> int:
    """S, after checking S, the map layers and the map row against this run (``batch`` rows:
    one per instruction's branch, then the combined one): a wrong one would otherwise show
    only after sampling up to S, as "no maps captured" or an IndexError."""
    if batch - 1 > MAX_MASKED_INSTRUCTIONS:
        raise ValueError(f"instructions: IID masks at most {MAX_MASKED_INSTRUCTIONS} instructions (one tag bit each), "
                         f"got {batch - 1}")
    s = config.resolved_map_step(num_steps)
    if not 0 <= s < num_steps:
        raise ValueError(f"IIDConfig: map_step must be in [0, num_steps={num_steps}), got {s}")
    check_mask_window(s, config.mask_until)  # map_step=None resolves S only now
    config.map_layers(model.transformer.num_attention_layers)  # raises on a layer the model lacks
    if not -batch <= config.map_row < batch:
        raise ValueError(f"IIDConfig: map_row must index this run's batch of {batch} rows (one per instruction, "
                         f"then the combined branch), i.e. lie in [{-batch}, {batch}), got {config.map_row}")
    return s


def _iid_run(model, text, ranges, instructions, noise, sigmas, src, grid, config, clock, progress):
    import tqdm

    n = len(instructions)
    device = model.device
    num_steps = len(sigmas) - 1
    s = _check_iid_config(model, config, num_steps, n + 1)
    pooled = torch.cat([model.text.pooled(p).to(device) for p in instructions] + [text.pooled])
    branches = PromptEmbeddings(text.text.expand(n + 1, -1, -1), pooled)
    policy = IIDPolicy(ranges, grid, config, row_instruction=list(range(n)) + [None], device=device)
    policy.reset()  # a run's maps and masks come from that run only
    kwargs = _source_kwargs(model, src)
    early = FluxDenoiser(model.transformer, branches, guidance=model.guidance, policy=policy, backend=model.backend,
                         **kwargs)
    late = FluxDenoiser(model.transformer, text, guidance=model.guidance, policy=policy, backend=model.backend,
                        **kwargs)
    x = noise.expand(n + 1, -1, -1, -1)
    for i in tqdm.trange(num_steps, disable=not progress, desc="IID", leave=False):
        with clock.phase("sampling" if i != s else "sampling (step S: maps + blend)"):
            x = euler_step(early if i <= s else late, x, float(sigmas[i]), float(sigmas[i + 1]), step=i,
                           num_steps=num_steps)
            if i == s:
                if policy.masks is None:
                    raise RuntimeError(f"IID: no maps were captured at step S={s} (map_layer={config.map_layer})")
                x = blend_branches(x[:n], x[n:], policy.masks, grid)
    return x, policy


@torch.no_grad()
def headrouter_edit(model: EditModel, image: torch.Tensor, source_prompt: str, target_prompt: str, *,
                    num_steps: int = 28, seed: int = 0, config: Optional[HeadRouterConfig] = None,
                    inversion: Optional[RFInversionConfig] = None, key_words: Optional[Sequence[str]] = None,
                    progress: bool = True) -> EditResult:
    """HeadRouter editing of a real picture (see the module doc).

    ``key_words``: target words (any case) whose key regions are returned as masks (default: the
    target's words that the source lacks, else every target word); a ValueError if none of
    them is a word of the target.
    """
    for name, value in (("source_prompt", source_prompt), ("target_prompt", target_prompt)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if model.layout != "t2i":
        raise ValueError(f"HeadRouter inverts a text-to-image model (layout 't2i'), got layout {model.layout!r}")
    _check_image(image, model.factor)
    num_steps, seed = _check_run(num_steps, seed)
    config = _check_config(config, HeadRouterConfig)
    key_words = checks.names(key_words, "key_words")  # a bare string would match its substrings
    if set(map(frozenset, config.pairs)) != {frozenset((0, 1))}:  # the run's batch is [source; target]
        raise ValueError(f"HeadRouterConfig: pairs must be ((0, 1),) or ((1, 0),) for headrouter_edit (one "
                         f"(recon_row, edit_row) pair over its two-row batch), got {config.pairs}")
    if config.layout != "bnhd":  # receive() indexes the output by this layout; the runner's is fixed
        raise ValueError(f"HeadRouterConfig: layout must be 'bnhd' for headrouter_edit (the runner attends in "
                         f"[B, N, H, D]), got {config.layout!r}")
    inversion = _check_config(inversion, RFInversionConfig, "inversion")
    edit_stop = inversion.resolved_stop(num_steps)
    if inversion.start > edit_stop:  # RFEditController would refuse it after the inversion
        raise ValueError(f"RFInversionConfig: start={inversion.start} is past the editing controller's stop "
                         f"{edit_stop} for {num_steps} steps (stop=None scales 7/28 of the steps); "
                         f"give a stop >= start")
    recon_row, edit_row = config.pairs[0]
    device = model.device
    clock = _Clock(device)
    with clock.phase("encode"):
        y0, grid, sigmas = _encode_source(model, image, num_steps)
        length = max(model.text.num_tokens(source_prompt), model.text.num_tokens(target_prompt))
        src_emb = model.text.encode(source_prompt, length).to(device)
        tgt_emb = model.text.encode(target_prompt, length).to(device)
        words = model.text.word_ranges(target_prompt)
        source_words = {w for w, _ in model.text.word_ranges(source_prompt)}
        if key_words:
            wanted = {w.lower() for w in key_words}  # word_ranges lowercases the prompt's words
            chosen = [wr for wr in words if wr[0] in wanted]
            if not chosen:  # a misspelt word would silently give every word's regions
                raise ValueError(f"key_words {list(key_words)} name no word of the target prompt; its words: "
                                 f"{[w for w, _ in words]}")
        else:
            chosen = [wr for wr in words if wr[0] not in source_words] or words
    with clock.phase("inversion"):
        den = FluxDenoiser(model.transformer, src_emb, guidance=model.guidance, backend=model.backend)
        x1 = invert(den, y0, sigmas, gamma=inversion.gamma, seed=seed, progress=progress)

    router = HeadRouterPolicy(config)
    regions = KeyRegionPolicy([r for _, r in chosen], row=edit_row)
    router.reset()  # previous-step maps and key-region sums come from this run only
    regions.reset()
    policy = ChainPolicy(router, regions)
    hook = _text_residual_hook(model, config, edit_row)
    prompts = PromptEmbeddings.cat([src_emb, tgt_emb] if recon_row < edit_row else [tgt_emb, src_emb])
    controller = RFEditController(y0, inversion.eta, inversion.start, edit_stop)
    with clock.phase("sampling"):
        den = FluxDenoiser(model.transformer, prompts, guidance=model.guidance, policy=policy, backend=model.backend,
                           block_hook=hook)
        z = sample(den, x1.expand(2, -1, -1, -1), sigmas, velocity_hook=controller, progress=progress,
                   desc="HeadRouter")
    with clock.phase("decode"):
        edited = model.codec.decode(z[edit_row:edit_row + 1]).cpu()
        recon = model.codec.decode(z[recon_row:recon_row + 1]).cpu()
    result = EditResult("headrouter", edited, z[edit_row:edit_row + 1].cpu(), image.cpu(), grid,
                        masks=regions.masks().cpu() if regions.maps is not None else None,
                        soft_maps=regions.maps.cpu() if regions.maps is not None else None,
                        mask_labels=[w for w, _ in chosen], extra={"reconstruction": recon,
                                                                   "inverted_noise": x1.cpu()})
    result.timings = clock.total()
    return result


def _text_residual_hook(model: EditModel, config: HeadRouterConfig, edit_row: int):
    """``block_hook`` applying HeadRouter's DTR text residual across the double blocks."""
    if not config.dtr_text:
        return None
    residual = TextResidual(config.dtr_text_keep, rows=config.edit_rows)
    num_double = model.transformer.config.num_layers

    def hook(kind, index, inputs, outputs):
        if kind != "double":
            return None
        return residual(index, num_double, inputs[0], outputs[0]), outputs[1]

    return hook
