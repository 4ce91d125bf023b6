"""register_layer_type: a user-defined layer type converts, exports, saves and loads; the latest registration for
equally specific sources wins, a more specific source wins over a later, more general one."""

import pytest
import torch
import torch.nn as nn

import bayeslayers
from bayeslayers import BayesLinear, registry


class ScaledBayesLinear(BayesLinear):
    """A user's Bayesian Linear: the output scaled by a fixed factor taken at conversion."""

    def __init__(self, *args, scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = scale

    @classmethod
    def from_module(cls, module, *, init_sigma=0.01, **options):
        layer = super().from_module(module, init_sigma=init_sigma, **options)
        layer.__class__ = cls
        layer.scale = 2.0
        return layer

    def forward(self, x):
        return super().forward(x) * self.scale


@pytest.fixture
def types(monkeypatch):
    """The registry's table, restored after the test."""
    monkeypatch.setattr(registry, "_TYPES", dict(registry._TYPES))
    return registry._TYPES


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_a_later_registration_for_the_same_source_takes_precedence(types, tmp_path):
    bayeslayers.register_layer_type("scaled_linear", "full", nn.Linear, ScaledBayesLinear, ("init_sigma",))
    net = bayeslayers.convert(model(), target_modules=["0"], init_sigma=0.02)
    assert type(net[0]) is ScaledBayesLinear and net[0].weight_sigma.mean().item() == pytest.approx(0.02)
    x = torch.randn(4, 6)
    plain = model()
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), plain[2](plain[1](2.0 * plain[0](x))))

    bayeslayers.save(net, tmp_path / "scaled.safetensors")
    assert bayeslayers.read_metadata(tmp_path / "scaled.safetensors")["layers"]["0"]["type"] == "scaled_linear"
    loaded = bayeslayers.load(model(), tmp_path / "scaled.safetensors")
    assert type(loaded[0]) is ScaledBayesLinear

    bayeslayers.register_layer_type("linear", "full", nn.Linear, BayesLinear)  # registered again: latest again
    assert type(bayeslayers.convert(model(), target_modules=["0"])[0]) is BayesLinear


def test_a_more_specific_source_wins_over_a_later_general_one(types):
    class Projection(nn.Linear):
        pass

    bayeslayers.register_layer_type("scaled_projection", "full", Projection, ScaledBayesLinear, ())
    bayeslayers.register_layer_type("scaled_linear", "full", nn.Linear, BayesLinear, ())
    net = nn.Sequential(Projection(4, 4), nn.Linear(4, 4))
    bayeslayers.convert(net, target_modules=["0", "1"])
    assert type(net[0]) is ScaledBayesLinear and type(net[1]) is BayesLinear
