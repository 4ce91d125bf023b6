"""Gaussian mean-field posterior over one weight tensor, shared by every Bayesian layer type."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from bayeslayers.kernels.posterior import Posterior

from ..backends import resolve_backend
from ..config import DEFAULTS, PRIOR_DTYPES, check_bool, check_choice, check_positive, dtype_from_name, dtype_name
from ..kl import KL_DIRECTIONS, kl_elementwise
from ..rng import unnamed_layer_id


def inverse_softplus(sigma: float) -> float:
    """rho such that softplus(rho) == sigma (stable for small sigma)."""
    return sigma + math.log(-math.expm1(-sigma))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a layer computes in: the autocast dtype when autocast is on, else the input's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class BayesianLayer(nn.Module):
    """Posterior N(weight_mu, softplus(weight_rho)^2) per weight element; prior N(prior_mu, prior_sigma^2).

    ``weight_mu`` and ``weight_rho`` are fp32 parameters whatever the model's dtype; ``prior_mu`` is a
    non-trainable buffer (None for a zero-mean prior), optionally stored in bf16/fp16. ``store_prior=False``
    keeps no prior at all (for training without the KL term): :meth:`kl` then raises.

    In ``train()`` mode every forward draws one fresh weight sample shared by the whole batch; in ``eval()``
    mode the posterior mean is used (a plain layer's cost). :func:`bayeslayers.sampling` fixes the seed.
    """

    def __init__(
        self,
        weight_shape,
        *,
        init_sigma=DEFAULTS.init_sigma,
        prior_sigma=DEFAULTS.prior_sigma,
        kl_direction=DEFAULTS.kl_direction,
        prior_mean=None,
        prior_dtype=DEFAULTS.prior_dtype,
        store_prior=DEFAULTS.store_prior,
        device=None,
    ):
        super().__init__()
        init_sigma = check_positive(init_sigma, "init_sigma")
        self.prior_sigma = check_positive(prior_sigma, "prior_sigma")
        self.kl_direction = check_choice(kl_direction, KL_DIRECTIONS, "kl_direction")
        self.weight_shape = tuple(weight_shape)
        self.store_prior = check_bool(store_prior, "store_prior")
        if not store_prior:
            prior_mean = None
        self.weight_mu = nn.Parameter(torch.empty(weight_shape, dtype=torch.float32, device=device))
        self.weight_rho = nn.Parameter(
            torch.full(weight_shape, inverse_softplus(init_sigma), dtype=torch.float32, device=device)
        )
        self.register_buffer("prior_mu", self._prior_tensor(prior_mean, prior_dtype, weight_shape, device))
        # Noise id and fixed seed live in int64 buffers (not state): compiled graphs take them as inputs, so
        # layers of one shape and new seeds never recompile.
        self.register_buffer("noise_id", torch.tensor([unnamed_layer_id()], device=device), persistent=False)
        self.register_buffer("fixed_seed_tensor", torch.zeros(1, dtype=torch.int64, device=device), persistent=False)
        self.has_fixed_seed = False
        self._kl_cache = None

    @staticmethod
    def _prior_tensor(prior_mean, prior_dtype, weight_shape, device):
        if prior_dtype is not None and prior_dtype not in PRIOR_DTYPES:
            raise ValueError(f"prior_dtype must be one of {PRIOR_DTYPES} or None, got {prior_dtype!r}")
        if prior_mean is None:
            return None
        if tuple(prior_mean.shape) != tuple(weight_shape):
            raise ValueError(
                f"prior_mean must have the weight's shape {tuple(weight_shape)}, got {tuple(prior_mean.shape)}"
            )
        dtype = prior_dtype or torch.float32
        return prior_mean.detach().to(device=device, dtype=dtype).clone()

    def _copy_from(self, module: nn.Module) -> BayesianLayer:
        """Takes the mean and bias from a plain layer; exports will use its weight dtype."""
        weight = module.weight.detach()
        with torch.no_grad():
            self.weight_mu.copy_(weight)
        if module.bias is not None:  # nn.Linear and nn.Conv2d always have the attribute
            self.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
        self.export_dtype = weight.dtype
        return self

    def _export_into(self, plain: nn.Module) -> nn.Module:
        """Writes the posterior mean and the bias into a freshly built plain layer."""
        with torch.no_grad():
            plain.weight.copy_(self.weight_mu)
            if self.bias is not None:
                plain.bias.copy_(self.bias)
                plain.bias.requires_grad_(self.bias.requires_grad)
        return plain

    @property
    def weight(self) -> torch.Tensor:
        """The posterior mean (what deterministic code reading ``.weight`` expects)."""
        return self.weight_mu

    @property
    def weight_sigma(self) -> torch.Tensor:
        return nn.functional.softplus(self.weight_rho)

    @property
    def layer_id(self) -> int:
        """The id mixed into this layer's noise seeds: stable from its name after ``convert``, else
        process-unique."""
        return int(self.noise_id.item())

    @layer_id.setter
    def layer_id(self, value: int) -> None:
        self.noise_id.fill_(int(value))

    @property
    def fixed_seed(self) -> int | None:
        """The seed every forward uses (also in eval mode), or None: a fresh draw per training forward."""
        return int(self.fixed_seed_tensor.item()) & ((1 << 64) - 1) if self.has_fixed_seed else None

    @fixed_seed.setter
    def fixed_seed(self, value: int | None) -> None:
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"fixed_seed must be an int or None, got {type(value).__name__}")
            value &= (1 << 64) - 1
            self.fixed_seed_tensor.fill_(value - (1 << 64) if value >= 1 << 63 else value)
        self.has_fixed_seed = value is not None

    @property
    def sampling_enabled(self) -> bool:
        return self.training or self.has_fixed_seed

    def posterior(self) -> Posterior:
        """This layer's posterior and prior as the backends receive them."""
        return Posterior(self.weight_mu, self.weight_rho, self.prior_mu, self.prior_sigma, self.kl_direction)

    def _reparameterized(self, layer_map, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Applies ``layer_map`` with a weight sample (training / fixed seed) or the posterior mean (eval)."""
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__}: input x must be a floating-point tensor, got {x.dtype}")
        dtype = compute_dtype(x)
        x = x.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            if not self.sampling_enabled:
                return layer_map.forward(x, self.weight_mu.to(dtype), bias)
            backend, seed = self._backend_and_seed(x.device)
            y, kl = backend.apply(layer_map, x, self.posterior(), bias, seed)
        self._kl_cache = (kl, self._param_versions())
        return y

    def draw_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight this layer would use now, in ``dtype``: a sample (training / fixed seed, its KL recorded
        as a sampling forward records it) or the posterior mean (eval); differentiable w.r.t. mu and rho."""
        if not self.sampling_enabled:
            return self.weight_mu.to(dtype)
        backend, seed = self._backend_and_seed(self.weight_mu.device)
        with torch.autocast(self.weight_mu.device.type, enabled=False):
            w, kl = backend.sample_weight(self.posterior(), seed, dtype)
        self._kl_cache = (kl, self._param_versions())
        return w

    def _backend_and_seed(self, device: torch.device):
        """The backend serving ``device`` and the seed of this sampling call (the fixed one, else a fresh draw)."""
        backend = resolve_backend(device)
        if self.has_fixed_seed:  # a copy: the saved seed must not follow later changes of the buffer
            return backend, self.fixed_seed_tensor.clone()
        return backend, backend.layer_seed(self.noise_id, device)

    def _param_versions(self):
        return (
            self.weight_mu._version,
            self.weight_rho._version,
            None if self.prior_mu is None else self.prior_mu._version,
        )

    def kl(self) -> torch.Tensor:
        """Summed closed-form KL of this layer (0-d fp32 tensor, nats).

        Reuses the value the last sampling forward computed in its fused pass when the parameters have not
        changed since and its autograd state fits the current grad mode; otherwise computes it directly.
        """
        self.check_prior()
        wants_grad = torch.is_grad_enabled() and (self.weight_mu.requires_grad or self.weight_rho.requires_grad)
        if self._kl_cache is not None:
            kl, versions = self._kl_cache
            if versions == self._param_versions() and kl.requires_grad == wants_grad:
                return kl
        if tuple(self.weight_mu.shape) != self.weight_shape:
            raise RuntimeError(
                f"weight_mu has shape {tuple(self.weight_mu.shape)}, the layer's weight {self.weight_shape}: the "
                "parameters are sharded here (FSDP1 FullyShardedDataParallel outside its forward); compute the KL "
                "where they are whole, or shard with FSDP2 fully_shard, whose parameters keep their shapes"
            )
        return kl_elementwise(
            self.weight_mu, self.weight_sigma, self.prior_mu, self.prior_sigma, self.kl_direction
        ).sum()

    def check_prior(self, name: str = "") -> None:
        """Raises a RuntimeError when this layer stores no prior (``store_prior=False``), so no KL exists."""
        if not self.store_prior:
            where = f" {name!r}" if name else ""
            raise RuntimeError(
                f"Bayesian layer{where} stores no prior (converted with store_prior=False, for training without "
                "the KL term), so its KL cannot be computed: convert with store_prior=True to use kl_loss or a "
                "KL weight > 0"
            )

    def check_finite(self, name: str = "") -> None:
        """Raises ValueError naming the first non-finite posterior tensor of this layer."""
        for argument, tensor in (("weight_mu", self.weight_mu), ("weight_rho", self.weight_rho)):
            if not bool(torch.isfinite(tensor).all()):
                where = f" of layer {name!r}" if name else ""
                raise ValueError(f"{argument}{where} holds NaN or Inf values; expected finite numbers")

    def options(self) -> dict:
        """Prior and KL options, JSON-friendly (saved with checkpoints)."""
        prior_dtype = None if self.prior_mu is None else dtype_name(self.prior_mu.dtype)
        return {
            "prior_sigma": self.prior_sigma,
            "kl_direction": self.kl_direction,
            "prior_dtype": prior_dtype,
            "store_prior": self.store_prior,
        }

    def apply_options(self, options: dict) -> None:
        """Sets the prior width, KL direction and prior storage (dtype, whether kept) from :meth:`options` output.

        ``store_prior`` False drops a stored prior; True on a layer that stores none raises a ValueError."""
        self.prior_sigma = check_positive(options["prior_sigma"], "prior_sigma")
        self.kl_direction = check_choice(options["kl_direction"], KL_DIRECTIONS, "kl_direction")
        store_prior = check_bool(options.get("store_prior", True), "store_prior")
        if store_prior and not self.store_prior:
            raise ValueError(
                "store_prior=True but this layer was converted with store_prior=False and holds no prior; "
                "convert the model with store_prior=True (the prior mean is the pretrained weight) first"
            )
        if not store_prior:
            self.prior_mu = None
        self.store_prior = store_prior
        prior_dtype = options.get("prior_dtype")
        if self.prior_mu is not None and prior_dtype is not None:
            self.prior_mu = self.prior_mu.to(dtype_from_name(prior_dtype, "prior_dtype"))
        self._kl_cache = None

    def posterior_repr(self) -> str:
        prior = "none stored" if not self.store_prior else "pretrained" if self.prior_mu is not None else "zero"
        return f"prior_mean={prior}, prior_sigma={self.prior_sigma}, kl_direction={self.kl_direction!r}"
