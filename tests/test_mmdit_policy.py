"""Every attention call of the runner goes through iidkern's policy door with a complete AttentionSite."""
import numpy as np
import pytest
import torch

from iidkern.mmdit import FluxConfig, FluxTransformer, SD3Config, SD3Transformer, image_ids
from iidkern.mmdit.testing import flux_inputs, sd3_inputs
from iidkern.policy import AttentionPolicy, AttentionRequest, CapturePolicy
from iidkern.specs import Probe, TokenGroups

from helpers import RecordSites, assert_close_rel


def _flux_call(model, policy=None, backend="reference", num_source=None, **kw):
    device = model.proj_out.weight.device
    x, text, pooled, t, guidance, *source = flux_inputs(model.config, batch=1, rows=3, cols=4, num_text=5,
                                                        seed=1, num_source=num_source, device=device)
    extra = dict(source=source[0], source_ids=image_ids(2, 3, index=1, device=device)) if num_source else {}
    with torch.no_grad():
        return model(x, text, pooled, t, img_ids=image_ids(3, 4, device=device), guidance=guidance, policy=policy,
                     backend=backend, **extra, **kw)


def test_flux_sites_cover_every_call():
    model = FluxTransformer.random(FluxConfig.tiny(num_layers=2, num_single_layers=3))
    rec = RecordSites()
    _flux_call(model, rec, num_source=6, step=4, num_steps=28)
    kinds = [(s.block_kind, s.block, s.layer) for s in rec.sites]
    assert kinds == [("double", 0, 0), ("double", 1, 1), ("single", 0, 2), ("single", 1, 3), ("single", 2, 4)]
    for s in rec.sites:
        assert (s.step, s.num_steps, s.num_layers) == (4, 28, 5)
        assert s.text == (0, 5) and s.image == (5, 17) and s.range("source") == (17, 23) and s.seq_len == 23


def test_sd3_sites_include_dual_attention():
    model = SD3Transformer.random(SD3Config.tiny(num_layers=3, dual_attention_layers=(0,), qk_norm="rms_norm"))
    rec = RecordSites()
    latents, text, pooled, t = sd3_inputs(model.config, rows=3, cols=5, num_text=4)
    with torch.no_grad():
        model(latents, text, pooled, t, policy=rec, step=0, num_steps=2, backend="reference")
    got = [(s.block_kind, s.block, s.layer, s.num_layers, s.text, s.image) for s in rec.sites]
    assert got == [("joint", 0, 0, 4, (0, 4), (4, 19)), ("image", 0, 1, 4, (0, 0), (0, 15)),
                   ("joint", 1, 2, 4, (0, 4), (4, 19)), ("joint", 2, 3, 4, (0, 4), (4, 19))]


def test_a_silent_policy_changes_nothing():
    model = FluxTransformer.random(FluxConfig.tiny(), seed=3)
    assert torch.equal(_flux_call(model, RecordSites()), _flux_call(model))


def test_probes_come_back_at_the_chosen_site():
    """Capture image-query x text-key attention mass per head at the last (penultimate-of-two) layer."""
    model = FluxTransformer.random(FluxConfig.tiny(num_layers=1, num_single_layers=1), seed=4)

    def probes(site):
        # Each image query's probability mass on the text keys, plus on every key (must be 1).
        img = TokenGroups.each(*site.image)
        return [Probe(img, TokenGroups.single(*site.text, site.seq_len), heads="keep"),
                Probe(img, TokenGroups.single(0, site.seq_len, site.seq_len), heads="keep")]

    capture = CapturePolicy(lambda s: s.layer == s.num_layers - 2, probes)
    out = _flux_call(model, capture, step=2, num_steps=5)
    assert list(capture.captured) == [(2, 0)]
    to_text, to_all = capture.captured[(2, 0)]
    assert to_text.shape == (1, 2, 12, 1)
    assert torch.allclose(to_all, torch.ones_like(to_all), atol=1e-5)
    assert (to_text > 0).all() and (to_text < 1).all()
    assert torch.equal(out, _flux_call(model))  # probing does not change the output


class ZeroHeads(AttentionPolicy):
    def __init__(self, kind):
        self.kind = kind

    def request(self, site):
        if site.block_kind == self.kind:
            return AttentionRequest(head_weights=torch.zeros(2))
        return None


def test_policy_requests_change_the_computation():
    model = FluxTransformer.random(FluxConfig.tiny(), seed=5)
    base = _flux_call(model)
    for kind in ("double", "single"):
        assert not torch.allclose(_flux_call(model, ZeroHeads(kind)), base), kind


def test_receive_can_replace_the_output():
    class Replace(AttentionPolicy):
        def request(self, site):
            return AttentionRequest()

        def receive(self, site, result):
            return torch.zeros_like(result.out)

    model = SD3Transformer.random(SD3Config.tiny(), seed=6)
    latents, text, pooled, t = sd3_inputs(model.config, rows=2, cols=3)
    with torch.no_grad():
        zeroed = model(latents, text, pooled, t, policy=Replace(), backend="reference")
        heads = model(latents, text, pooled, t, policy=_ZeroAll(), backend="reference")
    assert_close_rel(zeroed, heads, 1e-6, "zero output == zero head weights")


class _ZeroAll(AttentionPolicy):
    def request(self, site):
        return AttentionRequest(head_weights=torch.zeros(2))


def test_sdpa_baseline_matches_and_refuses_policies():
    model = FluxTransformer.random(FluxConfig.tiny(), seed=7)
    assert_close_rel(_flux_call(model, backend="sdpa"), _flux_call(model), 1e-5, "sdpa baseline")
    with pytest.raises(ValueError, match="cannot serve a policy"):
        _flux_call(model, RecordSites(), backend="sdpa")
    with pytest.raises(ValueError, match="backend must be one of"):
        _flux_call(model, backend="flash")


def test_triton_interpreter_equals_reference(device):
    """One tiny forward through the Triton kernels (interpreted on CPU, compiled on CUDA) with a probe attached."""
    model = FluxTransformer.random(FluxConfig.tiny(), seed=8, device=device)
    capture = {}
    for backend in ("reference", "triton"):
        policy = CapturePolicy(lambda s: s.block_kind == "double",
                               lambda s: [Probe(TokenGroups.each(*s.image), TokenGroups.single(*s.text, s.seq_len),
                                                heads="keep")])
        capture[backend] = (_flux_call(model, policy, backend=backend), policy.captured[(None, 0)][0])
    assert_close_rel(capture["triton"][0], capture["reference"][0], 1e-5, "triton forward")
    assert_close_rel(capture["triton"][1], capture["reference"][1], 1e-5, "triton probe")


def test_bad_inputs_are_named():
    model = FluxTransformer.random(FluxConfig.tiny())
    x, text, pooled, t, g = flux_inputs(model.config, batch=1, rows=2, cols=2)
    with pytest.raises(ValueError, match="x must have shape"):
        model(x[..., :8], text, pooled, t, img_ids=image_ids(2, 2), guidance=g)
    with pytest.raises(ValueError, match="img_ids / txt_ids must have 4 / 7 rows"):
        model(x, text, pooled, t, img_ids=image_ids(2, 3), guidance=g)
    with pytest.raises(ValueError, match="source and source_ids go together"):
        model(x, text, pooled, t, img_ids=image_ids(2, 2), guidance=g, source=x)
    with pytest.raises(ValueError, match="step must be"):
        model(x, text, pooled, t, img_ids=image_ids(2, 2), guidance=g, step=-1)
    with pytest.raises(TypeError, match="step must be an int >= 0 or None, got 1.5"):
        model(x, text, pooled, t, img_ids=image_ids(2, 2), guidance=g, step=1.5, num_steps=4)
    with pytest.raises(ValueError, match="step must be < num_steps, got step=4, num_steps=4"):
        model(x, text, pooled, t, img_ids=image_ids(2, 2), guidance=g, step=4, num_steps=4)
    sd3 = SD3Transformer.random(SD3Config.tiny())
    latents, stext, spooled, st = sd3_inputs(sd3.config, rows=2, cols=2)
    with pytest.raises(ValueError, match="multiples of patch_size=2"):
        sd3(latents[..., :3], stext, spooled, st)
    with pytest.raises(ValueError, match="exceeds pos_embed_max_size"):
        sd3(torch.randn(2, 4, 34, 4), stext, spooled, st)
    with pytest.raises(ValueError, match="batch sizes differ"):
        sd3(latents, stext[:1], spooled, st)
    with pytest.raises(ValueError, match="caption_projection_dim"):
        SD3Config.tiny(caption_projection_dim=40)
    with pytest.raises(ValueError, match="axes_dims_rope"):
        FluxConfig.tiny(axes_dims_rope=(4, 4, 4))


def test_time_and_guidance_take_any_real_scalar():
    """``t`` / ``guidance`` take every real scalar a float does: numpy scalars (a numpy schedule
    yields np.float32), 0-d arrays and 0-d tensors; bools, strings and bool tensors are refused."""
    model = FluxTransformer.random(FluxConfig.tiny())
    x, text, pooled, _, _ = flux_inputs(model.config, batch=1, rows=2, cols=2)
    ids = image_ids(2, 2)

    def flux(t, g):
        with torch.no_grad():
            return model(x, text, pooled, t, img_ids=ids, guidance=g, backend="reference")

    expected = flux(0.5, 3.0)
    for scalar in (np.float32, np.float64, np.array, torch.tensor):
        assert torch.equal(flux(scalar(0.5), scalar(3.0)), expected), scalar
    assert torch.equal(flux(0.5, np.int64(3)), expected)
    for bad in (True, np.bool_(True), "0.5", torch.tensor(True), np.array([0.5])):
        with pytest.raises(TypeError, match="^t must be a real number"):
            flux(bad, 3.0)
        with pytest.raises(TypeError, match="^guidance must be a real number"):
            flux(0.5, bad)
    sd3 = SD3Transformer.random(SD3Config.tiny())
    latents, stext, spooled, _ = sd3_inputs(sd3.config, batch=1, rows=2, cols=2)
    with torch.no_grad():
        assert torch.equal(sd3(latents, stext, spooled, np.float32(0.5), backend="reference"),
                           sd3(latents, stext, spooled, 0.5, backend="reference"))
        with pytest.raises(TypeError, match="^t must be a real number"):
            sd3(latents, stext, spooled, "0.5")


def test_sd3_width_must_divide_by_4():
    """The 2-D sin-cos position table needs a width divisible by 4: refused by the config, naming the
    fields and values, not a size mismatch deep in the forward pass."""
    message = r"num_attention_heads \* attention_head_dim must be divisible by 4 .*got 1 \* 6 = 6"
    with pytest.raises(ValueError, match=message):
        SD3Config.tiny(num_attention_heads=1, attention_head_dim=6)
    with pytest.raises(ValueError, match="got 3 \\* 2 = 6"):
        SD3Config.from_dict({**SD3Config.tiny().to_dict(), "num_attention_heads": 3, "attention_head_dim": 2,
                             "caption_projection_dim": 6})
    assert SD3Config.tiny(num_attention_heads=1, attention_head_dim=4).inner_dim == 4


def test_bench_constructor_keeps_real_dimensions():
    config = FluxConfig.dev(num_double=2, num_single=2)
    assert (config.num_layers, config.num_single_layers, config.inner_dim, config.num_attention_heads) == \
        (2, 2, 3072, 24)
    assert config.guidance_embeds and config.axes_dims_rope == (16, 56, 56)
    with torch.device("meta"):
        model = FluxTransformer(config)  # no memory: just count the parameters
    assert model.num_attention_layers == 4
    assert 0.9e9 < sum(p.numel() for p in model.parameters()) < 1.2e9


@pytest.mark.cuda
def test_flux_dev_size_bf16_on_cuda_runs():
    model = FluxTransformer.random(FluxConfig.dev(num_double=2, num_single=2), device="cuda", dtype=torch.bfloat16)
    x, text, pooled, t, g = flux_inputs(model.config, batch=1, rows=32, cols=32, num_text=64, device="cuda")
    with torch.no_grad():
        ours = model(x, text, pooled, t, img_ids=image_ids(32, 32, device="cuda"), guidance=g)
        base = model(x, text, pooled, t, img_ids=image_ids(32, 32, device="cuda"), guidance=g, backend="sdpa")
    assert torch.isfinite(ours).all()
    assert_close_rel(ours.float(), base.float(), 3e-2, "bf16 iidkern vs SDPA")


def test_capture_keeps_a_steps_first_forward_and_belongs_to_one_run():
    """True CFG runs two forwards a step: the first one's probes are kept (both are probed).
    A run's captures go when the steps go back or on reset (through a ChainPolicy too);
    without a step number the latest call's probes are kept."""
    import iidkern
    from iidkern.policy import AttentionSite, ChainPolicy, attend

    def probes(site):
        return [Probe(TokenGroups.each(*site.image), TokenGroups.each(*site.text), heads="keep")]
    capture = CapturePolicy(lambda s: True, probes)
    chain = ChainPolicy(capture)
    calls = {}

    def call(step, seed):
        q, k, v = (torch.randn(1, 9, 2, 8, generator=torch.Generator().manual_seed(seed + i)) for i in range(3))
        site = AttentionSite(block=0, block_kind="double", text=(0, 4), image=(4, 9), step=step, num_steps=5,
                             layer=0, num_layers=1)
        assert chain.request(site).probes  # every selected call is probed
        attend(q, k, v, site, chain, layout="bnhd", backend="reference")
        calls[seed] = iidkern.attention(q, k, v, layout="bnhd", probes=probes(site), backend="reference").probes[0]

    call(3, 10)
    call(3, 20)  # the negative prompt's forward of step 3
    assert torch.equal(capture.captured[(3, 0)][0], calls[10])
    call(4, 30)
    assert set(capture.captured) == {(3, 0), (4, 0)}
    call(0, 40)  # a new run
    assert set(capture.captured) == {(0, 0)} and torch.equal(capture.captured[(0, 0)][0], calls[40])
    chain.reset()
    assert capture.captured == {}
    call(None, 50)
    call(None, 60)
    assert torch.equal(capture.captured[(None, 0)][0], calls[60])
