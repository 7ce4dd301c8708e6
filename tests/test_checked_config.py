"""Config dataclasses check a field assigned after construction as their constructor does."""
import pytest

from iidkern.edit.headrouter import HeadRouterConfig
from iidkern.edit.iid import IIDConfig
from iidkern.edit.inversion import RFInversionConfig
from iidkern.mmdit.flux import FluxConfig
from iidkern.mmdit.sd3 import SD3Config

# (config, field, a bad value, the error, a part of its message, a good value, what it is stored as)
CASES = [
    (HeadRouterConfig, "upsilon", "5", TypeError, "upsilon", 3, 3.0),
    (HeadRouterConfig, "alpha", -1.0, ValueError, "alpha must be > 0", 5, 5.0),
    (HeadRouterConfig, "pairs", ((1, 1),), ValueError, "distinct rows", [[2, 3]], ((2, 3),)),
    (HeadRouterConfig, "dtr_map", "next", ValueError, "dtr_map", "previous", "previous"),
    (IIDConfig, "sigma", -3.0, ValueError, "sigma", 2, 2.0),
    (IIDConfig, "threshold", "mean", ValueError, "threshold", "fixed", "fixed"),
    (RFInversionConfig, "eta", 1.5, ValueError, "eta", 0.25, 0.25),
    (FluxConfig, "axes_dims_rope", (16, 56, 57), ValueError, "axes_dims_rope", [32, 48, 48], (32, 48, 48)),
    (SD3Config, "qk_norm", "layer_norm", ValueError, "qk_norm", "rms_norm", "rms_norm"),
]


@pytest.mark.parametrize("cls, field, bad, error, words, good, stored", CASES,
                         ids=[f"{c[0].__name__}.{c[1]}" for c in CASES])
def test_assignment_is_checked_and_a_bad_value_leaves_the_config_unchanged(cls, field, bad, error, words, good,
                                                                          stored):
    cfg = cls()
    before = cls()
    with pytest.raises(error, match=words):
        setattr(cfg, field, bad)
    assert cfg == before  # the failed assignment changed nothing
    setattr(cfg, field, good)
    assert getattr(cfg, field) == stored and type(getattr(cfg, field)) is type(stored)


def test_a_consistent_change_spanning_fields_goes_through_a_constructor():
    # Each assignment is checked against the other fields as they are: a head dim that no
    # longer matches the rope axes is refused; changing both at once is dataclasses.replace.
    import dataclasses
    cfg = FluxConfig(attention_head_dim=32, axes_dims_rope=(8, 12, 12), num_attention_heads=2)
    with pytest.raises(ValueError, match="sum to attention_head_dim=64"):
        cfg.attention_head_dim = 64
    assert cfg.attention_head_dim == 32
    wider = dataclasses.replace(cfg, attention_head_dim=64, axes_dims_rope=(16, 24, 24))
    assert wider.inner_dim == 128 and cfg.inner_dim == 64


def test_other_attributes_and_construction_are_not_affected():
    cfg = IIDConfig(sigma=0)
    assert cfg.sigma == 0.0 and isinstance(cfg.sigma, float)  # normalized by the constructor
    cfg.note = "anything"  # not a field: stored as is
    assert cfg.note == "anything"
    assert repr(IIDConfig()) == repr(IIDConfig()) and "_checked" not in repr(cfg)


def test_copies_keep_checking():
    import copy
    import pickle
    cfg = HeadRouterConfig(alpha=5)
    for other in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):
        assert other == cfg
        with pytest.raises(ValueError, match="alpha must be > 0"):
            other.alpha = 0
