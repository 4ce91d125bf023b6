"""A small model mixing Linear and Conv2d layers, the convert specs that put every option away from its default,
and helpers to save it and compare two of them: shared by the save/load, sampling, KL and export tests."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import assert_same_tensors, bayesian_state, randomize_bayesian_state

import bayeslayers

BF16, FP16 = torch.bfloat16, torch.float16


class Mixed(nn.Module):
    """Two Linear and two Conv2d layers of one shape each, a Linear without bias and a layer never converted."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.head = nn.Linear(6, 3, bias=False)
        self.conv1, self.conv2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.keep = nn.Linear(3, 3)

    def forward(self, x, image):
        h = self.head(F.gelu(self.b(F.gelu(self.a(x)))))
        return self.keep(h), self.conv2(torch.tanh(self.conv1(image)))


# (targets, options) per convert call; every option away from its default somewhere, alpha != rank.
SPECS = {
    "full": [
        (["a"], dict(prior_dtype=BF16, kl_direction="pq", prior_sigma=0.03)),
        (["b", "head", "conv1"], dict(prior_sigma=0.05)),
        (["conv2"], dict(prior_dtype=FP16, kl_direction="pq", prior_sigma=0.2)),
    ],
    "lora": [
        (["a"], dict(mode="lora", rank=2, lora_alpha=5, bayesian_factors="A", prior_dtype=BF16, kl_direction="pq")),
        (["b"], dict(mode="lora", rank=3, lora_alpha=1.5, bayesian_factors="B", prior_sigma=0.2)),
        (["conv1", "conv2"], dict(mode="lora", rank=2, lora_alpha=3, bayesian_factors="AB", prior_dtype=FP16)),
        (["head"], dict(mode="lora", rank=4, bayesian_factors="")),
    ],
    "mixed": [
        (["a", "conv1"], dict(prior_dtype=BF16, kl_direction="pq")),
        (["b"], dict(mode="lora", rank=2, lora_alpha=7, bayesian_factors="A", prior_sigma=0.3)),
        (["conv2"], dict(mode="lora", rank=3, lora_alpha=2, bayesian_factors="AB", kl_direction="pq")),
    ],
}


OTHER_DTYPE = {
    None: None,
    BF16: None,
    FP16: None,
}  # other stores: test_load_restores_the_saved_prior_whatever_dtype_the_model_stores_it_in


def other_options(options):
    """Same structure (mode, rank, factors), every other option different."""
    other = dict(
        options,
        prior_sigma=options.get("prior_sigma", 0.01) * 3 + 0.01,
        init_sigma=0.1,
        kl_direction="qp" if options.get("kl_direction") == "pq" else "pq",
        prior_dtype=OTHER_DTYPE[options.get("prior_dtype")],
    )
    if other.get("mode") == "lora":
        other["lora_alpha"] = options.get("lora_alpha", options["rank"]) + 1.25
    return other


def convert_spec(model, spec, other=False):
    for targets, options in spec:
        bayeslayers.convert(model, target_modules=targets, **(other_options(options) if other else options))
    return model


def mixed_inputs(seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 6, generator=g), torch.randn(2, 3, 5, 5, generator=g)


def mixed_outputs(model, inputs):
    with torch.no_grad():
        return torch.cat([y.flatten() for y in model(*inputs)])


def saved_model(spec, tmp_path, seed=1):
    model = randomize_bayesian_state(convert_spec(Mixed(), spec), seed)
    path = tmp_path / "posterior.safetensors"
    bayeslayers.save(model, path, metadata={"note": "round trip"})
    return model, path


def assert_same_model(restored, saved):
    """Bayesian tensors, options, eval output, a fixed-seed sample and the KL all equal, bit for bit."""
    (tensors, options), (expected_tensors, expected_options) = bayesian_state(restored), bayesian_state(saved)
    assert_same_tensors(tensors, expected_tensors)
    assert options == expected_options
    for (name, layer), (_, expected) in zip(
        bayeslayers.posterior_layers(restored), bayeslayers.posterior_layers(saved)
    ):
        assert (layer.prior_sigma, layer.kl_direction, layer.layer_id) == (
            expected.prior_sigma,
            expected.kl_direction,
            expected.layer_id,
        ), name
    for (name, module), (_, expected) in zip(
        bayeslayers.bayesian_modules(restored), bayeslayers.bayesian_modules(saved)
    ):
        assert type(module) is type(expected), name
        assert getattr(module, "scaling", None) == getattr(expected, "scaling", None), name
    restored.eval(), saved.eval()
    inputs = mixed_inputs()
    torch.testing.assert_close(mixed_outputs(restored, inputs), mixed_outputs(saved, inputs), rtol=0, atol=0)
    with bayeslayers.sampling(restored, seed=5), bayeslayers.sampling(saved, seed=5):
        torch.testing.assert_close(mixed_outputs(restored, inputs), mixed_outputs(saved, inputs), rtol=0, atol=0)
    torch.testing.assert_close(bayeslayers.kl_loss(restored), bayeslayers.kl_loss(saved), rtol=0, atol=0)
