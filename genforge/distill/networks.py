"""The matching and evaluation networks of dataset distillation: ConvNet-D{1..4}.

The field's standard network (Zhao & Bilen, DC, arXiv 2006.05929, and every method since;
VICO-UoE/DatasetCondensation ``networks.ConvNet``): ``depth`` blocks of
Conv3x3(``width``, padding 1) -> norm -> ReLU -> AvgPool2x2, then flatten and one Linear
layer. "instancenorm" is ``GroupNorm(C, C, affine=True)`` (the default setting), "batchnorm"
is ``BatchNorm2d`` (ConvNetBN, and what DataDAM's code hard-codes), "none" drops the norm.
On 32x32 input ConvNet-3 ends at 128x4x4, a 2048-dim embedding; the digits benchmark uses
ConvNet-D2 of width 32 on 8x8 input (8 -> 4 -> 2, a 128-dim embedding).

VICO's version pads the first conv by 3 for 1-channel input (so 28x28 MNIST reaches 32x32
features); genforge always pads by 1, as the spec's ConvNet-D2-digits says.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ConvNet", "ConvNetConfig", "NORMS", "build_convnet"]

NORMS = ("instancenorm", "batchnorm", "none")


@dataclass(frozen=True)
class ConvNetConfig:
    """Width, depth and norm of a ConvNet (the field's defaults are 128, 3, instance norm)."""

    width: int = 128
    depth: int = 3
    norm: str = "instancenorm"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown ConvNet norm {self.norm!r}; expected one of {NORMS}")
        if not 1 <= self.depth <= 4:
            raise ValueError(f"ConvNet depth must be 1..4 (ConvNet-D1..D4), got {self.depth}")
        if self.width < 1:
            raise ValueError(f"ConvNet width must be positive, got {self.width}")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class ConvNet(nn.Module):
    """ConvNet-D``depth``: ``blocks[i]`` = conv -> norm -> ReLU -> avg-pool; ``classifier`` on the flat map."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, config: ConvNetConfig):
        super().__init__()
        if image_size % (2 ** config.depth):
            raise ValueError(f"ConvNet-D{config.depth} halves the image {config.depth} times; "
                             f"image size {image_size} is not divisible by {2 ** config.depth}")
        self.config = config
        blocks = []
        channels = in_channels
        for _ in range(config.depth):
            blocks.append(nn.Sequential(
                nn.Conv2d(channels, config.width, kernel_size=3, padding=1),
                _norm(config.norm, config.width),
                nn.ReLU(),
                nn.AvgPool2d(2, 2),
            ))
            channels = config.width
        self.blocks = nn.ModuleList(blocks)
        side = image_size // 2 ** config.depth
        self.embed_dim = config.width * side * side
        self.classifier = nn.Linear(self.embed_dim, num_classes)

    def activations(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """The post-ReLU map of every block (before pooling) and the flat embedding.

        This is what DataDAM's forward hooks on ``nn.ReLU`` collect: ``maps[i]`` is
        ``(B, width, H_i, W_i)``; the embedding is ``(B, width * side**2)``.
        """
        maps = []
        for block in self.blocks:
            conv, norm, act, pool = block
            x = act(norm(conv(x)))
            maps.append(x)
            x = pool(x)
        return maps, x.flatten(1)

    def embed(self, x: Tensor) -> Tensor:
        """The flat output of the last block, ``(B, embed_dim)`` (DM's feature)."""
        for block in self.blocks:
            x = block(x)
        return x.flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


def build_convnet(in_channels: int, num_classes: int, image_size: int, *, width: int = 128,
                  depth: int = 3, norm: str = "instancenorm", seed: int | None = None) -> ConvNet:
    """A freshly initialised ConvNet; ``seed`` makes the initialisation reproducible."""
    config = ConvNetConfig(width=width, depth=depth, norm=norm)
    if seed is None:
        return ConvNet(in_channels, num_classes, image_size, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ConvNet(in_channels, num_classes, image_size, config)
