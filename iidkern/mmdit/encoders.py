"""Prompt embeddings, optional text encoders (transformers' CLIP / T5) and VAE (diffusers' AutoencoderKL).

The runners only need :class:`PromptEmbeddings` (a sequence embedding and a pooled
vector); compute them however you like and pass them in. For convenience this module can
also load the real encoders from a **local** directory laid out like a diffusers pipeline
(``text_encoder/``, ``tokenizer/``, ``text_encoder_2/`` ... ``vae/``), never from a hub:
every loader passes ``local_files_only=True`` and a missing path raises
:class:`FileNotFoundError` naming what was looked for.

What the two families feed their transformer:

* **Flux**: ``text`` = T5-XXL last hidden states ``[B, 512, 4096]``; ``pooled`` = CLIP-L's
  pooled output ``[B, 768]``.
* **SD3**: ``text`` = [CLIP-L penultimate ‖ CLIP-G penultimate] (77 tokens, 2048 channels,
  zero-padded to 4096) followed by T5-XXL (256 tokens; zeros without T5) on the token
  axis; ``pooled`` = [CLIP-L ‖ CLIP-G] projected embeddings ``[B, 2048]``.

Latents: ``encode_image`` / ``decode_latents`` apply the VAE's ``shift_factor`` and
``scaling_factor`` from its config (Flux: 0.1159 / 0.3611, SD3: 0.0609 / 1.5305).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F


@dataclass
class PromptEmbeddings:
    """What a runner needs of a prompt: ``text`` ``[B, N, D]`` and ``pooled`` ``[B, P]``."""

    text: torch.Tensor
    pooled: torch.Tensor

    def __post_init__(self):
        for name in ("text", "pooled"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"PromptEmbeddings.{name} must be a torch.Tensor, got "
                                f"{type(getattr(self, name)).__name__}")
        if self.text.dim() != 3 or self.pooled.dim() != 2 or self.text.shape[0] != self.pooled.shape[0]:
            raise ValueError(f"PromptEmbeddings: text must be [B, N, D] and pooled [B, P] with one B, got "
                             f"{tuple(self.text.shape)} and {tuple(self.pooled.shape)}")

    @property
    def batch(self) -> int:
        return self.text.shape[0]

    def to(self, device=None, dtype=None) -> "PromptEmbeddings":
        return PromptEmbeddings(self.text.to(device=device, dtype=dtype), self.pooled.to(device=device, dtype=dtype))

    @staticmethod
    def cat(items: Sequence["PromptEmbeddings"]) -> "PromptEmbeddings":
        """Stack several prompts on the batch axis (texts must have the same length)."""
        return PromptEmbeddings(torch.cat([p.text for p in items]), torch.cat([p.pooled for p in items]))

    @staticmethod
    def random(batch: int, num_text: int, text_dim: int, pooled_dim: int, *, seed: int = 0) -> "PromptEmbeddings":
        """Seeded random embeddings (tests and demos without encoders)."""
        g = torch.Generator("cpu").manual_seed(seed)
        return PromptEmbeddings(torch.randn(batch, num_text, text_dim, generator=g),
                                torch.randn(batch, pooled_dim, generator=g))


def require_path(path, what: str, *, is_dir: bool = True) -> str:
    """``path`` as a string, or a FileNotFoundError naming ``what`` was expected there."""
    if path is None:
        raise FileNotFoundError(f"{what}: no path given")
    path = os.fspath(path)
    ok = os.path.isdir(path) if is_dir else os.path.exists(path)
    if not ok:
        kind = "directory" if is_dir else "path"
        raise FileNotFoundError(f"{what}: {kind} not found: {path!r} (iidkern never downloads weights; "
                                "pass a local directory, e.g. a diffusers pipeline snapshot)")
    return path


def require_subfolders(root, names: Sequence[str], what: str) -> dict:
    """``{name: root/name}`` for a pipeline directory; one FileNotFoundError lists every missing folder.

    Checked before any model is loaded, so a wrong path fails in milliseconds, not after a
    10 GB text encoder has been read.
    """
    root = require_path(root, what)
    folders = {name: os.path.join(root, name) for name in names}
    missing = [name + "/" for name, path in folders.items() if not os.path.isdir(path)]
    if missing:
        raise FileNotFoundError(f"{what}: {root!r} lacks the subfolder(s) {', '.join(missing)} "
                                f"(expected a diffusers pipeline layout: {', '.join(n + '/' for n in names)})")
    return folders


def _tokens(tokenizer, prompts: List[str], max_length: int, device):
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device)


class FluxTextEncoders:
    """CLIP-L (pooled vector) + T5-XXL (token embeddings) of a Flux pipeline directory."""

    def __init__(self, clip, clip_tokenizer, t5, t5_tokenizer):
        self.clip, self.clip_tokenizer, self.t5, self.t5_tokenizer = clip, clip_tokenizer, t5, t5_tokenizer

    @classmethod
    def from_pretrained(cls, root, *, device="cpu", dtype=torch.bfloat16) -> "FluxTextEncoders":
        """Load from ``root/{text_encoder, tokenizer, text_encoder_2, tokenizer_2}`` (local files only)."""
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        dirs = require_subfolders(root, ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
                                  "Flux text encoders")
        clip = CLIPTextModel.from_pretrained(dirs["text_encoder"], local_files_only=True,
                                             torch_dtype=dtype).to(device).eval()
        clip_tok = CLIPTokenizer.from_pretrained(dirs["tokenizer"], local_files_only=True)
        t5 = T5EncoderModel.from_pretrained(dirs["text_encoder_2"], local_files_only=True,
                                            torch_dtype=dtype).to(device).eval()
        t5_tok = T5TokenizerFast.from_pretrained(dirs["tokenizer_2"], local_files_only=True)
        return cls(clip, clip_tok, t5, t5_tok)

    @torch.no_grad()
    def encode(self, prompts: Union[str, List[str]], max_length: int = 512) -> PromptEmbeddings:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        device = next(self.clip.parameters()).device
        pooled = self.clip(_tokens(self.clip_tokenizer, prompts, 77, device)).pooler_output
        text = self.t5(_tokens(self.t5_tokenizer, prompts, max_length, device))[0]
        return PromptEmbeddings(text, pooled)


class SD3TextEncoders:
    """CLIP-L + CLIP-G (with projection) and, optionally, T5-XXL of an SD3 pipeline directory."""

    def __init__(self, clip_l, tok_l, clip_g, tok_g, t5=None, tok_t5=None, joint_dim: int = 4096):
        self.clip_l, self.tok_l, self.clip_g, self.tok_g = clip_l, tok_l, clip_g, tok_g
        self.t5, self.tok_t5, self.joint_dim = t5, tok_t5, joint_dim

    @classmethod
    def from_pretrained(cls, root, *, device="cpu", dtype=torch.float16, with_t5: bool = True) -> "SD3TextEncoders":
        """Load from ``root/{text_encoder, tokenizer, text_encoder_2, tokenizer_2[, text_encoder_3, tokenizer_3]}``."""
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        names = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
        dirs = require_subfolders(root, names + (("text_encoder_3", "tokenizer_3") if with_t5 else ()),
                                  "SD3 text encoders")

        def clip(name):
            return CLIPTextModelWithProjection.from_pretrained(dirs[name], local_files_only=True,
                                                               torch_dtype=dtype).to(device).eval()

        def tok(name, kind=CLIPTokenizer):
            return kind.from_pretrained(dirs[name], local_files_only=True)

        t5 = tok_t5 = None
        if with_t5:
            t5 = T5EncoderModel.from_pretrained(dirs["text_encoder_3"], local_files_only=True,
                                                torch_dtype=dtype).to(device).eval()
            tok_t5 = tok("tokenizer_3", T5TokenizerFast)
        return cls(clip("text_encoder"), tok("tokenizer"), clip("text_encoder_2"), tok("tokenizer_2"), t5, tok_t5)

    @torch.no_grad()
    def encode(self, prompts: Union[str, List[str]], max_length: int = 256) -> PromptEmbeddings:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        device = next(self.clip_l.parameters()).device
        seqs, pooled = [], []
        for model, tok in ((self.clip_l, self.tok_l), (self.clip_g, self.tok_g)):
            out = model(_tokens(tok, prompts, 77, device), output_hidden_states=True)
            seqs.append(out.hidden_states[-2])  # penultimate layer, as SD3 was trained
            pooled.append(out.text_embeds)
        clip = torch.cat(seqs, dim=-1)
        clip = F.pad(clip, (0, self.joint_dim - clip.shape[-1]))
        if self.t5 is not None:
            t5 = self.t5(_tokens(self.tok_t5, prompts, max_length, device))[0].to(clip.dtype)
        else:
            t5 = torch.zeros(len(prompts), max_length, self.joint_dim, device=device, dtype=clip.dtype)
        return PromptEmbeddings(torch.cat([clip, t5], dim=1), torch.cat(pooled, dim=-1))


def load_vae(path, *, device="cpu", dtype=torch.float32, subfolder: Optional[str] = "vae"):
    """diffusers' AutoencoderKL from a local pipeline directory (``path/vae``) or a VAE directory itself."""
    from diffusers import AutoencoderKL

    path = require_path(path, "VAE")
    if subfolder is not None and os.path.isdir(os.path.join(path, subfolder)):
        path = os.path.join(path, subfolder)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"VAE: no config.json in {path!r} (expected a diffusers AutoencoderKL directory)")
    return AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=dtype).to(device).eval()


def _factors(vae):
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return float(shift), float(vae.config.scaling_factor)


@torch.no_grad()
def encode_image(vae, image: torch.Tensor, *, generator: Optional[torch.Generator] = None,
                 mode: str = "mean") -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in ``[-1, 1]`` -> model latents ``(z - shift) * scale``.

    ``mode="mean"`` takes the posterior mean (deterministic; what editing methods use),
    ``"sample"`` draws from it with ``generator``.
    """
    if mode not in ("mean", "sample"):
        raise ValueError(f"mode must be 'mean' or 'sample', got {mode!r}")
    posterior = vae.encode(image.to(device=vae.device, dtype=vae.dtype)).latent_dist
    z = posterior.mean if mode == "mean" else posterior.sample(generator)
    shift, scale = _factors(vae)
    return (z.float() - shift) * scale


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Model latents -> images ``[B, 3, H, W]`` in ``[-1, 1]`` (float32)."""
    shift, scale = _factors(vae)
    z = latents.float() / scale + shift
    return vae.decode(z.to(device=vae.device, dtype=vae.dtype)).sample.float().clamp(-1, 1)
