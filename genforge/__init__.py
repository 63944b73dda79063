"""genforge: generative modelling and data synthesis on one PyTorch core.

``import genforge`` registers the gf_ backbones with timm (so ``timm.create_model("gf_...")``
works) and nothing else: subpackages load when first used. The networks and pipelines are
also reachable here, lazily (PEP 562), because diffusers' ``model_index.json`` names each
component by its top-level package, so ``DiMRPipeline.from_pretrained`` resolves
``["genforge", "DiMRModel"]`` through this module.
"""

import importlib

import genforge.backbones  # noqa: F401  (registers the gf_ timm models)

__version__ = "0.1.0"

_LAZY = {"DiMRModel": "genforge.models.dimr", "DiMRPipeline": "genforge.pipelines.dimr",
         "ClassConditionalPipeline": "genforge.pipelines.class_conditional",
         "ARFlowModel": "genforge.models.arflow", "ARFlowPipeline": "genforge.pipelines.arflow",
         "SiTPipeline": "genforge.pipelines.arflow", "ASDMUNet2DConditionModel": "genforge.sd.unet"}
_SUBPACKAGES = ("backbones", "config", "core", "data", "distill", "kd", "methods", "metrics", "models",
                "pipelines", "rewards", "sd", "train")
_ALIASES = {"reno": "genforge.pipelines.reno"}
__all__ = [*_LAZY, *_SUBPACKAGES, *_ALIASES, "__version__"]


def __getattr__(name: str):
    """``genforge.DiMRModel``, ``genforge.distill`` and ``genforge.reno`` (ReNO's
    :mod:`genforge.pipelines.reno`) import their module on first use."""
    if name in _ALIASES:
        return importlib.import_module(_ALIASES[name])
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"genforge.{name}")
    raise AttributeError(f"module 'genforge' has no attribute {name!r}")
