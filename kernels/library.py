"""The Triton kernels as ``torch.library`` operators ``torch.ops.bayeslayers.{sample_weight,
reparameterization_grad}`` (schemas in ``custom_ops.py``).

They are plain custom ops rather than ``triton_op``: torch 2.13 does not wrap interpreted kernels
(TRITON_INTERPRET=1), so only this form can be tested on CPU, and Inductor has nothing to fuse into a Philox
pass anyway.
"""

from __future__ import annotations

from .custom_ops import define_kernel_ops
from .reparam_grad import reparameterization_grad
from .sample_kl import sample_weight_and_kl

TRITON_OPS = define_kernel_ops("", sample_weight_and_kl, reparameterization_grad)
