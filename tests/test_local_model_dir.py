"""A local Flux pipeline folder with every part real (transformer, CLIP and T5 text encoders with
their tokenizers, VAE), all tiny and random, built offline: the path ``--model DIR`` takes
without stand-ins. The tokenizers are made in memory (a character BPE for CLIP, a word unigram
with T5's metaspace and end token for T5) and saved as the pipeline would hold them."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")
tokenizers = pytest.importorskip("tokenizers")

from iidkern.edit.models import EditModel, FluxPromptEncoder  # noqa: E402
from iidkern.edit.pipeline import headrouter_edit, iid_edit  # noqa: E402
from iidkern.mmdit import FluxConfig, FluxTransformer, save_weights  # noqa: E402
from tiny_tokenizers import clip_tokenizer, t5_tokenizer  # noqa: E402



def save_t5_tokenizer(path):
    tok, vocab = t5_tokenizer()
    tok.save_pretrained(path)
    return vocab


def save_clip_tokenizer(path):
    tok, vocab = clip_tokenizer(path)
    tok.save_pretrained(path)
    return vocab


def build_pipeline_dir(root, concat=True):
    """transformer/ (a channel-concat editing model, or a text-to-image one), text_encoder/ +
    tokenizer/ (CLIP), text_encoder_2/ + tokenizer_2/ (T5), vae/: the widths fit each other as
    a real Flux pipeline's do."""
    from diffusers import AutoencoderKL

    latent = 4
    cfg = FluxConfig.tiny(in_channels=(8 if concat else 4) * latent, out_channels=4 * latent, num_layers=2,
                          num_single_layers=1)
    (root / "transformer").mkdir(parents=True)
    save_weights(FluxTransformer.random(cfg, seed=11), root / "transformer" / "model.safetensors")
    (root / "transformer" / "config.json").write_text(json.dumps(cfg.to_dict()))
    torch.manual_seed(12)
    clip_vocab = save_clip_tokenizer(root / "tokenizer")
    transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=cfg.pooled_projection_dim, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
        pad_token_id=1)).save_pretrained(root / "text_encoder")
    t5_vocab = save_t5_tokenizer(root / "tokenizer_2")
    transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=t5_vocab, d_model=cfg.joint_attention_dim, d_kv=8, d_ff=32, num_layers=1,
        num_heads=2)).save_pretrained(root / "text_encoder_2")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=latent,
                  norm_num_groups=4, sample_size=16, scaling_factor=0.5, shift_factor=0.1).save_pretrained(root / "vae")
    return root


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return build_pipeline_dir(tmp_path_factory.mktemp("flux_pipeline"))


@pytest.fixture(scope="module")
def model(pipeline_dir):
    return EditModel.from_dir(pipeline_dir, device="cpu", dtype=torch.float32, backend="reference")


@pytest.fixture(scope="module")
def t2i_model(tmp_path_factory):
    root = build_pipeline_dir(tmp_path_factory.mktemp("flux_t2i_pipeline"), concat=False)
    return EditModel.from_dir(root, "t2i", device="cpu", dtype=torch.float32, backend="reference")


def test_the_folder_loads_its_real_parts(model):
    assert isinstance(model.text, FluxPromptEncoder) and type(model.codec).__name__ == "VaeCodec"
    assert not model.is_tiny_random and model.layout == "concat" and model.factor == 2


def test_prompt_tokens_segments_and_embeddings(model):
    enc = model.text
    t5_tok = enc.encoders.t5_tokenizer
    prompt = "add a red hat"
    ids = t5_tok(prompt).input_ids
    assert enc.num_tokens(prompt) == len(ids) and ids[-1] == t5_tok.eos_token_id  # the end token counts
    segments = ["make the sky blue", "add a cat"]
    emb, ranges = enc.encode_segments(segments)
    lengths = [enc.num_tokens(s) for s in segments]
    assert ranges == [(0, lengths[0]), (lengths[0], sum(lengths))]
    assert emb.text.shape == (1, sum(lengths), model.transformer.config.joint_attention_dim)
    for s, (a, b) in zip(segments, ranges):  # each instruction encoded on its own, then joined
        torch.testing.assert_close(emb.text[:, a:b], enc.encode(s).text)
    whole = enc.encode(prompt, length=9)  # padded to the asked length; never cut below the prompt
    assert whole.text.shape[1] == 9 and enc.encode(prompt, length=2).text.shape[1] == len(ids)
    assert emb.pooled.shape == (1, model.transformer.config.pooled_projection_dim)


def test_word_ranges_map_words_to_their_tokens(model):
    enc = model.text
    tok = enc.encoders.t5_tokenizer
    prompt = "Add a red zebra, at dusk!"
    ranges = dict(enc.word_ranges(prompt))
    assert list(ranges) == ["add", "a", "red", "zebra", "at", "dusk"]  # lowercased, punctuation left out
    pieces = tok.convert_ids_to_tokens(tok(prompt).input_ids)
    for word, (a, b) in ranges.items():
        spelled = "".join(pieces[a:b]).replace("\u2581", "").replace("<unk>", "?")
        assert a < b and spelled.lower().strip("?") in word, (word, pieces[a:b])
    assert ranges["red"] == (pieces.index("\u2581red"), pieces.index("\u2581red") + 1)
    assert ranges["zebra"][1] - ranges["zebra"][0] > 1  # a word of several pieces gets all of them


def test_iid_and_headrouter_run_on_the_folder(model, t2i_model):
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    res = iid_edit(model, image, ["make the sky blue", "add a cat"], num_steps=2, progress=False)
    assert res.image.shape == image.shape and torch.isfinite(res.image).all()
    assert res.masks.shape[0] == 2
    res = headrouter_edit(t2i_model, image, "a red fox", "a red cat", num_steps=2, progress=False)
    assert res.image.shape == image.shape and torch.isfinite(res.image).all()
    assert res.mask_labels == ["cat"]  # the target's word that the source lacks


def test_the_cli_edits_with_the_folder(pipeline_dir, tmp_path):
    from test_cli import assert_png, run_cli
    from iidkern.edit.codec import save_png, to_uint8

    save_png(to_uint8(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1),
             tmp_path / "in.png")
    res = run_cli("edit", "--image", str(tmp_path / "in.png"), "--instruction", "add a hat", "--model",
                  str(pipeline_dir), "--steps", "2", "--size", "32", "--no-progress", "--device", "cpu",
                  "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    assert "meaningless" not in res.stderr  # real parts: no tiny-model notice
    assert_png(tmp_path / "out" / "edited.png", (32, 32))
