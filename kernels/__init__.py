"""Triton kernels of bayeslayers (imported as `bayeslayers.kernels`); they know only tensors."""
