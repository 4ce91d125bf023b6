"""Optimizers for Bayesian layers."""

from .sigma_adamw import SigmaAdamW, posterior_param_groups

__all__ = ["SigmaAdamW", "posterior_param_groups"]
