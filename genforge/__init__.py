"""genforge: generative modelling and data synthesis on one PyTorch core.

The networks and pipelines are exported here because diffusers' ``model_index.json`` names
each component by its top-level package, so ``DiMRPipeline.from_pretrained`` resolves
``["genforge", "DiMRModel"]`` through this module.
"""

import genforge.backbones  # noqa: F401  (registers the gf_ timm models)
from genforge.models.dimr import DiMRModel
from genforge.models.dit import DiTModel
from genforge.pipelines.dimr import DiMRPipeline

__version__ = "0.1.0"
__all__ = ["DiMRModel", "DiTModel", "DiMRPipeline", "__version__"]
