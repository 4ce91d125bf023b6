"""Optimizers for Bayesian layers.

``FusedBayesAdamW``: torch's AdamW whose update of every Bayesian layer's mu and rho runs in backward, in the
layer's gradient pass, so the Bayesian weights' gradients never reach ``.grad`` (see ``docs/optim.md``).
``SigmaAdamW``: AdamW that steps sigma = softplus(rho) itself for groups with ``sigma_space=True``, as the seed
paper's direct-sigma parameterisation (see ``docs/posterior.md``).
``IVON``: natural-gradient variational learning whose Hessian estimate is the posterior's variance (rho holds it:
no second moment), torch AdamW for the other parameters (see ``docs/optim.md``).
"""

from .fused_adamw import FusedBayesAdamW, exclude_from_ddp
from .ivon import IVON
from .sigma_adamw import SigmaAdamW, posterior_param_groups

__all__ = ["IVON", "FusedBayesAdamW", "SigmaAdamW", "exclude_from_ddp", "posterior_param_groups"]
