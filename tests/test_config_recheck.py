"""A config field assigned a bad value after construction is caught where a policy or a
pipeline takes the config (before any sampling), with the constructor's error."""
import pytest
import torch

from iidkern.edit.headrouter import HeadRouterConfig, HeadRouterPolicy
from iidkern.edit.iid import IIDConfig, IIDMapPolicy, IIDMaskPolicy, IIDPolicy
from iidkern.edit import pipeline
from iidkern.edit.inversion import RFInversionConfig


def _spoiled(cls, **fields):
    cfg = cls()
    for name, value in fields.items():
        setattr(cfg, name, value)  # no check at assignment: plain dataclasses
    return cfg


@pytest.mark.parametrize("make", [
    lambda cfg: IIDMapPolicy([(0, 2), (2, 4)], (2, 2), cfg),
    lambda cfg: IIDMaskPolicy([(0, 2), (2, 4)], torch.ones(2, 4, dtype=torch.bool), cfg),
    lambda cfg: IIDPolicy([(0, 2), (2, 4)], (2, 2), cfg),
], ids=["map", "mask", "iid"])
def test_iid_policies_check_a_config_changed_after_construction(make):
    with pytest.raises(ValueError, match="IIDConfig: sigma"):
        make(_spoiled(IIDConfig, sigma=-3.0))
    with pytest.raises(TypeError, match="config must be an instance of IIDConfig"):
        make(HeadRouterConfig())
    related = IIDConfig(map_step=10, mask_until=20)
    related.map_step, related.mask_until = 30, 40  # fields that must agree, changed one at a time
    assert make(related).config is related  # the instance itself, not a copy


def test_headrouter_policy_checks_a_config_changed_after_construction():
    with pytest.raises(ValueError, match="HeadRouterConfig: alpha must be > 0"):
        HeadRouterPolicy(_spoiled(HeadRouterConfig, alpha=-1.0))
    with pytest.raises(ValueError, match="distinct rows"):
        HeadRouterPolicy(_spoiled(HeadRouterConfig, pairs=((1, 1),)))
    with pytest.raises(TypeError, match="HeadRouterPolicy: config must be"):
        HeadRouterPolicy(IIDConfig())


def test_pipelines_check_their_configs_before_sampling():
    """(The checks run before the model is touched: a None model is never reached.)"""
    with pytest.raises(ValueError, match="RFInversionConfig: eta"):
        pipeline._check_config(_spoiled(RFInversionConfig, eta=1.5), RFInversionConfig, "inversion")
    with pytest.raises(ValueError, match="IIDConfig: threshold"):
        pipeline._check_config(_spoiled(IIDConfig, threshold="mean"), IIDConfig)
    with pytest.raises(TypeError, match="inversion must be an instance of RFInversionConfig"):
        pipeline._check_config(IIDConfig(), RFInversionConfig, "inversion")
