"""The interface every backend implements, and the shared implementation of the kernel backends."""

from __future__ import annotations

import torch

import bayeslayers.kernels as kernels  # cheap: its names load on first use


class Backend:
    """Computes ``(y, kl)`` for y = layer_map(x, mu + softplus(rho) * eps, bias) and the summed closed-form KL.

    Tensors: x in the compute dtype; the :class:`~bayeslayers.kernels.Posterior` holds mu, rho (fp32
    parameters, weight-shaped) and prior_mu (any float dtype, weight-shaped, or None for a zero-mean prior);
    bias in the compute dtype or None. kl is a 0-d fp32 tensor (nats, summed over the weight's elements).
    """

    name = "base"
    # What the backend claims under 'auto': device type ("*": any) -> priority, the highest available one serves
    # the device; a device type it does not name (and no "*") never gets it from 'auto'.
    priorities: dict[str, int] = {}

    def priority(self, device_type: str) -> int | None:
        """The priority this backend claims for ``device_type`` under 'auto', or None."""
        return self.priorities.get(device_type, self.priorities.get("*"))

    def is_available(self, device: torch.device) -> bool:
        return self.unavailable_reason(device) == ""

    def unavailable_reason(self, device: torch.device) -> str:
        return ""

    def layer_seed(self, layer_id: int, device: torch.device) -> torch.Tensor:
        """A fresh seed (one-element int64 tensor on ``device``) for one sampling forward of layer ``layer_id``:
        a draw from ``device``'s default generator mixed with the id, so ``torch.manual_seed`` reproduces it."""
        return kernels.device_layer_seed(layer_id, device)

    def noise(self, seed, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The float32 eps this backend draws for (seed, shape) on ``device``."""
        raise NotImplementedError

    def apply(self, layer_map, x, posterior, bias, seed):
        raise NotImplementedError

    def sample_weight(self, posterior, seed, dtype: torch.dtype):
        """``(w, kl)``: the weight sample mu + softplus(rho) * eps(seed) in ``dtype`` and the summed KL, both
        differentiable w.r.t. mu and rho."""
        raise NotImplementedError

    def fuses_lora(self, device: torch.device) -> bool:
        """True when :meth:`lora_linear` runs the base GEMM and the adapter as one kernel on ``device``."""
        return False

    def lora_linear(self, x, w, bias, a, b, scaling: float):
        """y = x @ w^T + scaling * (x @ a^T) @ b^T + bias, all in x's dtype (see :meth:`fuses_lora`)."""
        raise NotImplementedError(f"backend {self.name!r} has no fused LoRA")


class KernelBackend(Backend):
    """A backend made of :class:`~bayeslayers.kernels.PosteriorKernels` under the one autograd seam: the weight
    is sampled in one pass and regenerated from the seed in backward (only x and the seed are saved)."""

    def kernels(self):
        """The backend's :class:`~bayeslayers.kernels.PosteriorKernels`."""
        raise NotImplementedError

    def weight_path(self, layer_map, x, posterior, bias, seed):
        """The :class:`~bayeslayers.kernels.WeightPath` this call takes: sample-then-map over :meth:`kernels` (the
        Triton backend chooses among its fused paths)."""
        if "_sample_then_map" not in self.__dict__:  # one instance: compiled graphs guard on it
            self._sample_then_map = kernels.SampleThenMap(self.kernels())
        return self._sample_then_map

    def apply(self, layer_map, x, posterior, bias, seed):
        path = self.weight_path(layer_map, x, posterior, bias, seed)
        return kernels.reparameterize(layer_map, x, posterior, bias, seed, path)

    def sample_weight(self, posterior, seed, dtype):
        return kernels.sample_weight(posterior, seed, dtype, self.kernels())
