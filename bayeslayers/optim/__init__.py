"""Optimizers for Bayesian layers.

``FusedBayesAdamW``: torch's AdamW whose update of every Bayesian layer's mu and rho runs in backward, in the
layer's gradient pass, so the Bayesian weights' gradients never reach ``.grad`` (see ``docs/optim.md``).
"""

from .fused_adamw import FusedBayesAdamW, exclude_from_ddp

__all__ = ["FusedBayesAdamW", "exclude_from_ddp"]
