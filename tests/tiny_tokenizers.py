"""Tiny offline tokenizers shaped like the real ones, for tests that build text encoders from
configs: a word unigram with T5's metaspace and end token, and a character BPE with CLIP's start
and end tokens. Nothing is downloaded."""
import json
import string

import transformers

WORDS = ["a", "red", "fox", "castle", "at", "dusk", "add", "tree", "make", "the", "sky", "blue", "cat", "hat"]
CHARS = string.ascii_lowercase + string.digits + ".,!?'-"


def t5_tokenizer():
    """``(T5TokenizerFast, vocab size)``: the words of ``WORDS`` as pieces, other text by character."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS] + \
        [("\u2581", -2.0)] + [(c, -5.0) for c in CHARS]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", extra_ids=0), len(pieces)


def clip_tokenizer(path, **kwargs):
    """``(CLIPTokenizer, vocab size)``, its vocabulary files written under ``path``; ``kwargs`` go to
    the tokenizer (e.g. ``model_max_length=77``, the real tokenizers' limit)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), **kwargs), len(vocab)
