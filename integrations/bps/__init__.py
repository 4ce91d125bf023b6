"""Bayesian Power Steering for diffusers UNets: a side network steers a frozen UNet's hidden features from a
condition image (edges, layout), optionally with Bayesian convs (``bayeslayers.convert``).

  model.py       PowerSteering (diffusers ModelMixin/ConfigMixin), built from a UNet config
  steer.py       attach/detach: hooks that add the residuals to the frozen UNet's blocks
  conditions.py  condition images without downloads: edge maps, layout maps of the synthetic world
  metrics.py     condition adherence and a Frechet distance on the tiny judge's embeddings
  train.py       the training recipe (``bayeslayers-bps``)
"""

from .model import PowerSteering

__all__ = ["PowerSteering"]
