"""Kernels of bayeslayers (Triton, and their C++ CPU twins), imported as ``bayeslayers.kernels``; they know
only tensors.

Modules, one job each:
  philox.py          the RNG contract and standard normals from Philox4x32-10 (``philox_normal``)
  seeds.py           seeds as int64 device tensors; on-device mix of a draw with a layer id
  posterior_math.py  softplus, sigmoid, KL per element and its gradient (both directions)
  sample_kl.py       one pass: weight sample + per-program KL partial sums
  reparam_grad.py    one pass: d_mu, d_rho (and optionally the weight sample again)
  custom_ops.py      a sample/gradient pair as torch.library operators (torch.compile)
  library.py         the Triton kernels as operators
  reparameterized.py the autograd Function the triton and cpp backends call: ``reparameterized_op``
  gemm_tiles.py      weight tiles generated inside a GEMM; one tile product
  sampled_matmul.py  sample-in-GEMM: a @ w^T (or a @ w) with w built in registers, + KL
  weight_grad_gemm.py dW GEMM whose epilogue writes d_mu, d_rho
  lora_matmul.py     base GEMM + LoRA adapter in one kernel
  fused_linear.py    autograd Function of the sample-in-GEMM Linear: ``sampled_linear``
  fused_lora.py      autograd Functions of the fused Bayesian LoRA: ``sampled_weight``, ``lora_linear``
  fusion.py          which path (part 1 or fused) a shape takes: ``fusion_policy``, ``fusion``
  cpu.py             C++ CPU twins of the two kernels (csrc/), same eps bit for bit, built on first use
  config.py          autotune configs and limits
"""

import importlib.util

# Run from the repository root, this folder is also visible as a top-level ``kernels`` package, and
# transformers/diffusers import whatever ``kernels`` they find to read its version (the Hugging Face
# "kernels" hub package has that name). Imported under that name it stays empty: a second import would
# register the ``torch.ops.bayeslayers`` operators twice and leave the first ones dangling.
if __name__ == "bayeslayers.kernels":
    from . import cpu
    from .fusion import FusionPolicy, fusion, fusion_policy, set_fusion_policy
    from .reparameterized import ReparameterizedFunction, reparameterized_op
    from .seeds import device_layer_seed, mix_seed_tensor, seed_tensor

    __all__ = ["cpu", "FusionPolicy", "fusion", "fusion_policy", "set_fusion_policy", "reparameterized_op",
               "ReparameterizedFunction", "device_layer_seed", "mix_seed_tensor", "seed_tensor"]
    if importlib.util.find_spec("triton") is not None:  # the C++ twins need no Triton
        from .fused_linear import sampled_linear
        from .fused_lora import lora_linear, sampled_weight
        from .philox import philox_normal
        from .reparam_grad import reparameterization_grad
        from .sample_kl import sample_weight_and_kl

        __all__ += ["philox_normal", "sample_weight_and_kl", "reparameterization_grad", "sampled_linear",
                    "sampled_weight", "lora_linear"]
else:
    __all__ = []
