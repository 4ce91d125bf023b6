"""The extension points. register_layer_type: a user-defined layer type converts, saves and loads; the latest
registration for equally specific sources wins, a more specific source over a later, more general one.
register_backend: ``auto`` follows the priorities backends claim per device type (the user-defined backend of
``reference.py`` passes the layer-vs-float64 tests in test_layers.py)."""

import warnings

import pytest
import torch
import torch.nn as nn
from reference import UserBackend

import bayeslayers
import bayeslayers.backends as backends
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


@pytest.fixture
def backend_table(monkeypatch):
    """The backend table, restored after the test."""
    monkeypatch.setattr(backends, "BACKENDS", dict(backends.BACKENDS))
    monkeypatch.setattr(backends, "BACKEND_CHOICES", backends.BACKEND_CHOICES)
    monkeypatch.setattr(backends, "_warned", set())
    return backends.BACKENDS


def claiming(priorities, reason="", name="claimer"):
    return type(
        "Claimer", (UserBackend,), {"name": name, "priorities": priorities, "unavailable_reason": lambda *_: reason}
    )()


def test_auto_takes_the_highest_usable_claim_for_the_device(backend_table):
    cpu = torch.device("cpu")
    bayeslayers.set_backend("auto")
    assert backends.resolve_backend(cpu).name == "cpp"
    bayeslayers.register_backend(claiming({"cpu": 50}))  # below cpp's claim
    assert backends.resolve_backend(cpu).name == "cpp"
    bayeslayers.register_backend(claiming({"cpu": 100}))  # equal to cpp's, registered later: taken
    assert backends.resolve_backend(cpu).name == "claimer"
    layer = BayesLinear(5, 4).train()
    layer(torch.randn(3, 5)).sum().backward()  # runs on it under auto
    assert layer.weight_rho.grad is not None
    assert backends.resolve_backend(torch.device("meta")).name == "torch"  # claimed by torch's "*" only

    bayeslayers.register_backend(claiming({"cpu": 500}, reason="no such card", name="card"))
    with pytest.warns(UserWarning, match="using the 'claimer' backend on cpu: no such card"):
        assert backends.resolve_backend(cpu).name == "claimer"
    bayeslayers.set_backend("card")
    with pytest.raises(RuntimeError, match="backend 'card' cannot run on device cpu: no such card"):
        backends.resolve_backend(cpu)
    bayeslayers.set_backend(None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve_backend(cpu).name == "claimer"  # warned once


def test_register_backend_checks_what_it_is_given(backend_table):
    with pytest.raises(TypeError, match="backend must be a bayeslayers.backends.Backend"):
        bayeslayers.register_backend("cpp")
    with pytest.raises(ValueError, match="backend.name must be an identifier other than 'auto'"):
        bayeslayers.register_backend(claiming({}, name="auto"))
    with pytest.raises(TypeError, match="backend.priorities must map device types to int priorities"):
        bayeslayers.register_backend(claiming({"cpu": "high"}))
    with pytest.raises(ValueError, match="backend must be one of .*'user'"):
        bayeslayers.set_backend("nope")
