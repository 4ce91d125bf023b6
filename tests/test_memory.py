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


@pytest.mark.parametrize("direction", ["qp", "pq"])
@pytest.mark.parametrize("kernels_name", ["torch", "cpp"])
def test_gradient_pass_over_a_temporary_d_w_gives_the_same_values_in_less_memory(kernels_name, direction):
    """d_mu written over the temporary dW (what a layer's backward asks for): the same d_mu, d_rho and w as a
    fresh d_mu, one weight-sized buffer fewer; the plain-torch pass keeps at most 6 weights' worth alive."""
    from bayeslayers.kernels import seed_tensor
    from bayeslayers.kernels.cpu import CPU_KERNELS
    from bayeslayers.kernels.posterior import Posterior
    from bayeslayers.kernels.torch_impl import TORCH_KERNELS
    from benchmarks.measure import peak_bytes

    kernels = {"torch": TORCH_KERNELS, "cpp": CPU_KERNELS}[kernels_name]
    g = torch.Generator().manual_seed(1)
    mu = 0.1 * torch.randn(301, 257, generator=g)
    rho = torch.empty_like(mu).uniform_(-6, 0, generator=g)
    posterior = Posterior(mu, rho, mu + 0.01 * torch.randn(mu.shape, generator=g), 0.02, direction)
    d_w, g_kl, seed = torch.randn(mu.shape, generator=g), torch.tensor(0.37), seed_tensor(11, torch.device("cpu"))
    expected = kernels.reparameterization_grad(posterior, seed, d_w, g_kl, torch.float32)
    temporary = d_w.clone()
    got = kernels.reparameterization_grad(posterior, seed, temporary, g_kl, torch.float32, d_w_is_temporary=True)
    assert got[0].data_ptr() == temporary.data_ptr()
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    weight_bytes, cpu = mu.numel() * 4, torch.device("cpu")
    fresh = peak_bytes(lambda: kernels.reparameterization_grad(posterior, seed, d_w, g_kl, torch.float32), cpu)
    temporary = d_w.clone()
    in_place = peak_bytes(
        lambda: kernels.reparameterization_grad(posterior, seed, temporary, g_kl, torch.float32, d_w_is_temporary=True),
        cpu,
    )
    assert in_place <= fresh - weight_bytes
    if kernels_name == "torch":
        assert fresh <= 6 * weight_bytes + 4096
