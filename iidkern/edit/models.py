"""The model bundle an editing pipeline runs on: transformer + text encoder + codec + layout.

Layouts (how the source picture reaches the transformer):

* ``"concat"`` — FluxEdit: source latents concatenated on the channel axis
  (``in_channels == 2 * out_channels``);
* ``"kontext"`` — FLUX.1 Kontext: source latents appended as extra tokens
  (``AttentionSite.extra == (("source", ...),)``, always visible under IID's masks);
* ``"t2i"`` — a text-to-image model (FLUX.1-dev); the source enters by inversion (HeadRouter).

:meth:`EditModel.tiny` builds an embedded random model (no download, meaningless pictures)
with :class:`~iidkern.edit.text.HashTextEncoder` and :class:`~iidkern.edit.codec.PixelCodec`;
:meth:`EditModel.from_dir` loads local weights with the runner's strict loader.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..mmdit.flux import FluxConfig, FluxTransformer
from .codec import PixelCodec, VaeCodec
from .text import FluxPromptEncoder, HashTextEncoder

LAYOUTS = ("concat", "kontext", "t2i")


def _default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class EditModel:
    """Everything a pipeline needs. ``guidance``: Flux's embedded guidance scale (None for
    models without a guidance embedding). ``backend``: iidkern attention backend."""

    transformer: FluxTransformer
    text: object  # HashTextEncoder | FluxPromptEncoder
    codec: object  # PixelCodec | VaeCodec
    layout: str
    guidance: Optional[float] = 3.5
    backend: str = "auto"
    name: str = "model"
    is_tiny_random: bool = False

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"EditModel: layout must be one of {LAYOUTS}, got {self.layout!r}")
        cfg = self.transformer.config
        if self.layout == "concat" and cfg.in_channels != 2 * cfg.out_channels:
            raise ValueError(f"EditModel: layout 'concat' (FluxEdit) needs in_channels == 2 * out_channels, got "
                             f"in_channels={cfg.in_channels}, out_channels={cfg.out_channels}")
        if self.layout != "concat" and cfg.in_channels != cfg.out_channels:
            raise ValueError(f"EditModel: layout {self.layout!r} needs in_channels == out_channels, got "
                             f"{cfg.in_channels} and {cfg.out_channels} (a channel-concat model wants layout 'concat')")
        if self.latent_channels != self.codec.latent_channels:
            raise ValueError(f"EditModel: the transformer works on {self.latent_channels} latent channels, the codec "
                             f"gives {self.codec.latent_channels}")
        if not self.transformer.config.guidance_embeds:
            self.guidance = None

    @property
    def device(self) -> torch.device:
        return self.transformer.proj_out.weight.device

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.out_channels // 4  # 2x2 packing

    @property
    def factor(self) -> int:
        return self.codec.factor

    # ------------------------------------------------------------------ builders
    @classmethod
    def tiny(cls, layout: str = "concat", *, device=None, seed: int = 0, backend: str = "auto") -> "EditModel":
        """An embedded tiny random Flux (2 double + 2 single blocks, 2 heads x 16): pictures are meaningless."""
        if layout not in LAYOUTS:
            raise ValueError(f"EditModel.tiny: layout must be one of {LAYOUTS}, got {layout!r}")
        device = torch.device(device) if device is not None else _default_device()
        latent_channels = 4
        packed = 4 * latent_channels
        in_channels = 2 * packed if layout == "concat" else packed
        config = FluxConfig.tiny(in_channels=in_channels, out_channels=packed, num_layers=2, num_single_layers=2)
        model = FluxTransformer.random(config, seed=seed, device=device)
        return cls(model, HashTextEncoder(config.joint_attention_dim, config.pooled_projection_dim),
                   PixelCodec(latent_channels, factor=8, seed=seed), layout, backend=backend,
                   name=f"tiny-random-flux ({layout})", is_tiny_random=True)

    @classmethod
    def from_dir(cls, path, layout: Optional[str] = None, *, device=None, dtype: Optional[torch.dtype] = None,
                 backend: str = "auto", stand_ins: bool = False) -> "EditModel":
        """Local Flux weights: a diffusers pipeline folder (``transformer/``, ``text_encoder*/``,
        ``tokenizer*/``, ``vae/``) read with the runner's strict loader; nothing is downloaded.

        ``layout``: None infers ``"concat"`` from a channel-concat transformer, else ``"kontext"``.
        ``dtype``: None = the checkpoint's own dtype. ``stand_ins``: when the folder has no text
        encoders / VAE, use the tiny model's hash word vectors / pixel codec instead of failing
        (for saved test models; a real model gives garbage with them). Real text encoders and a
        VAE need ``transformers`` and ``diffusers`` (``pip install 'iidkern[diffusers]'``).
        """
        from ..mmdit.loading import load_flux

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model directory not found: {path!r}")
        device = torch.device(device) if device is not None else _default_device()
        tdir = os.path.join(path, "transformer")
        tpath = tdir if os.path.isdir(tdir) else path
        dtype = dtype or checkpoint_dtype(tpath)
        transformer = load_flux(tpath, device=device, dtype=dtype)
        cfg = transformer.config
        if layout is None:
            layout = "concat" if cfg.in_channels == 2 * cfg.out_channels else "kontext"
        has_text = all(os.path.isdir(os.path.join(path, d)) for d in ("text_encoder", "tokenizer", "text_encoder_2",
                                                                        "tokenizer_2"))
        has_vae = os.path.isdir(os.path.join(path, "vae"))
        missing = [what for what, ok in (("text encoders (text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/)",
                                          has_text), ("VAE (vae/)", has_vae)) if not ok]
        if missing and not stand_ins:
            raise FileNotFoundError(f"model directory {path!r} has the transformer but no " + " and no ".join(missing)
                                    + "; add them (a diffusers Flux pipeline layout), or allow the tiny model's "
                                      "stand-ins (hash word vectors, pixel codec; CLI: --allow-stand-ins) for test models")
        try:  # transformers / diffusers raise OSError for a folder without its weights or config
            text = FluxPromptEncoder.from_pretrained(path, device=device, dtype=dtype) if has_text else \
                HashTextEncoder(cfg.joint_attention_dim, cfg.pooled_projection_dim)
            codec = VaeCodec.from_pretrained(path, device=device, dtype=torch.float32) if has_vae else \
                PixelCodec(cfg.out_channels // 4, factor=8)
        except OSError as exc:
            raise ValueError(f"model directory {path!r}: cannot load its text encoders or VAE ({exc})") from None
        except ImportError as exc:  # the base install has neither transformers nor diffusers
            raise ValueError(f"model directory {path!r}: loading its text encoders and VAE needs the optional "
                             f"dependencies: pip install 'iidkern[diffusers]' ({exc})") from None
        return cls(transformer, text, codec, layout, backend=backend, name=os.path.basename(os.path.normpath(path)),
                   is_tiny_random=False)


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def checkpoint_dtype(path) -> torch.dtype:
    """The floating dtype of a checkpoint's first tensor (no tensor is read)."""
    from ..mmdit.loading import open_safetensors, safetensors_files

    with open_safetensors(safetensors_files(path)[0]) as f:
        for key in f.keys():
            kind = f.get_slice(key).get_dtype()
            if kind in _SAFETENSORS_DTYPES:
                return _SAFETENSORS_DTYPES[kind]
    return torch.bfloat16
