"""Bayesian layer types."""

from .base import BayesianLayer
from .conv import BayesConv2d
from .linear import BayesLinear
from .lora import BayesLoRAConv2d, BayesLoRALinear

__all__ = ["BayesianLayer", "BayesLinear", "BayesConv2d", "BayesLoRALinear", "BayesLoRAConv2d"]
