"""Trainable methods; importing this package registers them with the training loop.

``diffusion`` (``dimr``, ``dit``, ``unet2d``), ``classification`` (``classifier``: any timm
model), ``diffusion_probe`` (a head on frozen diffusion features), ``kd`` (``kd`` and
``meal_v2``: online distillation from frozen teachers), ``reinforced`` (a student trained
from a reinforced dataset), ``m2mkd`` (``m2mkd``: module-to-module distillation;
``modular_student``: the MoE student trained end to end) and ``concentration``
(``specialists`` and ``concentration``: knowledge concentration).
"""

from genforge.methods import classification, concentration, diffusion, diffusion_probe, kd, m2mkd, reinforced

__all__ = ["classification", "concentration", "diffusion", "diffusion_probe", "kd", "m2mkd", "reinforced"]
