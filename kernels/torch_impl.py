"""The posterior kernels in plain torch (``bayeslayers::torch_*``): runs on any device torch supports.

eps comes from torch's own generator seeded with the layer's seed (a stream of its own, not the Philox one of
the Triton and C++ kernels); the gradient pass regenerates it, so nothing but the seed is kept for backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernel_ops import register_posterior_kernels
from .posterior import kl_elementwise, kl_grad_mu, kl_grad_sigma
from .seeds import seed_tensor


def torch_normal(seed, shape, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal float32 tensor of ``shape``: a pure function of ``(seed, shape, device type)``.

    seed: a Python int or a one-element int64 tensor (read on the host)."""
    device = torch.device(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed_tensor(seed, torch.device("cpu")).item()) & ((1 << 64) - 1))
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)


@torch.library.custom_op("bayeslayers::torch_normal", mutates_args=())
def torch_normal_op(seed: torch.Tensor, shape: list[int], device: torch.device) -> torch.Tensor:
    """:func:`torch_normal` as an operator (an opaque call under torch.compile: its generator stays eager)."""
    return torch_normal(seed, shape, device)


@torch_normal_op.register_fake
def _(seed, shape, device):
    return torch.empty(shape, dtype=torch.float32, device=device)


def _sample(mu, rho, seed):
    sigma = F.softplus(rho)
    return torch.addcmul(mu, sigma, torch_normal(seed, mu.shape, mu.device).to(mu.dtype)), sigma


def sample_weight_and_kl(
    mu, rho, prior_mu, seed, prior_sigma: float, kl_direction: str, out_dtype: torch.dtype, with_kl: bool = True
):
    """``(w in out_dtype, kl 0-d or empty)`` on any device; kl in mu's dtype (float32, or float64 for gradcheck)."""
    w, sigma = _sample(mu, rho, seed)
    if not with_kl:
        return w.to(out_dtype), mu.new_empty(0, dtype=torch.float32)
    return w.to(out_dtype), kl_elementwise(mu, sigma, prior_mu, prior_sigma, kl_direction).sum()


def reparameterization_grad(
    d_w,
    mu,
    rho,
    prior_mu,
    seed,
    g_kl,
    prior_sigma: float,
    kl_direction: str,
    w_dtype: torch.dtype | None = None,
    d_mu: torch.Tensor | None = None,
):
    """``(d_mu, d_rho, w or None)``: d_mu = dW + g_kl dKL/dmu, d_rho = (dW eps + g_kl dKL/dsigma) sigmoid(rho).

    Each temporary is freed or overwritten as soon as it is used: besides the outputs and sigma, at most two
    weight-sized temporaries are alive at once. ``d_mu``: None, or ``d_w`` itself (mu's dtype) to write d_mu over
    it."""
    if d_mu is not None and d_mu is not d_w:
        raise ValueError("d_mu must be None or d_w itself")
    over_d_w = d_mu is not None
    sigma = F.softplus(rho)
    d_mu = d_sigma = w = None
    if d_w is not None or w_dtype is not None:
        eps = torch_normal(seed, mu.shape, mu.device).to(mu.dtype)
        if w_dtype is not None:
            w = torch.addcmul(mu, sigma, eps).to(w_dtype)
        if d_w is not None:
            d_mu = d_w if over_d_w else d_w.to(mu.dtype, copy=True)
            d_sigma = eps.mul_(d_mu)
        del eps
    if g_kl is not None:
        g_kl = g_kl.to(mu.dtype)
        g_mu = kl_grad_mu(mu, sigma, prior_mu, prior_sigma, kl_direction).mul_(g_kl)
        d_mu = g_mu if d_mu is None else d_mu.add_(g_mu)
        del g_mu
        g_sigma = kl_grad_sigma(mu, sigma, prior_mu, prior_sigma, kl_direction).mul_(g_kl)
        d_sigma = g_sigma if d_sigma is None else d_sigma.add_(g_sigma)
        del g_sigma
    del sigma
    if d_mu is None:  # neither a weight gradient nor a KL one
        d_mu, d_sigma = torch.zeros_like(mu), torch.zeros_like(mu)
    return d_mu, d_sigma.mul_(torch.sigmoid(rho)), w


TORCH_KERNELS = register_posterior_kernels(
    "torch_",
    sample_weight_and_kl,
    reparameterization_grad,
    grad_into_d_w=True,
    param_dtypes=(torch.float32, torch.float64),  # float64: gradcheck
)
