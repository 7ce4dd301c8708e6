"""iidkern attention processors for diffusers' MM-DiTs (Flux, SD3 / SD3.5, QwenImage).

Each processor computes q, k and v exactly as the stock diffusers processor it replaces
(projections, QK norms, RoPE, added text projections, concatenation order), keeps diffusers'
``[B, N, H, D]`` layout and hands the joint attention to :func:`iidkern.policy.attend` with
an :class:`~iidkern.policy.AttentionSite` describing the call. Everything after the
attention (split of the streams, output projections) is again the stock code.

One processor instance serves one attention module: it knows its block, block kind and
layer index from installation (:func:`iidkern.integrations.diffusers.use_iidkern`), and
reads the policy, backend, denoising step and per-forward facts (Kontext / edit source
tokens) from a :class:`Session` shared by all processors of one model.

Sequence layouts (never assumed by policies: they read ``site.text`` / ``site.image``):

* Flux (double and single blocks) and QwenImage: ``[text; image(; source)]``;
* SD3 joint attention (``JointAttnProcessor2_0``): ``[image; text]``;
* SD3.5 dual attention (``attn2``): image only, ``site.text == (0, 0)``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ..kernels.tiles import TagMask
from ..policy import AttentionPolicy, AttentionRequest, AttentionSite, attend, check_steps
from ..specs import ALL_BITS

STEP_KWARGS = ("iidkern_step", "iidkern_num_steps")


@dataclass
class Session:
    """State shared by the processors of one installation (owned by the handle).

    ``step`` / ``num_steps`` are set by the user (``handle.set_step``). The number of
    source tokens (the trailing image-stream tokens that are a conditioning image: Flux
    Kontext, QwenImage-Edit) is announced per forward by a model pre-hook as a function, and
    evaluated only when a site is built: reading ``img_ids`` may synchronize the device, and
    nobody should pay for that when no policy listens.
    """

    policy: Optional[AttentionPolicy]
    backend: str
    step: Optional[int] = None
    num_steps: Optional[int] = None
    _count_source: Optional[Callable[[], int]] = None
    _source: Optional[int] = None

    def announce_source(self, count: Optional[Callable[[], int]]) -> None:
        """Called before (with a counter) and after (with None) each model forward."""
        self._count_source, self._source = count, None

    @property
    def source_tokens(self) -> int:
        if self._source is None:
            self._source = self._count_source() if self._count_source is not None else 0
        return self._source


@dataclass(frozen=True)
class LayerInfo:
    """Where one attention module sits: its name, block kind, block and layer index."""

    name: str  # module path, e.g. "single_transformer_blocks.3.attn"
    block_kind: str  # "double" / "single" (Flux, QwenImage), "joint" / "image" (SD3)
    block: int  # index of the block within its kind (SD3.5 attn2: the index of its joint block)
    layer: int  # index of this attention call among all calls of one forward
    num_layers: int  # attention calls per forward


class _KeyPadding(AttentionPolicy):
    """Adds a text padding mask (as key tags) to whatever the wrapped policy asks for.

    QwenImage masks padded text keys; iidkern expresses masks as tags, so a padded key gets
    no bits and every query carries all bits. A policy's own tags are AND-ed with it.
    """

    def __init__(self, inner: Optional[AttentionPolicy], key_tags: torch.Tensor):
        self.inner = inner
        self.key_tags = key_tags  # [B, N] int64: ALL_BITS for visible keys, 0 for padding
        self._inner_asked = False
        self._inner_keeps_inputs = False

    def request(self, site):
        request = self.inner.request(site) if self.inner is not None else None
        self._inner_asked = request is not None
        self._inner_keeps_inputs = request is not None and request.keep_inputs
        if request is None:
            request = AttentionRequest()
        if request.tags is None:
            q_tags = torch.full((self.key_tags.shape[-1],), ALL_BITS, dtype=torch.int64, device=self.key_tags.device)
            tags = (q_tags, self.key_tags)
        else:
            q_tags, k_tags = (request.tags.q_tags, request.tags.k_tags) if isinstance(request.tags, TagMask) \
                else request.tags
            tags = (q_tags, k_tags & self.key_tags.to(k_tags.dtype))
        return dataclasses.replace(request, tags=tags)

    def receive(self, site, result, inputs=None):
        if not self._inner_asked:
            return None
        # The inputs' request carries the padding tags: a second call made from them masks alike.
        return self.inner.receive(site, result, inputs=inputs) if self._inner_keeps_inputs else \
            self.inner.receive(site, result)


class IidkernProcessor:
    """Base: builds the site of a call and sends q, k, v through the policy door."""

    def __init__(self, session: Session, layer: LayerInfo):
        self.session = session
        self.layer = layer

    def __repr__(self):
        return f"{type(self).__name__}({self.layer.name}, kind={self.layer.block_kind!r}, block={self.layer.block})"

    def __deepcopy__(self, memo):
        # A copied model would keep hooks that feed this installation's processors (text
        # lengths, source ranges) and a handle that cannot restore it: wrong sites, silently.
        raise TypeError(f"cannot deepcopy a model with iidkern processors installed ({self.layer.name}): its hooks "
                        f"would still feed the original's processors; copy the model before use_iidkern, or "
                        f"handle.remove(), copy, then use_iidkern on each model")

    def _site(self, text: Tuple[int, int], image_stream: Tuple[int, int], step, num_steps,
              with_source: bool) -> AttentionSite:
        """``image_stream``: the image-stream range; its last ``session.source_tokens`` are the source."""
        start, stop = image_stream
        source = self.session.source_tokens if with_source else 0
        if not 0 <= source <= stop - start:
            raise ValueError(f"{self.layer.name}: {source} source tokens do not fit the {stop - start} image-stream "
                             "tokens of this call (was the model called with other inputs than its forward saw?)")
        extra = (("source", (stop - source, stop)),) if source else ()
        if step is not None or num_steps is not None:  # per-call values (iidkern_step ...) pass set_step's checks
            step, num_steps = check_steps(self.session.step if step is None else step,
                                          self.session.num_steps if num_steps is None else num_steps)
        else:
            step, num_steps = self.session.step, self.session.num_steps
        return AttentionSite(
            block=self.layer.block, block_kind=self.layer.block_kind, text=text, image=(start, stop - source),
            step=step, num_steps=num_steps, layer=self.layer.layer, num_layers=self.layer.num_layers, extra=extra)

    def _attend(self, q, k, v, site_fn, key_tags: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``site_fn()`` builds the site only when someone listens (a policy or a padding mask)."""
        if torch.is_autocast_enabled(q.device.type):
            # One dtype, the autocast one, as SDPA gets under autocast: a QK norm with float32
            # weights hands back float32 q and k beside an autocast linear's 16-bit v.
            dtype = torch.get_autocast_dtype(q.device.type)
            q, k, v = (t.to(dtype) for t in (q, k, v))
        policy = self.session.policy
        if key_tags is not None:
            policy = _KeyPadding(policy, key_tags)
        site = site_fn() if policy is not None else None
        return attend(q, k, v, site, policy, layout="bnhd", backend=self.session.backend)


# --------------------------------------------------------------------------- Flux
def _flux_projections(attn, hidden_states, encoder_hidden_states):
    """q, k, v (and the text stream's) as diffusers' Flux processor computes them."""
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        text = None
        if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
            text = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        return query, key, value, text
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    text = None
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        text = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                attn.add_v_proj(encoder_hidden_states))
    return query, key, value, text


class FluxIidkernProcessor(IidkernProcessor):
    """Replaces ``FluxAttnProcessor`` in double (``"double"``) and single (``"single"``) blocks.

    Sequence ``[text; image(; Kontext source)]``. A double block reads the text length from
    ``encoder_hidden_states``. A single block receives text and image already concatenated,
    so its length is learned from the enclosing ``FluxSingleTransformerBlock``: a forward
    pre-hook (installed by ``use_iidkern``) stores ``encoder_hidden_states.shape[1]`` of the
    block's own call in :attr:`text_tokens` just before the block runs its attention. This is
    local to the block (no reliance on the double blocks having run, on call order, or on
    the user passing ``txt_ids``), and works under gradient checkpointing. Calling a single
    block's ``attn`` directly, outside its block, needs ``iidkern_text_tokens=N`` in the
    call's kwargs.
    """

    def __init__(self, session: Session, layer: LayerInfo):
        super().__init__(session, layer)
        self.text_tokens: Optional[int] = None  # single blocks: set by the block pre-hook, used once

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, image_rotary_emb=None,
                 iidkern_step: Optional[int] = None, iidkern_num_steps: Optional[int] = None,
                 iidkern_text_tokens: Optional[int] = None):
        if attention_mask is not None:
            raise ValueError(f"{self.layer.name}: FluxIidkernProcessor does not take an attention_mask (iidkern "
                             "masks are token tags requested by a policy); got a tensor of shape "
                             f"{tuple(attention_mask.shape)}")
        query, key, value, text = _flux_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            text_query, text_key, text_value = (t.unflatten(-1, (-1, attn.head_dim)) for t in text)
            text_query, text_key = attn.norm_added_q(text_query), attn.norm_added_k(text_key)
            query = torch.cat([text_query, query], dim=1)
            key = torch.cat([text_key, key], dim=1)
            value = torch.cat([text_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        num_text = self._num_text(encoder_hidden_states, iidkern_text_tokens, query.shape[1])
        length = query.shape[1]
        out = self._attend(query, key, value, lambda: self._site(
            (0, num_text), (num_text, length), iidkern_step, iidkern_num_steps, with_source=True))
        hidden_states = out.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return hidden_states
        num_ctx = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [num_ctx, hidden_states.shape[1] - num_ctx], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states

    def _num_text(self, encoder_hidden_states, explicit: Optional[int], length: int) -> int:
        learned, self.text_tokens = self.text_tokens, None  # one use: never a stale length
        if encoder_hidden_states is not None:
            return encoder_hidden_states.shape[1]
        num = explicit if explicit is not None else learned
        if num is None:
            if self.session.policy is None:
                return 0  # nobody reads the site
            raise ValueError(
                f"{self.layer.name}: the text length of this single-stream call is unknown. Call the attention "
                "through a FluxSingleTransformerBlock (whose encoder_hidden_states tell it; Chroma's blocks take "
                "none), or pass iidkern_text_tokens=<number of text tokens> with the call (e.g. in "
                "joint_attention_kwargs)")
        if isinstance(num, bool) or not isinstance(num, int) or not 0 <= num <= length:
            raise ValueError(f"{self.layer.name}: text length must be an int in [0, {length}], got {num!r}")
        return num


# --------------------------------------------------------------------------- SD3 / SD3.5
class SD3IidkernProcessor(IidkernProcessor):
    """Replaces ``JointAttnProcessor2_0`` in SD3 / SD3.5 ``JointTransformerBlock``.

    ``attn`` (kind ``"joint"``): sequence ``[image; text]`` as in diffusers. ``attn2`` of
    SD3.5's dual-attention blocks (kind ``"image"``): image tokens only, ``text == (0, 0)``.
    Like the stock processor it ignores ``attention_mask``.
    """

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, iidkern_step: Optional[int] = None,
                 iidkern_num_steps: Optional[int] = None):
        batch, num_image = hidden_states.shape[:2]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        num_text = 0
        if encoder_hidden_states is not None:
            num_text = encoder_hidden_states.shape[1]
            text_query, text_key, text_value = (
                proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim)
                for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query = torch.cat([query, text_query], dim=1)
            key = torch.cat([key, text_key], dim=1)
            value = torch.cat([value, text_value], dim=1)

        text_range = (num_image, num_image + num_text) if num_text else (0, 0)
        out = self._attend(query, key, value, lambda: self._site(
            text_range, (0, num_image), iidkern_step, iidkern_num_steps, with_source=False))
        hidden_states = out.reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :num_image], hidden_states[:, num_image:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


# --------------------------------------------------------------------------- QwenImage
class QwenImageIidkernProcessor(IidkernProcessor):
    """Replaces ``QwenDoubleStreamAttnProcessor2_0`` (kind ``"double"``, sequence ``[text; image(; source)]``).

    ``encoder_hidden_states_mask`` (text padding) becomes key tags, AND-ed with a policy's
    own tags. QwenImage-Edit's condition-image tokens (``img_shapes`` beyond the first
    shape) appear as ``site.extra == (("source", range),)``.
    """

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 encoder_hidden_states_mask: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, image_rotary_emb=None,
                 iidkern_step: Optional[int] = None, iidkern_num_steps: Optional[int] = None):
        if encoder_hidden_states is None:
            raise ValueError(f"{self.layer.name}: QwenImageIidkernProcessor requires encoder_hidden_states "
                             "(the text stream)")
        if attention_mask is not None:
            raise ValueError(f"{self.layer.name}: QwenImageIidkernProcessor does not take an attention_mask; pass "
                             "encoder_hidden_states_mask (text padding) as the stock processor expects")
        # Imported here: QwenImage exists only in newer diffusers releases.
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        head_dim = attn.inner_dim // attn.heads
        image_qkv = [proj(hidden_states).unflatten(-1, (-1, head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v)]
        text_qkv = [proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
                    for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
        for qkv, norm_q, norm_k in ((image_qkv, attn.norm_q, attn.norm_k),
                                    (text_qkv, attn.norm_added_q, attn.norm_added_k)):
            if norm_q is not None:
                qkv[0] = norm_q(qkv[0])
            if norm_k is not None:
                qkv[1] = norm_k(qkv[1])
        if image_rotary_emb is not None:
            image_freqs, text_freqs = image_rotary_emb
            for qkv, freqs in ((image_qkv, image_freqs), (text_qkv, text_freqs)):
                qkv[0] = apply_rotary_emb_qwen(qkv[0], freqs, use_real=False)
                qkv[1] = apply_rotary_emb_qwen(qkv[1], freqs, use_real=False)
        query, key, value = (torch.cat([t, i], dim=1) for t, i in zip(text_qkv, image_qkv))

        num_text, length = encoder_hidden_states.shape[1], query.shape[1]
        key_tags = None
        if encoder_hidden_states_mask is not None:
            visible = torch.ones(query.shape[0], length, dtype=torch.bool, device=query.device)
            visible[:, :num_text] = encoder_hidden_states_mask.to(torch.bool)
            key_tags = torch.where(visible, ALL_BITS, 0).to(torch.int64)
        out = self._attend(query, key, value, lambda: self._site(
            (0, num_text), (num_text, length), iidkern_step, iidkern_num_steps, with_source=True), key_tags)
        joint = out.flatten(2, 3).to(query.dtype)

        text_out, image_out = joint[:, :num_text], joint[:, num_text:]
        image_out = attn.to_out[0](image_out.contiguous())
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)
        text_out = attn.to_add_out(text_out.contiguous())
        return image_out, text_out
