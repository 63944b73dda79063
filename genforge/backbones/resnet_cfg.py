"""What the families built on timm's (torchvision-layout) ResNet share: the blocks per stage of
each depth, the ImageNet pretrained cfg, and the build call. Used by ``ibnnet`` and ``bcn``."""

from __future__ import annotations

from collections.abc import Iterable

from timm.models import build_model_with_cfg, generate_default_cfgs

__all__ = ["RESNET_DEPTHS", "build_resnet", "resnet_cfg", "resnet_default_cfgs"]

# Per ResNet depth: blocks per stage, and whether the block is a bottleneck (He et al. 2016, Table 1).
RESNET_DEPTHS = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
}

_NANO = dict(input_size=(3, 32, 32), pool_size=(1, 1))


def resnet_cfg(paper_ids: str, **kwargs) -> dict:
    """The pretrained cfg of an ImageNet-1k ResNet (224 px, crop 0.875, bilinear, ImageNet mean/std), with ``kwargs``."""
    return {**dict(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                   interpolation='bilinear', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                   first_conv='conv1', classifier='fc', paper_ids=paper_ids, license='mit'), **kwargs}


def resnet_default_cfgs(model_names: Iterable[str], paper_ids: str):
    """timm's ``default_cfgs`` with an ``untrained`` tag per model; a ``_nano_`` model is a 32x32 test size."""
    return generate_default_cfgs({f'{name}.untrained': resnet_cfg(paper_ids, **(_NANO if '_nano_' in name else {}))
                                  for name in model_names})


def build_resnet(model_cls: type, variant: str, pretrained: bool = False, **kwargs):
    """``build_model_with_cfg`` of a ResNet subclass, with the stem and all four stages as features."""
    return build_model_with_cfg(model_cls, variant, pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3, 4)), **kwargs)
