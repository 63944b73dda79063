"""The A-SDM student UNet: diffusers' ``UNet2DConditionModel`` plus CLME-CondConv sites and GRI attention.

A subclass whose only additions are config entries (the CondConv sites and the GRI settings),
so the modules they name are rebuilt in ``__init__`` and ``save_pretrained`` /
``from_pretrained`` round-trip the student; a stock ``StableDiffusionPipeline`` takes it as its
``unet``. ``genforge.ASDMUNet2DConditionModel`` resolves it from a pipeline's
``model_index.json``, which names this module; diffusers' loader looks up the loading base class
(``ModelMixin``) in that same module, hence its import here. Built by :func:`genforge.sd.prune.prune` with plan ``asdm``.
"""

from __future__ import annotations

import inspect

from diffusers import ModelMixin, UNet2DConditionModel  # noqa: F401 -- ModelMixin: see below
from diffusers.configuration_utils import register_to_config

from genforge.sd.condconv import CondConv2d
from genforge.sd.gri import apply_gri

__all__ = ["ASDMUNet2DConditionModel"]

class ASDMUNet2DConditionModel(UNet2DConditionModel):
    """``UNet2DConditionModel(**unet_config)`` with A-SDM's modules.

    ``condconv_sites``: {conv module path: number of experts}, each conv replaced by a
    :class:`~genforge.sd.condconv.CondConv2d` of the same geometry with ``condconv_routing``;
    ``gri_stages``: stages whose self-attention runs :class:`~genforge.sd.gri.GRIAttnProcessor`
    (window ``gri_window``, pooling ``gri_pool``, local branch weight ``gri_local_weight``).
    """

    def __init__(self, condconv_sites=None, condconv_routing="softmax", gri_stages=None, gri_window=8, gri_pool=4,
                 gri_local_weight=0.5, **unet_config):
        super().__init__(**unet_config)
        for site, experts in (condconv_sites or {}).items():
            conv = self.get_submodule(site)
            parent_name, _, name = site.rpartition(".")
            setattr(self.get_submodule(parent_name), name, CondConv2d(
                conv.in_channels, conv.out_channels, conv.kernel_size[0], int(experts), stride=conv.stride[0],
                padding=conv.padding[0], routing=condconv_routing))
        if gri_stages:
            apply_gri(self, list(gri_stages), gri_window, gri_pool, gri_local_weight)


# diffusers reads a model's config keys from its __init__ signature: give ours the A-SDM arguments
# followed by UNet2DConditionModel's own, then register them all to the config.
_own = inspect.signature(ASDMUNet2DConditionModel.__init__).parameters
_base = inspect.signature(inspect.unwrap(UNet2DConditionModel.__init__)).parameters
ASDMUNet2DConditionModel.__init__.__signature__ = inspect.Signature([
    _own["self"], *[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for name, p in _own.items() if name not in
                    ("self", "unet_config")],
    *[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for name, p in _base.items() if name != "self"]])
ASDMUNet2DConditionModel.__init__ = register_to_config(ASDMUNet2DConditionModel.__init__)
