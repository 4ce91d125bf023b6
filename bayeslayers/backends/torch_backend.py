"""Torch backend: a custom autograd Function that stores only the input and a seed.

Forward draws eps from the seed, forms w = mu + softplus(rho) * eps in the compute dtype, applies the op and
sums the closed-form KL. Backward regenerates the same eps, rebuilds w for the input gradient and forms

    d_mu  = dW + g_kl * dKL/dmu
    d_rho = (dW * eps + g_kl * dKL/dsigma) * sigmoid(rho)

so eps, sigma and w never stay alive between forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kl import kl_elementwise, kl_grads
from .base import Backend


class ReparameterizedOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mu, rho, bias, prior_mu, op, prior_sigma, kl_direction, seed, noise):
        eps = noise(seed, tuple(mu.shape), mu.device).to(mu.dtype)
        sigma = F.softplus(rho)
        weight = torch.addcmul(mu, sigma, eps).to(x.dtype)
        del eps
        y = op.forward(x, weight, bias)
        kl = kl_elementwise(mu, sigma, prior_mu, prior_sigma, kl_direction).sum()
        ctx.save_for_backward(x, mu, rho, prior_mu)
        ctx.config = (op, prior_sigma, kl_direction, seed, noise, bias is not None)
        ctx.set_materialize_grads(False)
        return y, kl

    @staticmethod
    def backward(ctx, dy, dkl):
        x, mu, rho, prior_mu = ctx.saved_tensors
        op, prior_sigma, kl_direction, seed, noise, has_bias = ctx.config
        need_x, need_mu, need_rho, need_bias = ctx.needs_input_grad[:4]
        need_weight = need_mu or need_rho
        dx = d_mu = d_rho = d_bias = None
        eps = sigma = None
        if dy is not None and (need_x or need_weight or need_bias):
            eps = noise(seed, tuple(mu.shape), mu.device).to(mu.dtype)
            sigma = F.softplus(rho)
            weight = torch.addcmul(mu, sigma, eps).to(x.dtype)
            dx, d_weight, d_bias = op.backward(dy, x, weight, (need_x, need_weight, need_bias and has_bias))
            del weight
            if need_weight:
                d_weight = d_weight.to(mu.dtype)
                d_mu = d_weight
                d_sigma = d_weight * eps
        if dkl is not None and need_weight:
            sigma = F.softplus(rho) if sigma is None else sigma
            g_mu, g_sigma = kl_grads(mu, sigma, prior_mu, prior_sigma, kl_direction)
            dkl = dkl.to(mu.dtype)
            d_mu = g_mu * dkl if d_mu is None else d_mu.add_(g_mu * dkl)
            d_sigma = g_sigma * dkl if eps is None else d_sigma.add_(g_sigma * dkl)
        if need_rho and d_mu is not None:
            d_rho = d_sigma.mul_(torch.sigmoid(rho))
        return dx, d_mu if need_mu else None, d_rho, d_bias, None, None, None, None, None, None


class TorchBackend(Backend):
    name = "torch"

    def apply(self, op, x, mu, rho, bias, prior_mu, prior_sigma, kl_direction, seed):
        return ReparameterizedOp.apply(x, mu, rho, bias, prior_mu, op, prior_sigma, kl_direction, seed, self.noise)
