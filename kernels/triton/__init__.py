"""The Triton implementation of the posterior kernels and the fused GEMMs (imports nothing on its own)."""
