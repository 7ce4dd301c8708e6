"""Prompt embeddings, local-only encoder / VAE loading (clear errors on missing paths), latent scaling."""
import pytest
import torch

from iidkern.mmdit import (FluxTextEncoders, PromptEmbeddings, SD3TextEncoders, decode_latents, encode_image,
                           load_vae)


def test_missing_paths_name_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="Flux text encoders: directory not found: .*nowhere"):
        FluxTextEncoders.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "tokenizer_2").mkdir()
    with pytest.raises(FileNotFoundError, match="lacks the subfolder\\(s\\) tokenizer/, text_encoder_2/, "
                                                "text_encoder_3/, tokenizer_3/"):
        SD3TextEncoders.from_pretrained(tmp_path)  # exists, but holds only two of the folders
    with pytest.raises(FileNotFoundError, match="lacks the subfolder\\(s\\) tokenizer/, text_encoder_2/ "):
        SD3TextEncoders.from_pretrained(tmp_path, with_t5=False)
    with pytest.raises(FileNotFoundError, match="VAE: directory not found"):
        load_vae(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="VAE: no config.json"):
        load_vae(tmp_path / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_vae("black-forest-labs/FLUX.1-dev")  # a hub id is not a local directory


def test_prompt_embeddings_validate_and_batch():
    a = PromptEmbeddings.random(1, 6, 24, 20, seed=1)
    b = PromptEmbeddings.random(2, 6, 24, 20, seed=2)
    both = PromptEmbeddings.cat([a, b])
    assert both.batch == 3 and torch.equal(both.text[1:], b.text)
    assert both.to(dtype=torch.float16).pooled.dtype == torch.float16
    with pytest.raises(ValueError, match="one B"):
        PromptEmbeddings(torch.randn(2, 6, 24), torch.randn(3, 20))
    with pytest.raises(TypeError, match="pooled must be a torch.Tensor"):
        PromptEmbeddings(torch.randn(2, 6, 24), [1.0])


def _tiny_vae(shift):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=4, sample_size=16, scaling_factor=0.75, shift_factor=shift)


def test_vae_loads_locally_and_applies_shift_and_scale(tmp_path):
    _tiny_vae(0.25).save_pretrained(tmp_path / "vae")
    vae = load_vae(tmp_path)  # a pipeline root: finds vae/
    image = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = encode_image(vae, image)
    with torch.no_grad():
        raw = vae.encode(image).latent_dist.mean
    assert latents.shape == (2, 4, 8, 12)
    assert torch.allclose(latents, (raw - 0.25) * 0.75, atol=1e-6)
    decoded = decode_latents(vae, latents)
    with torch.no_grad():
        expected = vae.decode(raw).sample.clamp(-1, 1)
    assert decoded.shape == image.shape and torch.allclose(decoded, expected, atol=1e-5)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(encode_image(vae, image, mode="sample", generator=g1),
                       encode_image(vae, image, mode="sample", generator=g2))
    with pytest.raises(ValueError, match="mode must be"):
        encode_image(vae, image, mode="argmax")


class WordTokenizer:
    """Stand-in tokenizer (the real ones need vocab files): one id per word, padded with 0."""

    def __call__(self, prompts, padding, max_length, truncation, return_tensors):
        assert padding == "max_length" and truncation and return_tensors == "pt"
        rows = []
        for p in prompts:
            ids = [1 + sum(map(ord, w)) % 90 for w in p.split()][:max_length]
            rows.append(ids + [0] * (max_length - len(ids)))
        return type("Batch", (), {"input_ids": torch.tensor(rows)})()


def _clip(hidden, proj, seed):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=100, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=proj)
    return CLIPTextModelWithProjection(cfg).eval()


def _t5(d_model, seed):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=100, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                                   num_heads=2)).eval()


def test_sd3_prompt_assembly():
    tok = WordTokenizer()
    clip_l, clip_g, t5 = _clip(8, 6, 1), _clip(12, 10, 2), _t5(32, 3)
    enc = SD3TextEncoders(clip_l, tok, clip_g, tok, t5, tok, joint_dim=32)
    prompts = ["a red fox", "two cats on a mat"]
    emb = enc.encode(prompts, max_length=9)
    assert emb.text.shape == (2, 77 + 9, 32) and emb.pooled.shape == (2, 6 + 10)
    ids = tok(prompts, "max_length", 77, True, "pt").input_ids
    with torch.no_grad():
        penultimate_l = clip_l(ids, output_hidden_states=True).hidden_states[-2]
        pooled_g = clip_g(ids).text_embeds
        t5_out = t5(tok(prompts, "max_length", 9, True, "pt").input_ids)[0]
    assert torch.allclose(emb.text[:, :77, :8], penultimate_l, atol=1e-6)
    assert torch.count_nonzero(emb.text[:, :77, 20:]) == 0  # CLIP channels zero-padded to the T5 width
    assert torch.allclose(emb.text[:, 77:], t5_out, atol=1e-6)
    assert torch.allclose(emb.pooled[:, 6:], pooled_g, atol=1e-6)
    no_t5 = SD3TextEncoders(clip_l, tok, clip_g, tok, joint_dim=32).encode(prompts, max_length=9)
    assert torch.count_nonzero(no_t5.text[:, 77:]) == 0 and torch.equal(no_t5.text[:, :77], emb.text[:, :77])


def test_flux_prompt_assembly():
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = WordTokenizer()
    torch.manual_seed(4)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77)).eval()
    t5 = _t5(16, 5)
    emb = FluxTextEncoders(clip, tok, t5, tok).encode("a castle at dusk", max_length=12)
    assert emb.text.shape == (1, 12, 16) and emb.pooled.shape == (1, 8)
    with torch.no_grad():
        pooled = clip(tok(["a castle at dusk"], "max_length", 77, True, "pt").input_ids).pooler_output
    assert torch.allclose(emb.pooled, pooled, atol=1e-6)
