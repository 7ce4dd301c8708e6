"""Run diffusers' MM-DiTs (Flux, SD3 / SD3.5, QwenImage) with iidkern attention and policies.

diffusers' ``set_attention_backend`` accepts only names of its own backend enum, so iidkern
plugs in the supported way: attention processors installed with ``model.set_attn_processor``.
They compute q, k, v exactly as the stock processors, keep the ``[B, N, H, D]`` layout and
send every joint attention through :func:`iidkern.policy.attend`, where an
:class:`~iidkern.policy.AttentionPolicy` may ask for probes, token tags, head weights, a
block multiplier or pair statistics, per call and per block.

Usage::

    from iidkern.integrations.diffusers import use_iidkern
    from iidkern.policy import CapturePolicy
    from iidkern.specs import Probe, TokenGroups

    image_x_text = lambda s: [Probe(TokenGroups.each(*s.image), TokenGroups.each(*s.text), heads="keep")]
    policy = CapturePolicy(when=lambda s: s.step == 20 and s.layer == s.num_layers - 2, probes=image_x_text)
    with use_iidkern(pipe.transformer, policy=policy, backend="auto") as handle:
        handle.set_step(0, 28)                       # the step the first model call belongs to
        image = pipe(prompt, num_inference_steps=28, callback_on_step_end=handle.callback_on_step_end).images[0]
    maps = policy.captured[(20, handle.num_layers - 2)][0]   # [B, H, N_img, N_text]

API
---
``use_iidkern(model, policy=None, backend="auto") -> IidkernHandle``
    Replaces the stock processor of every attention module of ``model``
    (``FluxTransformer2DModel``, ``SD3Transformer2DModel``, ``QwenImageTransformer2DModel``,
    or any model whose attention modules use their stock processors:
    ``FluxAttnProcessor`` (fused QKV projections included), ``JointAttnProcessor2_0``,
    ``QwenDoubleStreamAttnProcessor2_0``; SD3's ``FusedJointAttnProcessor2_0`` drops the QK
    norms, so unfuse first). Any other processor (IP-adapter, custom, an
    iidkern processor already installed) raises a ``ValueError`` naming it: iidkern would
    otherwise silently drop its behaviour. A Flux-like model whose single blocks take no
    ``encoder_hidden_states`` (Chroma) runs without a policy; with one, its single-block
    calls need ``iidkern_text_tokens`` in the attention kwargs, and its padding masks are
    not supported (a ValueError says so). While installed, the
    model cannot be deep-copied (the copy's hooks would feed these processors): a TypeError
    says so. ``model`` may be a ``torch.compile`` wrapper (the
    hooks go on the model inside it). Under ``torch.autocast`` q, k and v run in the
    autocast dtype, as the stock processors' SDPA does.
``IidkernHandle``
    * ``policy`` / ``backend`` (settable), ``set_step(step, num_steps=None)``, ``step``,
      ``num_steps``; ``callback_on_step_end`` (pass to a pipeline: advances the step after
      each denoising step, reading ``pipe.num_timesteps``, and back to 0 after a run's last
      step, so one handle serves pipeline call after pipeline call; a run stopped early
      needs ``set_step(0, ...)`` again);
    * ``layers``: one :class:`LayerInfo` (name, block_kind, block, layer, num_layers) per
      attention call, in call order; ``num_layers``; ``processors`` (name -> processor);
    * ``remove()`` (idempotent) or ``with`` block: restores the original processors and
      removes iidkern's hooks.

Sites (:class:`~iidkern.policy.AttentionSite` handed to the policy)
-------------------------------------------------------------------
* Flux: kinds ``"double"`` (``transformer_blocks.i``) and ``"single"``
  (``single_transformer_blocks.j``), sequence ``[text; image]``. Single blocks learn their
  text length from a forward pre-hook on their own ``FluxSingleTransformerBlock`` (its
  ``encoder_hidden_states``), see :class:`FluxIidkernProcessor`. Kontext: trailing
  image-stream tokens whose ``img_ids[:, 0] != 0`` (diffusers marks the source image so)
  are ``site.extra == (("source", range),)`` and are left out of ``site.image``.
* SD3 / SD3.5: kind ``"joint"`` (``attn``, sequence ``[image; text]``) and ``"image"``
  (SD3.5 dual attention ``attn2``, image only, ``text == (0, 0)``).
* QwenImage: kind ``"double"``, sequence ``[text; image]``; ``encoder_hidden_states_mask``
  becomes key tags (AND-ed with a policy's tags); QwenImage-Edit condition images
  (``img_shapes`` after the first) are the ``"source"`` extra range.
* ``site.layer`` is the call's index in one forward (``handle.layers`` order), ``block`` the
  index within its kind.

Step: ``site.step`` / ``site.num_steps`` come from ``handle.set_step`` unless the forward
passes ``iidkern_step`` / ``iidkern_num_steps`` in its attention kwargs (``joint_attention_kwargs``
for Flux and SD3, ``attention_kwargs`` for QwenImage; all three forward them to every
attention processor, which receives the keys it declares), which win for that forward.
"""
from __future__ import annotations

import importlib
import inspect
import math
import re
from typing import Dict, List, Optional, Tuple

import torch

from ..attention import BACKENDS
from ..policy import AttentionPolicy, check_steps
from .diffusers_processors import (FluxIidkernProcessor, IidkernProcessor, LayerInfo, QwenImageIidkernProcessor,
                                   SD3IidkernProcessor, Session)

__all__ = ["use_iidkern", "IidkernHandle", "LayerInfo", "FluxIidkernProcessor", "SD3IidkernProcessor",
           "QwenImageIidkernProcessor"]

# (module, stock processor class name) -> the iidkern processor that replaces it. Classes a
# diffusers release lacks are skipped. SD3's FusedJointAttnProcessor2_0 is left out on purpose:
# it skips the QK norms (and cannot serve attn2), so no faithful replacement exists.
_REPLACEMENTS = (
    ("diffusers.models.transformers.transformer_flux", "FluxAttnProcessor", FluxIidkernProcessor),
    ("diffusers.models.attention_processor", "JointAttnProcessor2_0", SD3IidkernProcessor),
    ("diffusers.models.transformers.transformer_qwenimage", "QwenDoubleStreamAttnProcessor2_0",
     QwenImageIidkernProcessor),
)

# "<...>.<blocks>.<index>.<attn|attn2>.processor": the block index is the number before the attention.
_NAME = re.compile(r"(?:^|\.)(?P<group>\w+)\.(?P<block>\d+)\.(?P<attn>attn2?)\.processor$")


def _stock_classes() -> Dict[type, type]:
    table = {}
    for module_name, class_name, replacement in _REPLACEMENTS:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue
        table[cls] = replacement
    return table


def _block_kind(replacement: type, attn_module, attn_name: str) -> str:
    if replacement is FluxIidkernProcessor:
        return "double" if attn_module.added_kv_proj_dim is not None else "single"
    if replacement is SD3IidkernProcessor:
        return "joint" if getattr(attn_module, "add_q_proj", None) is not None else "image"
    return "double"


def _plan(model) -> List[Tuple[LayerInfo, type]]:
    """Match every attention module of ``model`` to an iidkern processor (or explain why not)."""
    stock = _stock_classes()
    processors = model.attn_processors
    plan, problems = [], []
    for layer, (key, processor) in enumerate(processors.items()):
        if isinstance(processor, IidkernProcessor):
            raise ValueError("use_iidkern: iidkern processors are already installed on this model; "
                             "call remove() on the existing handle first")
        replacement = stock.get(type(processor))
        match = _NAME.search(key)
        if replacement is None or match is None:
            problems.append(f"{key} ({type(processor).__name__})")
            continue
        attn_name = key[: -len(".processor")]
        kind = _block_kind(replacement, model.get_submodule(attn_name), match["attn"])
        plan.append((LayerInfo(name=attn_name, block_kind=kind, block=int(match["block"]), layer=layer,
                               num_layers=len(processors)), replacement))
    if problems:
        supported = sorted(cls.__name__ for cls in stock)
        raise ValueError(f"use_iidkern: no iidkern processor for {', '.join(problems)}; supported stock processors "
                         f"(under '<blocks>.<i>.attn[2]'): {supported}")
    if not plan:
        raise ValueError(f"use_iidkern: {type(model).__name__} has no attention processors to replace")
    return plan


def _check_policy(policy):
    if isinstance(policy, type):  # the class itself: its request() would want a self at the first call
        raise TypeError(f"policy must be an instance of an AttentionPolicy, got the class {policy.__name__} "
                        f"(call it: {policy.__name__}(...))")
    if policy is not None and not (callable(getattr(policy, "request", None))
                                   and callable(getattr(policy, "receive", None))):
        raise TypeError(f"policy must be an iidkern.policy.AttentionPolicy (request/receive) or None, "
                        f"got {type(policy).__name__}")
    return policy


def _check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


# --------------------------------------------------------------------------- hooks
def _argument_reader(fn, name: str):
    """A reader of argument ``name`` from a call's ``(args, kwargs)``, positional or keyword."""
    params = list(inspect.signature(fn).parameters)
    position = params.index(name) if name in params else None

    def read(args, kwargs):
        if name in kwargs:
            return kwargs[name]
        if position is not None and position < len(args):
            return args[position]
        return None
    return read


def _text_length_hook(processor: FluxIidkernProcessor, block):
    """Pre-hook of a Flux single block: its attention learns the text length of this very call
    (a block without ``encoder_hidden_states``, as Chroma's, leaves it unknown: see the processor)."""
    read = _argument_reader(block.forward, "encoder_hidden_states")

    def hook(module, args, kwargs):
        text = read(args, kwargs)
        processor.text_tokens = text.shape[1] if isinstance(text, torch.Tensor) else None
    return block.register_forward_pre_hook(hook, with_kwargs=True)


def _flux_source_tokens(img_ids) -> int:
    """Trailing image-stream tokens marked as a Kontext source (``img_ids[:, 0] != 0``)."""
    if not isinstance(img_ids, torch.Tensor) or img_ids.dim() not in (2, 3) or img_ids.shape[-2] == 0:
        return 0
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    trailing = int((ids[:, 0] != 0).flip(0).int().cumprod(0).sum())
    return trailing if trailing < ids.shape[0] else 0  # all marked: nothing to tell apart


def _qwen_source_tokens(img_shapes) -> int:
    """Tokens of QwenImage-Edit condition images: every shape after the first of a sample."""
    if not isinstance(img_shapes, (list, tuple)) or not img_shapes:
        return 0
    shapes = img_shapes[0]
    if not isinstance(shapes, (list, tuple)) or not shapes or not isinstance(shapes[0], (list, tuple)):
        return 0  # one (frames, h, w) per sample: no condition image
    return sum(math.prod(s) for s in shapes[1:])


def _source_hooks(model, session: Session) -> list:
    """Pre/post forward hooks that tell the processors how many source tokens this forward has."""
    params = inspect.signature(model.forward).parameters
    if "img_ids" in params:
        name, count = "img_ids", _flux_source_tokens
    elif "img_shapes" in params:
        name, count = "img_shapes", _qwen_source_tokens
    else:
        return []
    read = _argument_reader(model.forward, name)

    def before(module, args, kwargs):
        value = read(args, kwargs)
        session.announce_source(lambda: count(value))

    def after(module, args, kwargs, output):
        session.announce_source(None)

    return [model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(after, with_kwargs=True, always_call=True)]


# --------------------------------------------------------------------------- public API
class IidkernHandle:
    """What :func:`use_iidkern` returns: the state of the installation, and its undo."""

    def __init__(self, model, session: Session, processors: Dict[str, IidkernProcessor], originals: dict, hooks):
        self.model = model
        self._session = session
        self.processors = processors  # attention module name -> iidkern processor
        self._originals = originals  # attn_processors key -> the processor it had
        self._hooks = hooks
        self.layers: Tuple[LayerInfo, ...] = tuple(p.layer for p in processors.values())

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def active(self) -> bool:
        return self._originals is not None

    @property
    def policy(self) -> Optional[AttentionPolicy]:
        return self._session.policy

    @policy.setter
    def policy(self, policy: Optional[AttentionPolicy]):
        self._session.policy = _check_policy(policy)

    @property
    def backend(self) -> str:
        return self._session.backend

    @backend.setter
    def backend(self, backend: str):
        self._session.backend = _check_backend(backend)

    @property
    def step(self) -> Optional[int]:
        return self._session.step

    @property
    def num_steps(self) -> Optional[int]:
        return self._session.num_steps

    def set_step(self, step: Optional[int], num_steps: Optional[int] = None) -> None:
        """The denoising step of the following model calls (``None`` outside a sampler)."""
        self._session.step, self._session.num_steps = check_steps(step, num_steps)

    def callback_on_step_end(self, pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
        """A diffusers ``callback_on_step_end``: the next model call belongs to step ``step + 1``,
        or, after a run's last step, to step 0 of the next run (a handle serves one pipeline
        call after another; a policy with per-run state sees the steps go back and resets).

        Call ``set_step(0, num_steps)`` before the first pipeline call (its first model call
        precedes any callback), and again after a run that stopped early (an error, an
        interrupt, a callback that ended it): it left the handle mid-run. The next run's count
        of steps is known only at its first callback: until then ``num_steps`` is the previous run's.
        """
        num_steps = getattr(pipeline, "num_timesteps", None) or self._session.num_steps
        if num_steps is None or step + 1 < num_steps:
            self.set_step(step + 1, num_steps)
        else:
            self.set_step(0, num_steps)
        return {}

    def remove(self) -> None:
        """Restore the original processors and remove iidkern's hooks (idempotent)."""
        if self._originals is None:
            return
        for hook in self._hooks:
            hook.remove()
        # set_attn_processor pops from the dict it is given: hand it a copy.
        self.model.set_attn_processor(dict(self._originals))
        self._originals, self._hooks = None, []

    def __enter__(self) -> "IidkernHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self):
        state = "active" if self.active else "removed"
        return (f"IidkernHandle({type(self.model).__name__}, {self.num_layers} attention layers, "
                f"backend={self.backend!r}, {state})")


def use_iidkern(model, policy: Optional[AttentionPolicy] = None, backend: str = "auto") -> IidkernHandle:
    """Route every attention of a diffusers MM-DiT through iidkern (see the module docstring)."""
    if not (hasattr(model, "attn_processors") and hasattr(model, "set_attn_processor")):
        raise TypeError(f"model must be a diffusers model with attention processors (attn_processors / "
                        f"set_attn_processor), got {type(model).__name__}")
    session = Session(policy=_check_policy(policy), backend=_check_backend(backend))
    # torch.compile(model) wraps it in a module whose forward takes (*args, **kwargs): the
    # hooks that read the forward's arguments (img_ids, img_shapes) go on the model inside.
    given, model = model, getattr(model, "_orig_mod", model)
    plan = _plan(model)
    originals = dict(model.attn_processors)
    processors = {info.name: replacement(session, info) for info, replacement in plan}
    hooks = []
    try:
        for name, processor in processors.items():
            if processor.layer.block_kind == "single" and isinstance(processor, FluxIidkernProcessor):
                hooks.append(_text_length_hook(processor, model.get_submodule(name.rsplit(".", 1)[0])))
        hooks += _source_hooks(model, session)
        model.set_attn_processor({f"{name}.processor": p for name, p in processors.items()})
    except Exception:
        for hook in hooks:
            hook.remove()
        raise
    return IidkernHandle(given, session, processors, originals, hooks)
