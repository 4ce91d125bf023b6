"""diagnostics: summary values per posterior and saved_tensor_bytes."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mixed_model import (
    SPECS,
    Mixed,
    convert_spec,
)
from reference import (
    kl_reference,
    randomize_bayesian_state,
)

import bayeslayers


# diagnostics.summary
def test_summary_values_per_posterior_including_lora_factors():
    model = randomize_bayesian_state(convert_spec(Mixed(), SPECS["mixed"]), seed=9)
    rows = bayeslayers.summary(model)
    layers = bayeslayers.posterior_layers(model)
    assert (
        [r.name for r in rows] == [n for n, _ in layers] == ["a", "b.lora_A", "conv1", "conv2.lora_A", "conv2.lora_B"]
    )
    for row, (_, layer) in zip(rows, layers):
        mu, sigma = layer.weight_mu.detach().double(), F.softplus(layer.weight_rho.detach().double())
        assert row.shape == tuple(mu.shape) and row.numel == mu.numel()
        assert row.mean_sigma == pytest.approx(float(sigma.mean()), rel=1e-5)
        kl = kl_reference(mu, layer.weight_rho.detach(), layer.prior_mu, layer.prior_sigma, layer.kl_direction)
        assert row.kl == pytest.approx(float(kl), rel=1e-5)
        assert row.snr == pytest.approx(float((mu.abs() / sigma).mean()), rel=1e-5)
    assert not any(layer.weight_mu.grad is not None for _, layer in layers)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        bayeslayers.summary(model)
    assert packed == []  # statistics only: no autograd graph is built
    assert rows.as_dicts()[2] == {
        "name": "conv1",
        "shape": (3, 3, 3, 3),
        "numel": 81,
        "mean_sigma": rows[2].mean_sigma,
        "kl": rows[2].kl,
        "snr": rows[2].snr,
    }
    text = str(rows).splitlines()
    assert text[0].split() == ["layer", "shape", "params", "mean", "sigma", "KL", "|mu|/sigma"]
    assert len(text) == 2 + len(rows) + 1 and set(text[1]) == {"-"}
    assert len({len(line) for line in text[:-1]}) == 1  # header, rule and rows: one column layout
    assert " (3, 3, 3, 3) " in text[4] and " (6, 6) " in text[2]
    assert text[2].split()[0] == "a" and text[2].split()[-4] == "36"
    assert f"{rows[0].mean_sigma:.3e}" in text[2] and f"{rows[0].kl:.4e}" in text[2] and f"{rows[0].snr:.3f}" in text[2]
    total_kl = sum(r.kl for r in rows)
    assert text[-1] == f"5 Bayesian layers, {sum(r.numel for r in rows)} Bayesian weights, total KL {total_kl:.4e}"


class _Square(nn.Module):
    def forward(self, x):
        return x * x  # autograd saves x twice: one storage


def test_saved_tensor_bytes_counts_each_storage_once_and_nothing_else():
    x = torch.randn(5, 4, requires_grad=True)
    assert bayeslayers.saved_tensor_bytes(_Square(), x) == 5 * 4 * 4
    assert bayeslayers.saved_tensor_bytes(nn.Linear(4, 3), x) == 5 * 4 * 4  # x; the weight is the module's own
    assert bayeslayers.saved_tensor_bytes(nn.Linear(4, 3).requires_grad_(False), x.detach()) == 0
