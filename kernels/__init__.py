"""Kernels of bayeslayers (Triton, their C++ CPU twins, a plain-torch fallback), imported as
``bayeslayers.kernels``; they know only tensors. Names load on first use, so importing this package is cheap.

Modules, one job each. The seam every implementation shares:
  posterior.py        the Posterior record, KL directions, the posterior's float math in plain torch
  posterior_math.py   softplus, sigmoid, KL per element and its gradient in Triton (both directions)
  seeds.py            seeds as int64 device tensors; on-device mix of a draw with a layer id
  kernel_ops.py       an implementation's sample/gradient kernels as torch.library operators
  reparameterized.py  the one autograd seam and the paths under it (sample-then-map, sample-in-GEMM)
Three implementations of the posterior kernels:
  triton/             the Triton kernels and fused GEMMs
    interpreter.py      whether Triton runs under TRITON_INTERPRET (read once)
    philox.py           the RNG contract and standard normals from Philox4x32-10 (``philox_normal``)
    sample_kl.py        one pass: weight sample + per-program KL partial sums
    reparam_grad.py     one pass: d_mu, d_rho (and optionally the weight sample again)
    gemm_tiles.py       weight tiles generated inside a GEMM; one tile product
    sampled_matmul.py   sample-in-GEMM: a @ w^T (or a @ w) with w built in registers, + KL
    weight_grad_gemm.py dW GEMM whose epilogue writes d_mu, d_rho
    lora_matmul.py      base GEMM + LoRA adapter in one kernel
    triton_ops.py       the Triton kernels as torch.library operators (``TRITON_KERNELS``)
    config.py           autotune configs and limits (reshaped where a real compile spilled)
  cpu/                C++ CPU twins of the Triton kernels (csrc/), same eps bit for bit, built on first use
  torch_impl.py       the kernels in plain torch (any device)
Which path a Triton call takes:
  paths/fusion.py     which path a call takes (fixed policy, BAYESLAYERS_FUSION, or measured) and running it
  paths/fused.py      host functions of the fused paths: ``sampled_linear``, ``lora_linear``
  paths/timing.py     timing the eligible paths on the user's GPU; the in-process and on-disk choice cache
"""

import importlib

# Run from the repository root, this folder is also visible as a top-level ``kernels`` package, and
# transformers/diffusers import whatever ``kernels`` they find to read its version (the Hugging Face
# "kernels" hub package has that name). Imported under that name it exports nothing: a second import of the
# modules would register the ``torch.ops.bayeslayers`` operators twice and leave the first ones dangling.
_EXPORTS = {
    "cpu": ".cpu",
    "Posterior": ".posterior",
    "KL_DIRECTIONS": ".posterior",
    "check_kl_direction": ".posterior",
    "ReparameterizedFunction": ".reparameterized",
    "SampledWeightFunction": ".reparameterized",
    "WeightPath": ".reparameterized",
    "SampleThenMap": ".reparameterized",
    "SampleInGemm": ".reparameterized",
    "reparameterize": ".reparameterized",
    "sampled_weight": ".reparameterized",
    "PosteriorKernels": ".kernel_ops",
    "device_layer_seed": ".seeds",
    "mix_seed_tensor": ".seeds",
    "seed_tensor": ".seeds",
    "TORCH_KERNELS": ".torch_impl",
    "torch_normal": ".torch_impl",
    "torch_normal_op": ".torch_impl",
}
_TRITON_EXPORTS = {  # need the triton package (on CPU: TRITON_INTERPRET=1)
    "philox_normal": ".triton.philox",
    "sample_weight_and_kl": ".triton.sample_kl",
    "reparameterization_grad": ".triton.reparam_grad",
    "TRITON_KERNELS": ".triton.triton_ops",
    "sampled_linear": ".paths.fused",
    "lora_linear": ".paths.fused",
}

if __name__ == "bayeslayers.kernels":
    # Eager: the function ``fusion`` shares its name with its module, which a lazy lookup would return instead.
    from .paths.fusion import FusionPolicy, fusion, fusion_policy, set_fusion_policy  # noqa: F401

    __all__ = sorted({*_EXPORTS, *_TRITON_EXPORTS, "FusionPolicy", "fusion", "fusion_policy", "set_fusion_policy"})
else:
    __all__ = []


def __getattr__(name):
    if __name__ == "bayeslayers.kernels" and name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name], __name__)
        return module if name == "cpu" else getattr(module, name)
    if __name__ == "bayeslayers.kernels" and name in _TRITON_EXPORTS:
        from .triton.interpreter import TRITON_INSTALLED

        if not TRITON_INSTALLED:
            raise AttributeError(f"bayeslayers.kernels.{name} needs the 'triton' package")
        return getattr(importlib.import_module(_TRITON_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
