"""Training Methods of the generic tasks; importing this package registers them with the training loop.

``diffusion`` (``dimr``, ``dit``, ``unet2d``), ``arflow`` (``arflow`` and its SiT baseline ``sit``), ``classification`` (``classifier``: any timm
model), ``diffusion_probe`` (a head on frozen diffusion features) and ``sampling`` (what a
diffusion run samples and scores at its end), ``masked_tokens`` (``vq_tokenizer``, ``enat``,
``maskgit``, ``amused``: token-based generation). A method family with its own package keeps its
Methods there: the knowledge-transfer ones (``kd``, ``meal_v2``, ``reinforced``, ``specialists``,
``concentration``, ``m2mkd``, ``modular_student``) are in :mod:`genforge.kd`.
"""

from genforge.methods import arflow, classification, diffusion, diffusion_probe, masked_tokens

__all__ = ["arflow", "classification", "diffusion", "diffusion_probe", "masked_tokens"]
