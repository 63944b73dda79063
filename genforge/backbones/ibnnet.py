"""IBN-Net: ResNets that mix Instance and Batch Normalization.

Pan et al., "Two at Once: Enhancing Learning and Generalization Capacities via IBN-Net",
ECCV 2018, arXiv 1807.09441. Implemented here (Sec. 3 and the official
``ibnnet/resnet_ibn.py`` of XingangPan/IBN-Net):

- IBN-a: in every residual block of stages 1-3 the first norm after ``conv1``
  becomes IBN: the first ``int(ratio * C)`` channels (ratio 0.5, so exactly half) go
  through affine InstanceNorm, the rest through BatchNorm, and the two are concatenated::

      IBN(x) = [IN(x[:, :C/2]), BN(x[:, C/2:])]

  Stage 4 stays plain BN, to keep its features discriminative.
- IBN-b: an affine InstanceNorm on the block output after the residual add and
  before the ReLU, ``relu(IN(F(x) + x))``. As in the official code it sits in the last block
  of stages 1 and 2 and in the stem (IN replaces the stem's BN).

The network is timm's ResNet (the torchvision layout, so the official keys load
unchanged); the IBN layers are set into its blocks after it is built.
"""

from __future__ import annotations

import torch
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from genforge.backbones.registry import register_gf_model, register_official_converter
from genforge.backbones.resnet_cfg import RESNET_DEPTHS, build_resnet, resnet_default_cfgs

__all__ = ["IBN", "IBNBasicBlock", "IBNBottleneck", "IBNResNet"]


class IBN(nn.Module):
    """Instance-Batch Normalization: affine IN on the first ``int(ratio * C)`` channels, BN on the rest."""

    def __init__(self, planes: int, ratio: float = 0.5, device=None, dtype=None):
        super().__init__()
        self.half = int(planes * ratio)
        self.IN = nn.InstanceNorm2d(self.half, affine=True, device=device, dtype=dtype)
        self.BN = nn.BatchNorm2d(planes - self.half, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inst, batch = x.split((self.half, x.shape[1] - self.half), dim=1)
        return torch.cat((self.IN(inst.contiguous()), self.BN(batch.contiguous())), dim=1)


class _PostAddIN(nn.Module):
    """The end of a timm residual block, with IBN-b's optional InstanceNorm ``IN`` after the residual add."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.IN: nn.Module | None = None

    def _close(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        """``IN(drop_path(se(x)) + shortcut)``, each of SE, drop path and IN where present (the block's
        last activation follows)."""
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        x = x + shortcut
        if self.IN is not None:
            x = self.IN(x)
        return x


class IBNBasicBlock(_PostAddIN, BasicBlock):
    """timm's BasicBlock with an optional IBN-b InstanceNorm ``IN`` after the residual add."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        return self.act2(self._close(self.bn2(self.conv2(x)), shortcut))


class IBNBottleneck(_PostAddIN, Bottleneck):
    """timm's Bottleneck with an optional IBN-b InstanceNorm ``IN`` after the residual add."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        return self.act3(self._close(self.bn3(self.conv3(x)), shortcut))


class IBNResNet(ResNet):
    """timm's ResNet with IBN-a / IBN-b layers; ``ibn_cfg[i]`` is 'a', 'b' or None for stage i."""

    def __init__(
            self,
            block: type[IBNBasicBlock | IBNBottleneck] = IBNBottleneck,
            layers: tuple[int, ...] = (3, 4, 6, 3),
            ibn_cfg: tuple[str | None, ...] = ('a', 'a', 'a', None),
            ibn_ratio: float = 0.5,
            channels: tuple[int, ...] = (64, 128, 256, 512),
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        if len(ibn_cfg) != len(layers) or any(mode not in ('a', 'b', None) for mode in ibn_cfg):
            raise ValueError(f"ibn_cfg must give 'a', 'b' or None for each of the {len(layers)} stages; got {ibn_cfg}")
        # zero_init_last=False: the official IBN-Net initialises every norm weight to 1
        super().__init__(block=block, layers=layers, channels=channels, num_classes=num_classes, in_chans=in_chans,
                         global_pool=global_pool, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                         zero_init_last=False, device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        if ibn_cfg[0] == 'b':
            self.bn1 = nn.InstanceNorm2d(self.bn1.num_features, affine=True, **dd)
        for i, mode in enumerate(ibn_cfg):
            blocks = getattr(self, f'layer{i + 1}')
            for j, blk in enumerate(blocks):
                if mode == 'a':
                    blk.bn1 = IBN(blk.bn1.num_features, ibn_ratio, **dd)
                elif mode == 'b' and j == len(blocks) - 1 and len(blocks) > 1:
                    # the official _make_layer: IBN-b on the last block of a stage (never its first)
                    blk.IN = nn.InstanceNorm2d(channels[i] * block.expansion, affine=True, **dd)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """None beyond timm's rule (1-d params and biases); the official training decays all weights."""
        return set()


def convert_official(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official ``resnet_ibn.py`` keys are ours already (torchvision ResNet names, ``bn1.IN``/``bn1.BN``, ``IN``)."""
    return dict(state_dict)


# model name prefix -> the architecture's IBNResNet arguments; the name's last letter picks the IBN mode
_ARCHS = {
    **{f'gf_resnet{depth}_ibn': dict(block=IBNBottleneck if bottleneck else IBNBasicBlock, layers=layers)
       for depth, (layers, bottleneck) in RESNET_DEPTHS.items()},
    'gf_resnet_nano_ibn': dict(block=IBNBasicBlock, layers=(2, 2, 2, 2), channels=(16, 32, 64, 64)),
}
_IBN_CFGS = {'a': ('a', 'a', 'a', None), 'b': ('b', 'b', None, None)}

for _prefix in _ARCHS:
    register_official_converter(_prefix)(convert_official)

default_cfgs = resnet_default_cfgs([f'{prefix}_{mode}' for prefix in _ARCHS for mode in _IBN_CFGS], 'arXiv:1807.09441')


def _create(variant: str, pretrained: bool = False, **kwargs) -> IBNResNet:
    """``<prefix>_<mode>``: the architecture of ``_ARCHS[prefix]`` with ``ibn_cfg`` of the mode; ``kwargs`` override."""
    prefix, mode = variant.rsplit('_', 1)
    return build_resnet(IBNResNet, variant, pretrained, **{**_ARCHS[prefix], 'ibn_cfg': _IBN_CFGS[mode], **kwargs})


@register_gf_model
def gf_resnet18_ibn_a(pretrained: bool = False, **kwargs) -> IBNResNet:
    """ResNet-18-IBN-a: 11.7M params, 70.8% ImageNet-1k top-1 (README)."""
    return _create('gf_resnet18_ibn_a', pretrained, **kwargs)


@register_gf_model
def gf_resnet18_ibn_b(pretrained: bool = False, **kwargs) -> IBNResNet:
    """ResNet-18-IBN-b: 11.7M params."""
    return _create('gf_resnet18_ibn_b', pretrained, **kwargs)


@register_gf_model
def gf_resnet34_ibn_a(pretrained: bool = False, **kwargs) -> IBNResNet:
    """ResNet-34-IBN-a: 21.8M params, 74.2% ImageNet-1k top-1 (README)."""
    return _create('gf_resnet34_ibn_a', pretrained, **kwargs)


@register_gf_model
def gf_resnet34_ibn_b(pretrained: bool = False, **kwargs) -> IBNResNet:
    """ResNet-34-IBN-b: 21.8M params."""
    return _create('gf_resnet34_ibn_b', pretrained, **kwargs)


@register_gf_model
def gf_resnet50_ibn_a(pretrained: bool = False, **kwargs) -> IBNResNet:
    """ResNet-50-IBN-a: 25.6M params, 77.5% ImageNet-1k top-1 (README)."""
    return _create('gf_resnet50_ibn_a', pretrained, **kwargs)


@register_gf_model
def gf_resnet50_ibn_b(pretrained: bool = False, **kwargs) -> IBNResNet:
    """ResNet-50-IBN-b: 25.6M params."""
    return _create('gf_resnet50_ibn_b', pretrained, **kwargs)


@register_gf_model
def gf_resnet101_ibn_a(pretrained: bool = False, **kwargs) -> IBNResNet:
    """ResNet-101-IBN-a: 44.5M params, 78.6% ImageNet-1k top-1 (README)."""
    return _create('gf_resnet101_ibn_a', pretrained, **kwargs)


@register_gf_model
def gf_resnet101_ibn_b(pretrained: bool = False, **kwargs) -> IBNResNet:
    """ResNet-101-IBN-b: 44.6M params."""
    return _create('gf_resnet101_ibn_b', pretrained, **kwargs)


@register_gf_model
def gf_resnet_nano_ibn_a(pretrained: bool = False, **kwargs) -> IBNResNet:
    """A test-sized IBN-a ResNet (32x32 input): two basic blocks per stage, widths 16-64."""
    return _create('gf_resnet_nano_ibn_a', pretrained, **kwargs)


@register_gf_model
def gf_resnet_nano_ibn_b(pretrained: bool = False, **kwargs) -> IBNResNet:
    """A test-sized IBN-b ResNet (32x32 input): two basic blocks per stage, widths 16-64."""
    return _create('gf_resnet_nano_ibn_b', pretrained, **kwargs)
