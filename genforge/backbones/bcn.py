"""Batch-Channel Normalization (BCN) with Weight Standardization (WS) in a ResNet.

Qiao et al., "Micro-Batch Training with Batch-Channel Normalization and Weight
Standardization", arXiv 1903.10520, and "Rethinking Normalization and Elimination
Singularity in Neural Networks", arXiv 1911.09738. Implemented here (the WS and BCN
sections of 1903.10520 and the official ``imagenet/models/layers.py`` and README ``BCNorm``/``EstBN`` of
joe-siyuan-qiao/Batch-Channel-Normalization):

- WS: every conv uses W_hat = (W - mean(W)) / std(W), statistics over each output
  channel's fan-in: timm's ``StdConv2d`` with eps 1e-5 (the official code divides by the
  unbiased std; ``convert_official`` accounts for that in the stored running statistics).
- BCN: a batch-statistics normalisation with a per-channel affine, then a channel
  normalisation (GroupNorm statistics: per sample, over each group of C/G channels and all
  positions) with a per-group affine (weight and bias of shape (1, G, 1))::

      x_b = gamma_c (x - mu_B) / sigma_B + beta_c          mu_B, sigma_B over (N, H, W)
      y = w_g (x_b - mu_(n,g)) / sigma_(n,g) + b_g           mu_(n,g), sigma_(n,g) over (C/G, H, W)

- Micro-batch BCN (README ``BCNorm(estimate=True)`` / ``EstBN``; ``estimate=True`` here): the batch part normalises
  with running estimates mu_hat, sigma_hat^2 in training too, so it works at one image per
  device and an image's output does not depend on the others in its batch. In training the
  estimates first move towards the batch by the moving speed r (under no_grad)::

      mu_hat <- (1 - r) mu_hat + r mean(x),   sigma_hat^2 <- (1 - r) sigma_hat^2 + r mean((x - mu_hat_old)^2)

  r is the buffer ``estbn_moving_speed``, as in the official code (which leaves it at 0 for
  its trainer to set; here it is an argument).
- Network: torchvision's ResNet (timm's ``ResNet``, so the official keys load unchanged)
  with every conv weight-standardised and every norm a BCN. As in the official code the last
  BCN of each residual branch starts with weight 0 (``zero_init_last``).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import StdConv2d
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from genforge.backbones.registry import register_gf_model, register_official_converter
from genforge.backbones.resnet_cfg import RESNET_DEPTHS, build_resnet, resnet_default_cfgs

__all__ = ["BatchChannelNorm2d", "EstimatedBatchNorm2d", "WSBCNResNet", "standardize_convs"]


class EstimatedBatchNorm2d(nn.BatchNorm2d):
    """Batch normalisation that always normalises with its running estimates (micro-batch BCN).

    Training only moves the estimates, by ``moving_speed`` towards the batch statistics; the
    output is then (x - mu_hat) / sqrt(sigma_hat^2 + eps) with the per-channel affine.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, moving_speed: float = 0.1, device=None, dtype=None):
        super().__init__(num_features, eps=eps, device=device, dtype=dtype)
        self.register_buffer('estbn_moving_speed', torch.full((1,), float(moving_speed), device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                speed = self.estbn_moving_speed
                mean = x.mean(dim=(0, 2, 3))
                var = (x - self.running_mean[None, :, None, None]).square().mean(dim=(0, 2, 3))  # about the old mu_hat
                self.running_mean.mul_(1 - speed).add_(speed * mean)
                self.running_var.mul_(1 - speed).add_(speed * var)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                            eps=self.eps)


class BatchChannelNorm2d(nn.Module):
    """BCN: batch normalisation ``pbn``, then GroupNorm statistics with a per-group affine."""

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5, estimate: bool = False,
                 moving_speed: float = 0.1, device=None, dtype=None):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"BatchChannelNorm2d: {num_channels} channels do not split into {num_groups} groups")
        self.num_channels = num_channels
        self.num_groups = num_groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, num_groups, 1, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(1, num_groups, 1, device=device, dtype=dtype))
        if estimate:
            self.pbn = EstimatedBatchNorm2d(num_channels, moving_speed=moving_speed, device=device, dtype=dtype)
        else:
            self.pbn = nn.BatchNorm2d(num_channels, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.group_norm(self.pbn(x), self.num_groups, eps=self.eps)
        out = x.reshape(x.shape[0], self.num_groups, -1) * self.weight + self.bias  # (B, G, C/G * H * W)
        return out.view_as(x)


def standardize_convs(module: nn.Module, eps: float = 1e-5) -> nn.Module:
    """Swap every plain ``nn.Conv2d`` under ``module`` for a ``StdConv2d`` that keeps its parameters."""
    for name, child in module.named_children():
        if type(child) is nn.Conv2d:
            conv = StdConv2d(child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                             padding=child.padding, dilation=child.dilation, groups=child.groups,
                             bias=child.bias is not None, eps=eps, device=child.weight.device,
                             dtype=child.weight.dtype)
            conv.weight = child.weight
            conv.bias = child.bias
            setattr(module, name, conv)
        else:
            standardize_convs(child, eps)
    return module


class WSBCNResNet(ResNet):
    """timm's ResNet with weight-standardised convs and Batch-Channel Normalization.

    ``bcn_estimate=True`` selects the micro-batch BCN (running estimates in training too).
    """

    def __init__(
            self,
            block: type[BasicBlock | Bottleneck] = Bottleneck,
            layers: tuple[int, ...] = (3, 4, 6, 3),
            channels: tuple[int, ...] = (64, 128, 256, 512),
            bcn_groups: int = 32,
            bcn_estimate: bool = False,
            bcn_moving_speed: float = 0.1,
            zero_init_last: bool = True,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        norm_layer = partial(BatchChannelNorm2d, num_groups=bcn_groups, estimate=bcn_estimate,
                             moving_speed=bcn_moving_speed)
        super().__init__(block=block, layers=layers, channels=channels, num_classes=num_classes, in_chans=in_chans,
                         global_pool=global_pool, norm_layer=norm_layer, drop_rate=drop_rate,
                         drop_path_rate=drop_path_rate, zero_init_last=zero_init_last, device=device, dtype=dtype)
        standardize_convs(self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """BCN's per-group affine is stored (1, G, 1), so timm's "skip 1-d params" rule misses it."""
        return {f'{name}.{p}' for name, m in self.named_modules() if isinstance(m, BatchChannelNorm2d)
                for p in ('weight', 'bias')}


def _conv_before(norm: str) -> str:
    """The conv feeding a norm in the ResNet layout: ``bn1`` <- ``conv1``, ``downsample.1`` <- ``downsample.0``."""
    if norm.endswith('downsample.1'):
        return norm[:-1] + '0'
    head, _, last = norm.rpartition('.')
    return (head + '.' if head else '') + last.replace('bn', 'conv')


def convert_official(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official ``l_resnet*`` checkpoint -> ours. The keys are ours already (torchvision names, BCN
    as ``bnX.{weight,bias,pbn.*}``); the DataParallel ``module.`` prefix is dropped.

    The official WS divides by the *unbiased* std of each filter, timm's ``StdConv2d`` by the
    biased one, so our conv outputs are the official ones times
    s_o = sqrt((var_unbiased_o + eps) / (var_biased_o + eps)) per output channel. In training
    the batch statistics absorb s_o; for the stored running statistics of the following batch
    norm we apply it here (mean * s, var * s^2), so eval outputs match the official model.
    A micro-batch model takes its moving speed from itself when the checkpoint has none.
    """
    out = {k.removeprefix('module.'): v for k, v in state_dict.items()}
    for key in [k for k in out if k.endswith('.pbn.running_mean')]:
        norm = key.removesuffix('.pbn.running_mean')
        weight = out.get(_conv_before(norm) + '.weight')
        if weight is None:
            continue  # the strict load names the missing conv
        w = weight.flatten(1).double()
        scale = ((w.var(1) + 1e-5) / (w.var(1, unbiased=False) + 1e-5)).sqrt()
        out[key] = out[key] * scale.to(out[key].dtype)
        var_key = norm + '.pbn.running_var'
        if var_key in out:
            out[var_key] = out[var_key] * scale.square().to(out[var_key].dtype)
    for key, value in model.state_dict().items():
        if key.endswith('estbn_moving_speed') and key not in out:
            out[key] = value
    return out


# model name -> its WSBCNResNet arguments
_ARCHS = {
    **{f'gf_resnet{depth}_ws_bcn': dict(block=Bottleneck if bottleneck else BasicBlock, layers=layers)
       for depth, (layers, bottleneck) in RESNET_DEPTHS.items()},
    'gf_resnet_nano_ws_bcn': dict(block=BasicBlock, layers=(1, 1, 1, 1), channels=(32, 32, 64, 64), bcn_groups=8,
                                  zero_init_last=False),
}

for _prefix in _ARCHS:
    register_official_converter(_prefix)(convert_official)

default_cfgs = resnet_default_cfgs(_ARCHS, 'arXiv:1903.10520')


def _create(variant: str, pretrained: bool = False, **kwargs) -> WSBCNResNet:
    return build_resnet(WSBCNResNet, variant, pretrained, **{**_ARCHS[variant], **kwargs})


@register_gf_model
def gf_resnet18_ws_bcn(pretrained: bool = False, **kwargs) -> WSBCNResNet:
    """ResNet-18 with WS + BCN (official ``l_resnet18``): 11.7M params."""
    return _create('gf_resnet18_ws_bcn', pretrained, **kwargs)


@register_gf_model
def gf_resnet34_ws_bcn(pretrained: bool = False, **kwargs) -> WSBCNResNet:
    """ResNet-34 with WS + BCN (official ``l_resnet34``): 21.8M params."""
    return _create('gf_resnet34_ws_bcn', pretrained, **kwargs)


@register_gf_model
def gf_resnet50_ws_bcn(pretrained: bool = False, **kwargs) -> WSBCNResNet:
    """ResNet-50 with WS + BCN (official ``l_resnet50``, released ImageNet weights): 25.6M params."""
    return _create('gf_resnet50_ws_bcn', pretrained, **kwargs)


@register_gf_model
def gf_resnet101_ws_bcn(pretrained: bool = False, **kwargs) -> WSBCNResNet:
    """ResNet-101 with WS + BCN (official ``l_resnet101``, released ImageNet weights): 44.6M params."""
    return _create('gf_resnet101_ws_bcn', pretrained, **kwargs)


@register_gf_model
def gf_resnet_nano_ws_bcn(pretrained: bool = False, **kwargs) -> WSBCNResNet:
    """A test-sized WS + BCN ResNet (32x32 input): basic blocks, widths 32-64, 8 BCN groups.

    Its residual branches do not start at zero (``zero_init_last=False``), so every parameter
    gets a gradient from the first step.
    """
    return _create('gf_resnet_nano_ws_bcn', pretrained, **kwargs)
