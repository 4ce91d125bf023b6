"""Bytes saved for backward (activations only: parameters and buffers excluded)."""

import pytest
import torch
import torch.nn as nn

import bayeslayers
from bayeslayers import saved_tensor_bytes

CASES = [
    (nn.Linear(320, 320), (64, 320)),
    (nn.Linear(64, 48), (4, 4, 64)),
    (nn.Conv2d(32, 64, 3, padding=1), (2, 32, 16, 16)),
]


def _bayesian(plain):
    return (bayeslayers.BayesLinear if isinstance(plain, nn.Linear) else bayeslayers.BayesConv2d).from_module(plain)


@pytest.mark.parametrize(("plain", "shape"), CASES)
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_kernel_backends_save_only_the_input_and_a_seed(backend, plain, shape):
    bayeslayers.set_backend(backend)
    x = torch.randn(*shape, requires_grad=True)
    assert saved_tensor_bytes(_bayesian(plain), x) - saved_tensor_bytes(plain, x) <= 8  # one int64 seed


@pytest.mark.parametrize(("plain", "shape"), CASES)
def test_reference_backend_keeps_eps_sigma_and_the_sample(plain, shape):
    bayeslayers.set_backend("reference")
    x = torch.randn(*shape, requires_grad=True)
    weight_bytes = plain.weight.numel() * 4
    assert saved_tensor_bytes(_bayesian(plain), x) - saved_tensor_bytes(plain, x) >= 2 * weight_bytes
