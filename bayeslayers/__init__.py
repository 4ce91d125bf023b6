"""bayeslayers: Bayesian layers for fine-tuning diffusion models.

A converted layer holds a Gaussian posterior N(mu, softplus(rho)^2) per weight, mu initialised at the
pretrained weight, and a prior centred on the pretrained weight. Training draws one weight sample per step
(reparameterization trick) and adds ``kl_weight * kl_loss(model)`` to the loss; eval uses the mean weights.

    import bayeslayers
    bayeslayers.convert(unet, preset="dreambooth-bnn")
    loss = diffusion_loss + kl_weight * bayeslayers.kl_loss(unet)
"""

import bayeslayers._source_tree  # noqa: F401  (run from a checkout: maps kernels/ and integrations/ in)
from bayeslayers.kernels.kernel_ops import PosteriorKernels, register_posterior_kernels
from bayeslayers.kernels.paths.fusion import FusionPolicy, fusion, fusion_policy, set_fusion_policy

from .backends import KernelBackend, get_backend, materialize_eps, register_backend, set_backend
from .config import BayesConfig
from .convert import bayesian_modules, convert, posterior_layers, to_deterministic
from .diagnostics import LayerStats, Summary, saved_tensor_bytes, sigma_movement, summary
from .layers import BayesConv2d, BayesianLayer, BayesLinear, BayesLoRAConv2d, BayesLoRALinear
from .objectives import kl_loss
from .presets import available_presets, get_preset, register_preset
from .registry import register_layer_type
from .sampling import sampling
from .serialization import load, read_metadata, save

__version__ = "0.1.0"

__all__ = [
    "BayesConfig",
    "BayesConv2d",
    "BayesianLayer",
    "BayesLinear",
    "BayesLoRAConv2d",
    "BayesLoRALinear",
    "FusionPolicy",
    "KernelBackend",
    "LayerStats",
    "PosteriorKernels",
    "Summary",
    "available_presets",
    "bayesian_modules",
    "convert",
    "fusion",
    "fusion_policy",
    "get_backend",
    "get_preset",
    "kl_loss",
    "load",
    "materialize_eps",
    "posterior_layers",
    "read_metadata",
    "register_backend",
    "register_layer_type",
    "register_posterior_kernels",
    "register_preset",
    "sampling",
    "save",
    "saved_tensor_bytes",
    "set_backend",
    "set_fusion_policy",
    "sigma_movement",
    "summary",
    "to_deterministic",
]
