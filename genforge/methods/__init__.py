"""Trainable methods; importing this package registers them with the training loop.

``diffusion`` (``dimr``, ``dit``, ``unet2d``), ``classification`` (``classifier``: any timm
model) and ``diffusion_probe`` (a head on frozen diffusion features).
"""

from genforge.methods import classification, diffusion, diffusion_probe

__all__ = ["classification", "diffusion", "diffusion_probe"]
