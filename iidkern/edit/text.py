"""Prompt embeddings for the editing pipelines, with the token ranges the methods need.

IID needs the text slot laid out as ``[P_1 ... P_N]`` with the range of every instruction;
HeadRouter needs a source and a target prompt of one length (they share a batch) and the
token range of every word (key regions). Two encoders offer the same small interface:

* :class:`HashTextEncoder` — for tiny random models and the demo: every word gets a fixed
  Gaussian vector seeded by a SHA-256 hash of the word (same word, same vector, on every
  machine); the pooled vector is the mean of per-word pooled vectors. No model, no
  download; the numbers mean nothing, they only make prompts distinct and repeatable.
* :class:`FluxPromptEncoder` — the real CLIP-L + T5 of a local Flux directory
  (:class:`iidkern.mmdit.FluxTextEncoders`). Each instruction is encoded on its own and the
  token sequences are concatenated (clean segment boundaries; T5 is bidirectional, so this
  differs slightly from encoding the joined text); the pooled vector of a multi-instruction
  text is CLIP's of the joined instructions.
"""
from __future__ import annotations

import hashlib
import re
from typing import List, Sequence, Tuple

import torch

from ..mmdit.encoders import PromptEmbeddings

Range = Tuple[int, int]
_WORD = re.compile(r"[\w']+")


def words_of(prompt: str) -> List[str]:
    """Lower-case words of a prompt (punctuation dropped)."""
    return _WORD.findall(prompt.lower())


def joined(instructions: Sequence[str]) -> str:
    """The combined prompt of several instructions (IID's combined branch and baseline)."""
    return "; ".join(s.strip().rstrip(";.") for s in instructions)


def _hash_vector(word: str, dim: int, salt: str) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(f"{salt}:{word}".encode()).digest()[:8], "little") & (2 ** 63 - 1)
    return torch.randn(dim, generator=torch.Generator("cpu").manual_seed(seed))


class HashTextEncoder:
    """Deterministic hash-seeded word embeddings for tiny random models (see the module doc).

    ``text_dim`` / ``pooled_dim``: the model's ``joint_attention_dim`` / ``pooled_projection_dim``.
    One token per word; an empty prompt is one ``"<empty>"`` token.
    """

    pad_word = "<pad>"

    def __init__(self, text_dim: int, pooled_dim: int):
        self.text_dim, self.pooled_dim = int(text_dim), int(pooled_dim)

    def _tokens(self, prompt: str) -> List[str]:
        return words_of(prompt) or ["<empty>"]

    def _text(self, words: Sequence[str]) -> torch.Tensor:
        return torch.stack([_hash_vector(w, self.text_dim, "text") for w in words])

    def pooled(self, prompt: str) -> torch.Tensor:
        """``[1, pooled_dim]``."""
        return torch.stack([_hash_vector(w, self.pooled_dim, "pooled") for w in self._tokens(prompt)]).mean(0)[None]

    def encode(self, prompt: str, length: int = 0) -> PromptEmbeddings:
        """One prompt, padded with ``<pad>`` tokens to ``length`` tokens if longer than its words."""
        words = self._tokens(prompt)
        words = words + [self.pad_word] * max(0, length - len(words))
        return PromptEmbeddings(self._text(words)[None], self.pooled(prompt))

    def num_tokens(self, prompt: str) -> int:
        return len(self._tokens(prompt))

    def encode_segments(self, segments: Sequence[str]) -> Tuple[PromptEmbeddings, List[Range]]:
        """``[P_1 ... P_N]`` as one text, its instruction ranges, and the pooled vector of the joined text."""
        words, ranges = [], []
        for s in segments:
            w = self._tokens(s)
            ranges.append((len(words), len(words) + len(w)))
            words += w
        return PromptEmbeddings(self._text(words)[None], self.pooled(joined(segments))), ranges

    def word_ranges(self, prompt: str) -> List[Tuple[str, Range]]:
        return [(w, (i, i + 1)) for i, w in enumerate(self._tokens(prompt))]


class FluxPromptEncoder:
    """The interface of :class:`HashTextEncoder` over a local Flux pipeline's CLIP-L + T5."""

    def __init__(self, encoders, max_length: int = 512):
        self.encoders = encoders  # iidkern.mmdit.FluxTextEncoders
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, root, *, device="cpu", dtype=torch.bfloat16) -> "FluxPromptEncoder":
        from ..mmdit.encoders import FluxTextEncoders

        return cls(FluxTextEncoders.from_pretrained(root, device=device, dtype=dtype))

    def num_tokens(self, prompt: str) -> int:
        """T5 tokens of the prompt, end token included."""
        return min(len(self.encoders.t5_tokenizer(prompt).input_ids), self.max_length)

    def pooled(self, prompt: str) -> torch.Tensor:
        return self.encoders.encode([prompt], max_length=1).pooled

    def encode(self, prompt: str, length: int = 0) -> PromptEmbeddings:
        return self.encoders.encode([prompt], max_length=max(length, self.num_tokens(prompt)))

    def encode_segments(self, segments: Sequence[str]) -> Tuple[PromptEmbeddings, List[Range]]:
        parts, ranges, start = [], [], 0
        for s in segments:
            n = self.num_tokens(s)
            parts.append(self.encoders.encode([s], max_length=n).text)
            ranges.append((start, start + n))
            start += n
        return PromptEmbeddings(torch.cat(parts, dim=1), self.pooled(joined(segments))), ranges

    def word_ranges(self, prompt: str) -> List[Tuple[str, Range]]:
        enc = self.encoders.t5_tokenizer(prompt, return_offsets_mapping=True)
        out = []
        for m in _WORD.finditer(prompt):
            toks = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < m.end() and b > m.start()]
            if toks:
                out.append((m.group(0).lower(), (toks[0], toks[-1] + 1)))
        return out
