"""The MaskGIT VQGAN tokenizer in the taming layout that MAGE and ENAT ship, and its strict loader.

Chang et al., "MaskGIT", CVPR 2022, arXiv 2202.04200 (tokenizer Sec. 3); the JAX weights converted
by MAGE (``vqgan_jax_strongaug.ckpt``) load into ENAT's ``taming/models/vqgan.py`` ``VQModel`` with
``vq-f16-jax.yaml`` (``LeapLabTHU/ENAT`` at 550f22c): ch 128, ch_mult (1, 1, 2, 2, 4), 2 residual
blocks per level, z 256, codebook 1024 x 256, f = 16 (256 px -> 16 x 16 codes). This network is
not a diffusers ``VQModel`` nor the usual taming one, so it is written here, module for module
under the official names (the state dict loads as is):

- residual blocks: GroupNorm(32, eps 1e-6) -> swish -> bias-free 3x3 conv, twice, and where the
  width changes the shortcut is a bias-free 1x1 conv of the block's *output* h (``x = nin(h)``;
  the block returns nin(h) + h), as the converted JAX model computes it;
- no attention anywhere (``attn_resolutions`` is accepted but unused by the official code);
- encoder: bias-free conv_in, levels of blocks with 2x2 average-pool downsampling, two middle
  blocks, GroupNorm -> swish -> 1x1 conv_out to z; decoder: conv_in, two middle blocks, levels
  (from the coarsest) of blocks with nearest 2x upsampling + 3x3 conv, GroupNorm -> swish -> conv_out;
- quantizer: nearest codebook row in L2 (no quant_conv / post_quant_conv).

Images are in [0, 1] (ENAT clamps decoded samples to [0, 1]) for :meth:`MaskGITVQGAN.encode` and
:meth:`~MaskGITVQGAN.decode`, the official functions; :meth:`~MaskGITVQGAN.encode_to_ids` and
:meth:`~MaskGITVQGAN.decode_ids` are the same maps in genforge's [-1, 1] range, the tokenizer
interface of :mod:`genforge.models.tokenizers` that the token pipelines and token caching use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from torch import nn

from genforge.core.state_dict import load_state_dict_strict, read_state_dict
from genforge.models.maskgit import check_token_ids


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        changes_width = in_channels != out_channels
        self.nin_shortcut = nn.Conv2d(out_channels, out_channels, 1, bias=False) if changes_width else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(h) if self.nin_shortcut is not None else x) + h


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], resample: nn.Module | None = None, name: str = "") -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    if resample is not None:
        setattr(level, name, resample)
    return level


def _middle(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.block_2 = ResnetBlock(channels, channels), ResnetBlock(channels, channels)
    return mid


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, in_channels: int, z_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        width = ch
        for level, mult in enumerate(ch_mult):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(width, ch * mult))
                width = ch * mult
            self.down.append(_level(blocks))
        self.mid = _middle(width)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for index, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if index != len(self.down) - 1:
                h = F.avg_pool2d(h, 2)
        h = self.mid.block_2(self.mid.block_1(h))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, out_ch: int, z_channels: int):
        super().__init__()
        width = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = _middle(width)
        levels = []
        for level in reversed(range(len(ch_mult))):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(width, ch * ch_mult[level]))
                width = ch * ch_mult[level]
            levels.insert(0, _level(blocks, Upsample(width) if level else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for index in reversed(range(len(self.up))):
            for block in self.up[index].block:
                h = block(h)
            if index:
                h = self.up[index].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class MaskGITVQGAN(ModelMixin, ConfigMixin):
    """The MaskGIT VQGAN: ``encode`` images in [0, 1] to (B, h*w) code ids, ``decode`` ids to images."""

    @register_to_config
    def __init__(self, ch: int = 128, ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 in_channels: int = 3, out_ch: int = 3, z_channels: int = 256, n_embed: int = 1024):
        super().__init__()
        self.encoder = Encoder(ch, tuple(ch_mult), num_res_blocks, in_channels, z_channels)
        self.decoder = Decoder(ch, tuple(ch_mult), num_res_blocks, out_ch, z_channels)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(n_embed, z_channels)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, h*w) ids of the nearest codes (row-major grid)."""
        z = rearrange(self.encoder(images), "b c h w -> b (h w) c")
        codes = self.quantize.embedding.weight  # (K, c)
        distances = z.pow(2).sum(-1, keepdim=True) + codes.pow(2).sum(-1) - 2 * z @ codes.t()
        return distances.argmin(dim=-1)

    def decode(self, ids: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, h*w) ids -> (B, C, H, W) images (unclamped; the official code clamps to [0, 1])."""
        check_token_ids(ids, self.config.n_embed, height * width, allow_mask=False)
        z = rearrange(self.quantize.embedding(ids), "b (h w) c -> b c h w", h=height, w=width)
        return self.decoder(z)

    @property
    def codebook_size(self) -> int:
        return int(self.config.n_embed)

    @property
    def in_channels(self) -> int:
        return int(self.config.in_channels)

    def encode_to_ids(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`encode` of images in [-1, 1]."""
        return self.encode((images + 1) / 2)

    def decode_ids(self, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """:meth:`decode` on a ``grid = (h, w)``, mapped to [-1, 1] (unclamped)."""
        return self.decode(ids, *grid) * 2 - 1


def load_official_vqgan(path, **config) -> MaskGITVQGAN:
    """A :class:`MaskGITVQGAN` (``config`` as its constructor; ``vq-f16-jax.yaml`` by default) from the
    official checkpoint (``vqgan_jax_strongaug.ckpt``, read with ``weights_only=True``), loaded strictly."""
    model = MaskGITVQGAN(**config)
    load_state_dict_strict(model, read_state_dict(path), what=f"official MaskGIT VQGAN checkpoint {path}")
    return model
