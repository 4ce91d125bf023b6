"""Triton kernels of bayeslayers (imported as ``bayeslayers.kernels``); they know only tensors.

Modules, one job each:
  philox.py          the RNG contract and standard normals from Philox4x32-10 (``philox_normal``)
  seeds.py           seeds as int64 device tensors; on-device mix of a draw with a layer id
  posterior_math.py  softplus, sigmoid, KL per element and its gradient (both directions)
  sample_kl.py       one pass: weight sample + per-program KL partial sums
  reparam_grad.py    one pass: d_mu, d_rho (and optionally the weight sample again)
  library.py         torch.library operators around them (torch.compile)
  reparameterized.py the autograd Function a backend calls: ``reparameterized_op``
  config.py          autotune configs and limits
"""

# Run from the repository root, this folder is also visible as a top-level ``kernels`` package, and
# transformers/diffusers import whatever ``kernels`` they find to read its version (the Hugging Face
# "kernels" hub package has that name). Imported under that name it stays empty: a second import would
# register the ``torch.ops.bayeslayers`` operators twice and leave the first ones dangling.
if __name__ == "bayeslayers.kernels":
    from .philox import philox_normal
    from .reparam_grad import reparameterization_grad
    from .reparameterized import ReparameterizedFunction, reparameterized_op
    from .sample_kl import sample_weight_and_kl
    from .seeds import device_layer_seed, mix_seed_tensor, seed_tensor

    __all__ = ["philox_normal", "sample_weight_and_kl", "reparameterization_grad", "reparameterized_op",
               "ReparameterizedFunction", "device_layer_seed", "mix_seed_tensor", "seed_tensor"]
else:
    __all__ = []
