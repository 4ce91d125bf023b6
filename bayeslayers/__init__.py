"""bayeslayers: Bayesian layers for fine-tuning diffusion models."""
__version__ = "0.1.0"
