"""IID (Instruction Influence Disentanglement) as attention policies.

METHODS.md, IID. Three small policies and one that sequences them:

* :class:`BranchIsolationPolicy` (steps ``<= S``): in a batch that holds one
  single-instruction branch per instruction next to the combined branch, row ``r`` of
  instruction ``i`` cannot see the text of any other instruction (their keys are hidden
  by tags), so one batched forward equals N single-instruction runs plus the combined
  run, all on the same text layout ``[P_1 ... P_N]``.
* :class:`IIDMapPolicy` (step ``S``, the map layer(s)): ONE fused probe per call gives the
  per-head image x instruction maps ``[B, H, N_img, N]`` (mean over each instruction's
  tokens); :func:`~iidkern.edit.masks.iid_masks` turns them into region masks ``M_i``.
  OmniGen-style image x image sources are options (``map_source``).
* :class:`IIDMaskPolicy` (steps ``S+1 .. T``): the tags of
  :func:`iidkern.instruction_tags` built once (one :func:`iidkern.tag_mask` per sequence
  layout) and handed to every block.
* :class:`IIDPolicy`: isolation + capture up to ``S``, masks after.

Every policy is model-agnostic: it only reads :class:`~iidkern.policy.AttentionSite`
ranges. Instruction ranges are given relative to the start of the text range, because the
text slot is the pipeline's business and its offset in the joint sequence is the model's.

Step convention: steps are the sampler's 0-based indices ``0 .. num_steps-1``. The maps
are captured during the forward pass of step ``S``; the pipeline blends the latents that
step ``S`` produced; masked attention runs in every block of steps ``S+1`` up to
``mask_until`` (default: the last step).
"""
from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..attention import tag_mask
from ..policy import AttentionPolicy, AttentionRequest, AttentionSite, ChainPolicy, RunScopedPolicy
from ..specs import Probe, TokenGroups, ValueProbe, instruction_tags
from . import checks
from .masks import THRESHOLD_RULES, iid_masks, sigma_problem, threshold_value_problem
from .rows import batch_rows

Range = Tuple[int, int]
MAP_SOURCES = ("text", "image_colmean", "image_propagation")
PUBLIC_MAP_STEP_FRACTION = 27 / 50  # FluxEdit: S = 27 of T = 50 (METHODS.md, IID step 2)


def default_map_step(num_steps: int) -> int:
    """The public FluxEdit choice S = 27 of 50, scaled to ``num_steps`` (0-based index)."""
    return max(0, min(num_steps - 1, int(round(PUBLIC_MAP_STEP_FRACTION * num_steps)) - 1))


@dataclass
class IIDConfig:
    """The open choices of IID, all configurable (defaults documented in METHODS.md).

    ``map_step``: S (0-based); ``None`` = :func:`default_map_step`. ``map_layer``: which
    attention call(s) of the forward pass give the maps: a negative int counts from the end
    (``-2`` = penultimate), a sequence of ints averages those calls. ``map_source``:
    ``"text"`` (image x instruction probe, FluxEdit), ``"image_colmean"`` (per branch row,
    the column mean over image queries of image x image attention, OmniGen) or
    ``"image_propagation"`` (per branch row, ``mean_h A_h @ x`` for a per-key signal ``x``).
    ``map_row``: the batch row whose text maps are used (the combined branch, last by
    default). ``sigma`` / ``kernel_size``: Gaussian smoothing on the latent grid (sigma: a
    finite number in [0, 1000] latent tokens, 0 = off). ``threshold``: ``"otsu"`` |
    ``"fixed"`` (``threshold_value`` in [0, 1]) | ``"top"`` (``threshold_value`` in (0, 1]);
    Otsu ignores ``threshold_value``.
    ``background``: what image tokens outside every mask see after S (``"none"`` = no
    instruction, ``"all"`` = every instruction). ``mask_until``: last masked step
    (inclusive; ``None`` = to the end). ``visible_ranges``: names of ``AttentionSite.extra``
    ranges that stay visible to and from everything (conditioning: source image, time
    token); ``None`` = every extra range. ``shared_text``: text tokens outside every
    instruction, padding included, are conditioning seen by every token (``"visible"``) or
    seen by none (``"hidden"``); where the text encoder ran over the whole prompt (one T5
    sequence holding every instruction, padded to 512 as diffusers' Flux does), those tokens
    carry every instruction, so ``"hidden"`` keeps the regions apart. The built-in pipelines
    encode each instruction on its own and leave no such tokens.
    """

    map_step: Optional[int] = None
    map_layer: Union[int, Sequence[int]] = -2
    map_source: str = "text"
    map_row: int = -1
    sigma: float = 1.0
    kernel_size: Optional[int] = None
    threshold: str = "otsu"
    threshold_value: float = 0.5
    background: str = "none"
    mask_until: Optional[int] = None
    visible_ranges: Optional[Sequence[str]] = None
    image_key_range: str = "image"  # image x image sources: the key range ("source" for Kontext layouts)
    propagation_signal: Optional[torch.Tensor] = None  # [N_key_range, C<=16]; None = indicator of the key range
    shared_text: str = "visible"  # text tokens outside every instruction: "visible" (conditioning) | "hidden"

    def __post_init__(self):
        # Types first (a string or a float would fail only at step S, or change the method).
        self.map_step = checks.optional_integer(self.map_step, "IIDConfig: map_step")
        self.map_row = checks.integer(self.map_row, "IIDConfig: map_row")
        self.sigma = checks.real(self.sigma, "IIDConfig: sigma", finite=False)  # sigma_problem words the range
        self.kernel_size = checks.optional_integer(self.kernel_size, "IIDConfig: kernel_size")
        self.threshold_value = checks.real(self.threshold_value, "IIDConfig: threshold_value", finite=False)
        self.mask_until = checks.optional_integer(self.mask_until, "IIDConfig: mask_until", minimum=0)
        self.visible_ranges = checks.names(self.visible_ranges, "IIDConfig: visible_ranges")
        if not isinstance(self.image_key_range, str):
            raise TypeError(f"IIDConfig: image_key_range must be a range name (str), got {self.image_key_range!r}")
        if self.map_source not in MAP_SOURCES:
            raise ValueError(f"IIDConfig: map_source must be one of {MAP_SOURCES}, got {self.map_source!r}")
        if self.threshold not in THRESHOLD_RULES:
            raise ValueError(f"IIDConfig: threshold must be one of {THRESHOLD_RULES}, got {self.threshold!r}")
        if self.background not in ("none", "all"):
            raise ValueError(f"IIDConfig: background must be 'none' or 'all', got {self.background!r}")
        if self.shared_text not in ("visible", "hidden"):
            raise ValueError(f"IIDConfig: shared_text must be 'visible' or 'hidden', got {self.shared_text!r}")
        problem = sigma_problem(self.sigma)
        if problem is not None:
            raise ValueError(f"IIDConfig: sigma {problem}")
        if self.kernel_size is not None and (self.kernel_size < 1 or self.kernel_size % 2 == 0):
            raise ValueError(f"IIDConfig: kernel_size must be None or a positive odd int, got {self.kernel_size}")
        problem = threshold_value_problem(self.threshold, self.threshold_value)
        if problem is not None:  # checked here, not after sampling up to S in binarize
            raise ValueError(f"IIDConfig: threshold_value: {problem}")
        if self.map_step is not None and self.map_step < 0:
            raise ValueError(f"IIDConfig: map_step must be None or >= 0, got {self.map_step}")
        if self.map_step is not None:
            check_mask_window(self.map_step, self.mask_until)
        if not _layer_tuple(self.map_layer):
            raise ValueError(f"IIDConfig: map_layer must be an int or a non-empty sequence of ints, "
                             f"got {self.map_layer!r}")
        signal = self.propagation_signal
        if signal is not None and not isinstance(signal, torch.Tensor):
            raise TypeError(f"IIDConfig: propagation_signal must be None or a torch.Tensor [N_key_range, C], "
                            f"got {type(signal).__name__}")
        if signal is not None and signal.dim() != 2:  # its length is checked against the key range at step S
            raise ValueError(f"IIDConfig: propagation_signal must be 2-D [N_key_range, C], got shape "
                             f"{tuple(signal.shape)}")

    def resolved_map_step(self, num_steps: Optional[int]) -> int:
        if self.map_step is not None:
            return int(self.map_step)
        if num_steps is None:
            raise ValueError("IIDConfig: map_step is None and the site carries no num_steps to derive it from")
        return default_map_step(num_steps)

    def map_layers(self, num_layers: int) -> Tuple[int, ...]:
        """The map layers as indices ``0 .. num_layers-1``; ``num_layers <= 0``: unknown (no range check).

        A layer outside ``[-num_layers, num_layers)`` is a ValueError: no call would match it,
        and the run would only find out after sampling up to S.
        """
        layers = _layer_tuple(self.map_layer)
        if any(layer < 0 for layer in layers) and num_layers <= 0:
            raise ValueError("IIDConfig: a negative map_layer needs AttentionSite.num_layers (the runner must set it)")
        bad = [layer for layer in layers if num_layers > 0 and not -num_layers <= layer < num_layers]
        if bad:
            raise ValueError(f"IIDConfig: map_layer {bad[0]} is out of range for a model with {num_layers} attention "
                             f"layers (expected {-num_layers} .. {num_layers - 1})")
        return tuple(layer + num_layers if layer < 0 else layer for layer in layers)


def _layer_tuple(map_layer) -> Tuple[int, ...]:
    """``map_layer`` as a tuple of ints; empty when it is neither an int nor a sequence of ints."""
    def is_int(x):
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    if is_int(map_layer):
        return (int(map_layer),)
    if isinstance(map_layer, (str, bytes)) or not isinstance(map_layer, Sequence):
        return ()
    return tuple(int(x) for x in map_layer) if all(is_int(x) for x in map_layer) else ()


# instruction_tags gives each instruction a tag bit of an int64 (bit 62 marks image tokens)
MAX_MASKED_INSTRUCTIONS = 62


def check_mask_window(map_step: int, mask_until: Optional[int]) -> None:
    """The masked steps are ``S+1 .. mask_until``: a ``mask_until`` at or before S leaves none,
    which would silently run IID without its masked attention."""
    if mask_until is not None and mask_until <= map_step:
        raise ValueError(f"IIDConfig: mask_until must be > map_step (the masked steps are map_step+1 .. mask_until), "
                         f"got map_step={map_step}, mask_until={mask_until}")


def _check_instructions(instructions: Sequence[Range], masked: bool = False) -> Tuple[Range, ...]:
    """``masked``: the instructions' masks become tags, which hold at most 62: checked here,
    before any step runs, not at the first masked step."""
    out = checks.index_pairs(instructions, "IID: instructions", "[(0, 5), (5, 9)]")
    if not out:
        raise ValueError("IID: need at least one instruction range")
    if masked and len(out) > MAX_MASKED_INSTRUCTIONS:
        raise ValueError(f"IID: at most {MAX_MASKED_INSTRUCTIONS} instructions can be masked (one int64 tag bit "
                         f"each; bit 62 marks image tokens), got {len(out)}")
    for i, (a, b) in enumerate(out):
        if not 0 <= a < b:
            raise ValueError(f"IID: instruction {i} range {(a, b)} must satisfy 0 <= start < stop "
                             "(relative to the start of the text range)")
    for i, (a, b) in enumerate(out):  # a token holds one instruction's id (TokenGroups.segments)
        for j, (c, d) in enumerate(out[:i]):
            if a < d and c < b:
                raise ValueError(f"IID: instruction ranges {j} {(c, d)} and {i} {(a, b)} overlap")
    return out


def _check_grid(grid) -> Tuple[int, int]:
    """The latent token grid ``(rows, cols)``, both >= 1."""
    rows, cols = checks.pair(grid, "IID: grid", "a (rows, cols) pair of the latent token grid")
    return checks.integer(rows, "IID: grid rows", 1), checks.integer(cols, "IID: grid cols", 1)


def absolute_instruction_ranges(site: AttentionSite, instructions: Sequence[Range]) -> List[Range]:
    """Instruction ranges (relative to the text range) as joint-sequence ranges."""
    t0, t1 = site.text
    ranges = [(t0 + a, t0 + b) for a, b in instructions]
    for i, (a, b) in enumerate(ranges):
        if b > t1:
            raise ValueError(f"IID: instruction {i} ends at text offset {b - t0}, past the text range {site.text}")
    return ranges


def _visible(site: AttentionSite, names: Optional[Sequence[str]]) -> List[Range]:
    if names is None:
        return [r for _, r in site.extra]
    return [site.range(name) for name in names if any(key == name for key, _ in site.extra)]


def shared_text_ranges(site: AttentionSite, instructions: Sequence[Range]) -> List[Range]:
    """Text tokens of ``site`` outside every instruction, as joint-sequence ranges."""
    covered = torch.zeros(site.text[1] - site.text[0], dtype=torch.bool)
    for a, b in instructions:
        covered[a:b] = True
    out, start = [], None
    for i, c in enumerate(covered.tolist() + [True]):
        if not c and start is None:
            start = i
        elif c and start is not None:
            out.append((site.text[0] + start, site.text[0] + i))
            start = None
    return out


def _site_range(site: AttentionSite, name: str, field: str) -> Range:
    """``site.range(name)`` with a ValueError that lists the ranges this model's layout has."""
    names = ("text", "image") + tuple(key for key, _ in site.extra)
    if name not in names:
        raise ValueError(f"IIDConfig: {field}={name!r} is not a range of this model's attention sites; "
                         f"it has {names}")
    return site.range(name)


def _has_text(site: AttentionSite) -> bool:
    return site.text[1] > site.text[0]


FORWARDS = ("all", "first")  # IIDMaskPolicy: which forwards of a step take the masks


def _check_masked_rows(value, what: str) -> Optional[Tuple[bool, ...]]:
    if value is None:
        return None
    rows = tuple(checks.flag(r, what) for r in checks.sequence(value, what, "None or one bool a batch row"))
    if not rows:
        raise ValueError(f"{what} must name at least one batch row, got {value!r}")
    return rows


def _warn_if_empty(masks: torch.Tensor, map_step: int) -> None:
    """Captured masks taken into use (after every map layer of step S has been averaged): an
    empty one is no error (a flat map has no region to find), but its instruction then
    reaches no image token after S and the blend keeps the combined row there: say so."""
    empty = [i for i in range(masks.shape[-2]) if not masks[..., i, :].any()]
    if empty:
        warnings.warn(f"IID: the mask of instruction(s) {empty} captured at step {map_step} is empty (a flat or "
                      f"sub-threshold map): they edit nothing after step S", RuntimeWarning, stacklevel=3)


def _layout_key(site: AttentionSite) -> tuple:
    return (site.text, site.image, site.extra, site.seq_len)


# --------------------------------------------------------------------------- isolation
class BranchIsolationPolicy(AttentionPolicy):
    """Batched single-instruction branches: row ``r`` sees only instruction ``row_instruction[r]``.

    ``row_instruction``: per batch row, an instruction index or ``None`` (the combined
    branch: no restriction). Hidden instruction tokens still run through the model but no
    other token reads them, which equals a prompt without them. ``until_step``: last step
    (inclusive) with isolation.
    """

    def __init__(self, instructions: Sequence[Range], row_instruction: Sequence[Optional[int]],
                 until_step: Optional[int] = None, device=None):
        self.instructions = _check_instructions(instructions)
        rows = checks.sequence(row_instruction, "BranchIsolationPolicy: row_instruction",
                               "a sequence of instruction indices or None, one per batch row")
        self.row_instruction = tuple(None if i is None else checks.integer(i, "BranchIsolationPolicy: row_instruction")
                                     for i in rows)
        for r, i in enumerate(self.row_instruction):
            if i is not None and not 0 <= i < len(self.instructions):
                raise ValueError(f"BranchIsolationPolicy: row {r} names instruction {i}, "
                                 f"have {len(self.instructions)}")
        self.until_step = checks.optional_integer(until_step, "BranchIsolationPolicy: until_step", 0)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._masks: Dict[tuple, object] = {}

    def tags_for(self, site: AttentionSite):
        key = _layout_key(site)
        if key not in self._masks:
            ranges = absolute_instruction_ranges(site, self.instructions)
            n, b = site.seq_len, len(self.row_instruction)
            q_tags = torch.ones(b, n, dtype=torch.int64)
            k_tags = torch.ones(b, n, dtype=torch.int64)
            for r, keep in enumerate(self.row_instruction):
                if keep is None:
                    continue
                for i, (a, c) in enumerate(ranges):
                    if i != keep:
                        k_tags[r, a:c] = 0
            self._masks[key] = tag_mask(q_tags.to(self.device), k_tags.to(self.device))
        return self._masks[key]

    def request(self, site):
        if all(i is None for i in self.row_instruction) or not _has_text(site):
            return None
        if self.until_step is not None and site.step is not None and site.step > self.until_step:
            return None
        return AttentionRequest(tags=self.tags_for(site))


# --------------------------------------------------------------------------- capture
class IIDMapPolicy(RunScopedPolicy):
    """Capture IID maps at step S and derive the region masks (IID steps 2-3).

    After the capture step has run: ``per_head_maps`` ``[H, N_img, N]``, ``soft``
    ``[N, N_img]`` and ``masks`` (bool ``[N, N_img]``). ``branch_rows`` (image x image
    sources only) lists the batch rows of the single-instruction branches, in instruction order.

    The maps of several capture calls of one run are averaged (several map layers); a new
    run starts afresh. Call :meth:`reset` between runs (the pipelines do); a step lower than
    the latest one seen also resets, since steps only grow within a run.

    Only the first forward at step S is probed: a later call of a (step, layer) already
    captured in this run is a second forward of the same step (true CFG in diffusers' Flux
    pipelines runs the positive prompt, then the negative one, whose text does not hold the
    instructions), so it is not probed and the first forward's maps stand.
    """

    def __init__(self, instructions: Sequence[Range], grid: Tuple[int, int], config: Optional[IIDConfig] = None,
                 branch_rows: Optional[Sequence[int]] = None):
        self.instructions = _check_instructions(instructions)
        self.grid = _check_grid(grid)
        self.config = checks.config(config, IIDConfig, "IIDMapPolicy: config")
        self.branch_rows = tuple(branch_rows) if branch_rows is not None else None
        self.map_row = self.config.map_row
        if self.config.map_source != "text":
            if self.branch_rows is None or len(self.branch_rows) != len(self.instructions):
                raise ValueError(f"IIDMapPolicy: map_source={self.config.map_source!r} needs branch_rows with one "
                                 f"row per instruction ({len(self.instructions)}), got {branch_rows}")
        self.reset()

    def reset(self) -> None:
        """Forget the previous run's maps and masks."""
        super().reset()
        self._sum: Optional[torch.Tensor] = None
        self._captured: set = set()  # (step, layer) of the calls probed in this run: the maps summed
        self.per_head_maps: Optional[torch.Tensor] = None
        self.soft: Optional[torch.Tensor] = None
        self.masks: Optional[torch.Tensor] = None

    # ---- when
    def is_capture_site(self, site: AttentionSite) -> bool:
        if site.step is None:
            return False
        if site.step != self.config.resolved_map_step(site.num_steps):
            return False
        return site.layer in self.config.map_layers(site.num_layers)

    # ---- what
    def probe_for(self, site: AttentionSite):
        cfg = self.config
        n = site.seq_len
        img0, img1 = site.image
        if img1 - img0 != self.grid[0] * self.grid[1] and cfg.map_source != "image_colmean":
            raise ValueError(f"IIDMapPolicy: image range {site.image} has {img1 - img0} tokens, "
                             f"grid {self.grid} has {self.grid[0] * self.grid[1]}")
        if cfg.map_source == "text":
            keys = TokenGroups.segments(absolute_instruction_ranges(site, self.instructions), n)
            return Probe(TokenGroups.each(img0, img1), keys, heads="keep", normalize="keys")
        k0, k1 = _site_range(site, cfg.image_key_range, "image_key_range")
        if cfg.map_source == "image_colmean":
            if k1 - k0 != self.grid[0] * self.grid[1]:
                raise ValueError(f"IIDMapPolicy: key range {cfg.image_key_range!r}={(k0, k1)} must cover the grid "
                                 f"{self.grid} for map_source='image_colmean'")
            return Probe(TokenGroups.single(img0, img1, n), TokenGroups.each(k0, k1), heads="keep",
                         normalize="queries")
        signal = cfg.propagation_signal
        if signal is None:
            signal = torch.ones(k1 - k0, 1)
        if signal.dim() != 2 or signal.shape[0] != k1 - k0:
            raise ValueError(f"IIDConfig.propagation_signal must have shape [{k1 - k0}, C], got {tuple(signal.shape)}")
        x = torch.zeros(n, signal.shape[1], dtype=torch.float32, device=signal.device)
        x[k0:k1] = signal.float()
        return ValueProbe(x, TokenGroups.each(img0, img1), heads="keep")

    def request(self, site):
        self.follow_step(site.step)
        if self.config.map_source != "text":  # fail at the first call, not at step S
            _site_range(site, self.config.image_key_range, "image_key_range")
        if not self.is_capture_site(site) or (site.step, site.layer) in self._captured:
            return None
        if not _has_text(site) and self.config.map_source == "text":
            raise ValueError(f"IIDMapPolicy: map layer {site.layer} ({site.block_kind} block {site.block}) has no "
                             "text tokens; choose a joint attention layer for map_source='text'")
        return AttentionRequest(probes=(self.probe_for(site),))

    def receive(self, site, result):
        raw = result.probes[0].float()
        batch = raw.shape[0]
        if self.config.map_source == "text":
            rows, what = (self.map_row,), "IIDConfig: map_row"
        else:
            rows, what = tuple(self.branch_rows), "IIDMapPolicy: branch_rows"
        if any(not -batch <= r < batch for r in rows):
            raise ValueError(f"{what} {rows if len(rows) > 1 else rows[0]} must index the batch of {batch} rows of the "
                             f"call at step {site.step}, layer {site.layer}")
        self._captured.add((site.step, site.layer))
        if self.config.map_source == "text":
            maps = raw[self.map_row]  # [H, N_img, N]
        elif self.config.map_source == "image_colmean":
            maps = batch_rows(raw, self.branch_rows)[:, :, 0, :].permute(1, 2, 0)  # [N, H, N_key] -> [H, N_key, N]
        else:
            maps = batch_rows(raw, self.branch_rows).mean(-1).permute(1, 2, 0)  # [N, H, N_img] -> [H, N_img, N]
        self._sum = maps if self._sum is None else self._sum + maps
        self.per_head_maps = self._sum / len(self._captured)
        cfg = self.config
        self.masks, self.soft = iid_masks(self.per_head_maps, self.grid, sigma=cfg.sigma,
                                          kernel_size=cfg.kernel_size, threshold=cfg.threshold,
                                          threshold_value=cfg.threshold_value)
        return None


# --------------------------------------------------------------------------- masked steps
class IIDMaskPolicy(AttentionPolicy):
    """Masked joint attention (IID step 5) from region masks, in every block of the window.

    ``masks``: bool ``[N, N_img]`` (shared by the batch) or ``[B, N, N_img]``. The tags are
    built once per sequence layout as an :func:`iidkern.tag_mask` (so tile lists are built
    once) and reused by every block and step. ``from_step`` / ``until_step``: the window
    (inclusive); ``None`` = unbounded.

    ``masked_rows``: which batch rows hold the instructions and take the masks, one flag a
    row, e.g. ``[False, True]`` for a classifier-free-guidance batch ``[uncond; cond]``, whose
    unconditional row's text holds no instructions (its tokens at the instructions' places
    are not theirs); the other rows attend unmasked. ``None``: every row of whatever batch
    runs. ``forwards``: ``"all"`` masks every forward of a step; ``"first"`` only its first,
    for a guidance that runs the negative prompt as a forward of its own (diffusers' true
    CFG: the positive prompt, then the negative one, each a batch that rows cannot tell
    apart): a call at a (step, layer) already seen in this step belongs to a later forward
    and runs unmasked, as :class:`IIDMapPolicy` probes only a step's first forward. It needs
    the runner's layer numbering (``AttentionSite.num_layers``); calls without a step number
    are always masked.
    """

    def __init__(self, instructions: Sequence[Range], masks: torch.Tensor, config: Optional[IIDConfig] = None,
                 from_step: Optional[int] = None, until_step: Optional[int] = None,
                 masked_rows: Optional[Sequence[bool]] = None, forwards: str = "all"):
        self.instructions = _check_instructions(instructions, masked=True)
        if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool:
            # A soft map cast to bool would be "any value > 0": threshold it first (binarize).
            raise TypeError(f"IIDMaskPolicy: masks must be a bool torch.Tensor, got "
                            f"{getattr(masks, 'dtype', type(masks).__name__)}")
        if masks.dim() not in (2, 3) or masks.shape[-2] != len(self.instructions):
            raise ValueError(f"IIDMaskPolicy: masks must be [N={len(self.instructions)}, N_img] or "
                             f"[B, N, N_img], got {tuple(masks.shape)}")
        self.masks = masks
        self.config = checks.config(config, IIDConfig, "IIDMaskPolicy: config")
        self.from_step = checks.optional_integer(from_step, "IIDMaskPolicy: from_step", 0)
        self.until_step = checks.optional_integer(until_step, "IIDMaskPolicy: until_step", 0)
        self.masked_rows = _check_masked_rows(masked_rows, "IIDMaskPolicy: masked_rows")
        if self.masked_rows is not None and masks.dim() == 3 and masks.shape[0] != len(self.masked_rows):
            raise ValueError(f"IIDMaskPolicy: masks [B, N, N_img] and masked_rows must describe the same rows, "
                             f"got B={masks.shape[0]} and {len(self.masked_rows)} flags")
        self.forwards = checks.choice(forwards, FORWARDS, "IIDMaskPolicy: forwards")
        self._tags: Dict[tuple, object] = {}
        self.reset()

    def reset(self) -> None:
        """Forget which layers the current step has run (``forwards="first"``); a new step
        forgets by itself, so only runs that repeat the step they stopped at need this."""
        self._step: Optional[int] = None
        self._layers_seen: set = set()

    def is_later_forward(self, site: AttentionSite) -> bool:
        """``forwards="first"``: whether this call repeats a layer this step has already run."""
        if self.forwards == "all" or site.step is None:
            return False
        if site.num_layers <= 0:
            raise ValueError("IIDMaskPolicy: forwards='first' needs AttentionSite.num_layers and layer "
                             "(the runner must number its attention calls)")
        if site.step != self._step:
            self._step, self._layers_seen = site.step, set()
        if site.layer in self._layers_seen:
            return True
        self._layers_seen.add(site.layer)
        return False

    def tags_for(self, site: AttentionSite):
        key = _layout_key(site)
        if key not in self._tags:
            q_tags, k_tags = instruction_tags(
                site.seq_len, image=site.image, instructions=absolute_instruction_ranges(site, self.instructions),
                region_masks=self.masks, background=self.config.background,
                always_visible=self.visible_ranges(site))
            if self.masked_rows is not None:
                # Every bit set: an unmasked row's tokens meet every token of that row.
                free = ~torch.tensor(self.masked_rows, device=q_tags.device)[:, None]
                rows = len(self.masked_rows)
                q_tags = torch.where(free, -1, q_tags.expand(rows, -1))
                k_tags = torch.where(free, -1, k_tags.expand(rows, -1))
            elif self.masks.dim() == 2:  # shared by every row of whatever batch runs
                q_tags, k_tags = q_tags[0], k_tags[0]
            self._tags[key] = tag_mask(q_tags, k_tags)
        return self._tags[key]

    def visible_ranges(self, site: AttentionSite) -> List[Range]:
        """Ranges every token sees and that see every token: conditioning extras (+ shared text)."""
        ranges = _visible(site, self.config.visible_ranges)
        if self.config.shared_text == "visible":
            ranges += shared_text_ranges(site, self.instructions)
        return ranges

    def in_window(self, step: Optional[int]) -> bool:
        if step is None:
            return self.from_step is None
        return (self.from_step is None or step >= self.from_step) and \
            (self.until_step is None or step <= self.until_step)

    def request(self, site):
        if not self.in_window(site.step) or not _has_text(site):
            return None  # image-only attention (SD3.5's attn2): image sees all image, nothing to mask
        if self.masked_rows is not None and not any(self.masked_rows):
            return None
        if self.is_later_forward(site):
            return None
        return AttentionRequest(tags=self.tags_for(site))


# --------------------------------------------------------------------------- the sequence
class IIDPolicy(RunScopedPolicy):
    """IID's attention side over a whole run: isolation + capture up to S, masks after S.

    ``row_instruction``: per batch row of the steps up to S, the instruction of its
    single-instruction branch or ``None`` (combined branch); ``None`` altogether = one
    combined row only; in a CFG batch that repeats the rows ([uncond; cond]) the last row
    of each instruction is its branch, as the last combined row gives the text maps.
    ``masked_rows``: the batch rows of the steps after S that take the masks (one bool a
    row; ``[False, True]`` for ``[uncond; cond]``), :class:`IIDMaskPolicy`'s argument;
    ``None`` masks every row. ``forwards``: ``"first"`` masks only a step's first forward
    (true CFG's negative prompt runs second), :class:`IIDMaskPolicy`'s argument.
    ``masks`` (or :meth:`set_masks` later): precomputed masks, which skip the capture, stay
    across runs and mask every call after S, and every call without a step number. After
    the capture, ``masks`` / ``soft`` / ``per_head_maps`` hold the result.

    One policy serves one run at a time: :meth:`reset` (the pipelines call it at the start
    of each run) forgets the captured maps and masks, keeping precomputed masks. A step
    lower than the latest one seen (e.g. step 0 after step T-1) means a new run began and
    resets too, so a reused policy never mixes two runs' maps; only a caller who restarts
    at the very step it stopped at (one-step runs) must call :meth:`reset` itself.
    """

    def __init__(self, instructions: Sequence[Range], grid: Tuple[int, int], config: Optional[IIDConfig] = None,
                 row_instruction: Optional[Sequence[Optional[int]]] = None, masks: Optional[torch.Tensor] = None,
                 device=None, masked_rows: Optional[Sequence[bool]] = None, forwards: str = "all"):
        self.instructions = _check_instructions(instructions, masked=True)
        self.grid = _check_grid(grid)
        self.config = checks.config(config, IIDConfig, "IIDPolicy: config")
        self.masked_rows = _check_masked_rows(masked_rows, "IIDPolicy: masked_rows")
        self.forwards = checks.choice(forwards, FORWARDS, "IIDPolicy: forwards")
        rows = checks.sequence(row_instruction, "IIDPolicy: row_instruction",
                               "None or a sequence of instruction indices or None, one per batch row") \
            if row_instruction is not None else (None,)
        # The last row of each instruction (the conditional half of a [uncond; cond] batch).
        branch_rows = [len(rows) - 1 - rows[::-1].index(i) for i in range(len(self.instructions))] if \
            all(i in rows for i in range(len(self.instructions))) else None
        self.isolation = BranchIsolationPolicy(self.instructions, rows, device=device)
        self.capture = IIDMapPolicy(self.instructions, grid, self.config, branch_rows=branch_rows)
        # Text maps come from the (last) combined row. Without row_instruction the rows are not
        # described (a CFG batch [uncond; cond] has two): map_row stays -1, the last (cond) row.
        if row_instruction is not None and None in rows and self.config.map_row == -1:
            self.capture.map_row = len(rows) - 1 - rows[::-1].index(None)
        self.mask_policy: Optional[IIDMaskPolicy] = None
        self._early = ChainPolicy(self.isolation, self.capture)
        self._precomputed = masks is not None
        self._last = "none"
        if masks is not None:
            self.set_masks(masks)

    def reset(self) -> None:
        """Start a new run: drop the captured maps and the masks made from them (precomputed masks stay)."""
        self.capture.reset()
        super().reset()
        if not self._precomputed:
            self.mask_policy = None
        elif self.mask_policy is not None:
            self.mask_policy.reset()  # precomputed masks stay; which layers a step has run does not
        self._last = "none"

    @property
    def masks(self) -> Optional[torch.Tensor]:
        return self.mask_policy.masks if self.mask_policy is not None else self.capture.masks

    @property
    def soft(self):
        return self.capture.soft

    @property
    def per_head_maps(self):
        return self.capture.per_head_maps

    def set_masks(self, masks: torch.Tensor) -> None:
        """Use precomputed masks from now on (as if given to the constructor): no capture,
        kept by :meth:`reset`."""
        self._precomputed = True
        self._use_masks(masks)

    def _use_masks(self, masks: torch.Tensor) -> None:
        n_grid = self.grid[0] * self.grid[1]
        if isinstance(masks, torch.Tensor) and masks.dim() in (2, 3) and masks.shape[-1] != n_grid:
            # as the captured masks are: one column per token of the latent grid
            raise ValueError(f"IIDPolicy: masks must have grid {self.grid} = {n_grid} columns "
                             f"([N, {n_grid}] or [B, N, {n_grid}]), got {tuple(masks.shape)}")
        self.mask_policy = IIDMaskPolicy(self.instructions, masks, self.config, until_step=self.config.mask_until,
                                         masked_rows=self.masked_rows, forwards=self.forwards)

    def _phase(self, site) -> str:
        if site.step is None:  # no step to place the call: precomputed masks still apply
            return "late" if self._precomputed else "none"
        self.follow_step(site.step)
        s = self.config.resolved_map_step(site.num_steps)
        if site.step <= s:
            return "early"
        if self.mask_policy is None:
            if self.capture.masks is None:
                raise RuntimeError(f"IIDPolicy: step {site.step} > S={s} but no masks were captured at step S: "
                                   f"step S did not run in this run (a sampler skipping it; set "
                                   f"IIDConfig.map_step to a step it runs), or map layer {self.config.map_layer} "
                                   f"did not (site.num_layers={site.num_layers})")
            _warn_if_empty(self.capture.masks, s)
            self._use_masks(self.capture.masks)
        return "late"

    def request(self, site):
        phase = self._phase(site)
        self._last = phase
        if phase == "early":
            return self.isolation.request(site) if self._precomputed else self._early.request(site)
        if phase == "late":
            return self.mask_policy.request(site)
        return None

    def receive(self, site, result):
        if self._last == "early" and not self._precomputed:
            return self._early.receive(site, result)
        return None
