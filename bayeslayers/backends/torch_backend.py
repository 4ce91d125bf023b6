"""Torch backend: the one autograd seam over kernels written in plain torch (``bayeslayers.kernels.torch_impl``).

Forward draws eps from the seed with torch's generator, forms w = mu + softplus(rho) * eps in the compute dtype,
applies the layer map and sums the closed-form KL. Backward regenerates the same eps and forms

    d_mu  = dW + g_kl * dKL/dmu
    d_rho = (dW * eps + g_kl * dKL/dsigma) * sigmoid(rho)

so eps, sigma and w never stay alive between forward and backward. Runs on any device.
"""

from __future__ import annotations

from .base import KernelBackend, kernels_module


class TorchBackend(KernelBackend):
    name = "torch"

    def kernels(self):
        return kernels_module().TORCH_KERNELS

    def noise(self, seed, shape, device):
        return kernels_module().torch_normal(seed, shape, device)
