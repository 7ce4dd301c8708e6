"""The IID and HeadRouter policies through the diffusers backend (iidkern's processors)."""
import pytest
import torch

pytest.importorskip("diffusers")

from iidkern.edit.headrouter import HeadRouterConfig, HeadRouterPolicy  # noqa: E402
from iidkern.edit.iid import IIDMaskPolicy  # noqa: E402
from iidkern.integrations.diffusers import use_iidkern  # noqa: E402
from iidkern.mmdit.flux import FluxConfig, image_ids, text_ids  # noqa: E402
from iidkern.mmdit.testing import diffusers_flux  # noqa: E402


def _inputs(cfg, grid=(4, 6), num_text=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, grid[0] * grid[1], cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, num_text, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.6]), img_ids=image_ids(*grid), txt_ids=text_ids(num_text),
                guidance=torch.tensor([3.5]), return_dict=False)


@torch.no_grad()
def test_iid_masks_contain_instructions_in_diffusers_flux():
    cfg = FluxConfig.tiny(num_single_layers=0)  # one double block: influence can only travel through P_i
    model = diffusers_flux(cfg, seed=1)
    masks = torch.zeros(2, 24, dtype=torch.bool)
    masks[0, :10], masks[1, 8:18] = True, True
    inputs = _inputs(cfg)
    moved = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
    moved["encoder_hidden_states"][:, 3:6] += 1.0  # perturb P_1
    with use_iidkern(model, policy=IIDMaskPolicy([(0, 3), (3, 6)], masks), backend="reference") as handle:
        handle.set_step(5, 8)
        base, after = model(**inputs)[0], model(**moved)[0]
    only0 = torch.zeros(24, dtype=torch.bool)
    only0[:8] = True
    assert torch.allclose(base[0, only0], after[0, only0], atol=1e-5)
    assert not torch.allclose(base[0, masks[1]], after[0, masks[1]], atol=1e-4)


@torch.no_grad()
def test_headrouter_routes_the_edit_row_in_diffusers_flux():
    """Two identical rows: routing scales only the edit row, so the rows part ways."""
    cfg = FluxConfig.tiny()
    model = diffusers_flux(cfg, seed=2)
    one = _inputs(cfg)
    two = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) and k not in ("img_ids", "txt_ids") else v)
           for k, v in one.items()}
    policy = HeadRouterPolicy(HeadRouterConfig(dtr_image="off"))
    with use_iidkern(model, policy=policy, backend="reference") as handle:
        handle.set_step(0, 4)
        out = model(**two)[0]
    plain = model(**one)[0]
    assert torch.allclose(out[0], plain[0], atol=1e-4)  # the reconstruction row is the plain model
    assert not torch.allclose(out[1], out[0], atol=1e-3)
    assert set(policy.last_router_weights) == {("double", 0), ("single", 0)}
