"""MOAT: alternating mobile convolution and attention.

Yang et al., "MOAT: Alternating Mobile Convolution and Attention Brings Strong Vision
Models", ICLR 2023, arXiv 2210.01820. The official code is TensorFlow (google-research/deeplab2,
``model/pixel_encoder/moat.py``, ``model/layers/moat_blocks.py``, ``moat_attention.py``);
the configurations and block details below follow it.

- MBConv block (the MobileNetV2 inverted residual, as in CoAtNet)::

      y = shortcut(x) + DropPath(W_shrink SE(GELU(BN(DW3x3(GELU(BN(W_expand BN(x))))))))

  with expansion 4; the depthwise conv carries the stride; when downsampling the shortcut
  is a 2x2 stride-2 average pool, followed by a 1x1 conv (with bias) when the width changes.
  SE (reduction to C_out/4, SiLU) is used in the MBConv stages only.
- MOAT block: the transformer's MLP is replaced by an MBConv (no SE) that runs *before*
  self-attention, and no MLP follows the attention::

      x = MBConv(x);   x = x + DropPath(Attn(LN(x)))

- Attention: multi-head self-attention with head size 32 and a 2-D relative position bias,
  as in CoAtNet (Dai et al., arXiv 2106.04803), computed by timm's ``Attention`` (fused
  scaled-dot-product attention with the bias as its additive mask)::

      logits_(n, i, j) = q_i . k_j / sqrt(d) + B_n[h_j - h_i, w_j - w_i]

  with one learnable (2P - 1) x (2P - 1) table B_n per head, P = 14 at stride 16 and 7 at
  stride 32, bilinearly resized to (2H - 1) x (2W - 1) when the map is H x W. Attention is
  global over the whole map, the ImageNet setting (``get_model(window_size=None)``).
- Layout: conv stem (3x3 stride 2, BN, GELU, 3x3) -> 2 MBConv stages -> 2 MOAT stages, each
  stage halving the resolution in its first block -> mean pool, LayerNorm, linear head.

Convolutions use TF "same" padding (``timm.layers.create_conv2d(padding='same')``) and
BatchNorm uses TF's defaults (eps 1e-3, momentum 0.99, i.e. torch momentum 0.01), so the
feature grid matches the official model. There is no PyTorch checkpoint of MOAT, so there
is no official-checkpoint converter here. The model scripts (TorchScript) and traces (FX);
the relative position bias, whose size follows the input map, is an FX leaf module.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import (Attention, DropPath, LayerNorm2d, NormMlpClassifierHead, SEModule, create_conv2d,
                         register_notrace_module)
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs
from torch import nn

from genforge.backbones.registry import register_gf_model
from genforge.backbones.staged import StagedBackbone

__all__ = ["MBConvBlock", "Moat", "MoatBlock", "RelativePositionBias"]

BatchNorm2d = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)


class MBConvBlock(nn.Module):
    """Inverted residual: shortcut(x) + DropPath(shrink(SE(GELU(BN(dw(GELU(BN(expand(BN(x))))))))))."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, expansion_rate: int = 4,
                 se_ratio: float | None = 0.25, drop_path: float = 0.):
        super().__init__()
        inner = out_chs * expansion_rate
        # Official shortcut: 2x2 average pool (TF "same": partial windows average their valid pixels).
        self.shortcut_pool = (nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1
                              else nn.Identity())
        self.shortcut_conv = nn.Conv2d(in_chs, out_chs, 1) if in_chs != out_chs else nn.Identity()
        self.pre_norm = BatchNorm2d(in_chs)
        self.expand_conv = nn.Conv2d(in_chs, inner, 1, bias=False)
        self.expand_norm = BatchNorm2d(inner)
        self.depthwise_conv = create_conv2d(inner, inner, 3, stride=stride, depthwise=True, padding='same')
        self.depthwise_norm = BatchNorm2d(inner)
        self.act = nn.GELU()
        self.se = (SEModule(inner, rd_channels=max(1, int(out_chs * se_ratio)), act_layer=nn.SiLU)
                   if se_ratio else nn.Identity())
        self.shrink_conv = nn.Conv2d(inner, out_chs, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut_conv(self.shortcut_pool(x))                   # (B, C_out, H/s, W/s)
        y = self.act(self.expand_norm(self.expand_conv(self.pre_norm(x))))     # (B, 4 C_out, H, W)
        y = self.act(self.depthwise_norm(self.depthwise_conv(y)))              # (B, 4 C_out, H/s, W/s)
        y = self.shrink_conv(self.se(y))                                       # (B, C_out, H/s, W/s)
        return shortcut + self.drop_path(y)


@register_notrace_module  # reason: the table is resized when the map size (a Proxy under FX) differs
class RelativePositionBias(nn.Module):
    """B_n[Δh, Δw] from a per-head (2P - 1) x (2P - 1) table, as an (heads, HW, HW) additive bias.

    Entry (n, i, j) is ``table[n, h_j - h_i + H - 1, w_j - w_i + W - 1]``: it depends only on
    the offset from query i to key j. For a map other than P x P the table is first resized
    bilinearly (half-pixel centres, no antialiasing, as TF's ``tf.image.resize``).
    """

    def __init__(self, num_heads: int, size: int):
        super().__init__()
        self.size = size
        self.relative_position_embedding = nn.Parameter(torch.zeros(num_heads, 2 * size - 1, 2 * size - 1))

    def forward(self, height: int, width: int) -> torch.Tensor:
        table = self.relative_position_embedding
        if table.shape[-2] != 2 * height - 1 or table.shape[-1] != 2 * width - 1:
            table = F.interpolate(table[None], size=(2 * height - 1, 2 * width - 1), mode='bilinear',
                                  align_corners=False)[0]
        rows = torch.arange(height, device=table.device)
        cols = torch.arange(width, device=table.device)
        dh = rows[None, :] - rows[:, None] + height - 1                 # (H_query, H_key)
        dw = cols[None, :] - cols[:, None] + width - 1                  # (W_query, W_key)
        bias = table[:, dh[:, None, :, None], dw[None, :, None, :]]     # (heads, Hq, Wq, Hk, Wk)
        return bias.reshape(-1, height * width, height * width)


class MoatBlock(nn.Module):
    """x = MBConv(x) (no SE); x = x + DropPath(Attn(LN(x))) with relative-position attention."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, expansion_rate: int = 4, head_size: int = 32,
                 pos_embed_size: int | None = 7, ln_eps: float = 1e-5, drop_path: float = 0.):
        super().__init__()
        if out_chs % head_size:
            raise ValueError(f"MOAT block width {out_chs} is not a multiple of head_size {head_size}")
        num_heads = out_chs // head_size
        self.mbconv = MBConvBlock(in_chs, out_chs, stride, expansion_rate, se_ratio=None, drop_path=drop_path)
        self.norm = nn.LayerNorm(out_chs, eps=ln_eps)
        self.attn = Attention(out_chs, num_heads, qkv_bias=True)
        self.rel_pos = RelativePositionBias(num_heads, pos_embed_size) if pos_embed_size else None
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mbconv(x)                                              # (B, C, H, W)
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)                           # (B, HW, C)
        bias = None if self.rel_pos is None else self.rel_pos(H, W)[None]  # (1, heads, HW, HW)
        tokens = tokens + self.drop_path(self.attn(self.norm(tokens), attn_mask=bias))
        return tokens.transpose(1, 2).reshape(B, C, H, W)


class MoatStage(nn.Module):
    """``depth`` blocks of one type; the first one halves the resolution."""

    def __init__(self, block_type: str, in_chs: int, out_chs: int, depth: int, drop_path_rates: list[float],
                 expansion_rate: int, se_ratio: float | None, head_size: int, pos_embed_size: int | None):
        super().__init__()
        self.grad_checkpointing = False
        blocks = []
        for i, dpr in enumerate(drop_path_rates[:depth]):
            chs, stride = (in_chs, 2) if i == 0 else (out_chs, 1)
            if block_type == 'mbconv':
                blocks.append(MBConvBlock(chs, out_chs, stride, expansion_rate, se_ratio, drop_path=dpr))
            elif block_type == 'moat':
                blocks.append(MoatBlock(chs, out_chs, stride, expansion_rate, head_size, pos_embed_size, drop_path=dpr))
            else:
                raise ValueError(f"MOAT block type must be 'mbconv' or 'moat'; got {block_type!r}")
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class Moat(StagedBackbone):
    """MOAT image classifier with the timm model contract."""

    def __init__(
            self,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            stem_size: tuple[int, int] = (64, 64),
            block_types: tuple[str, ...] = ('mbconv', 'mbconv', 'moat', 'moat'),
            depths: tuple[int, ...] = (2, 3, 7, 2),
            dims: tuple[int, ...] = (96, 192, 384, 768),
            expansion_rate: int = 4,
            se_ratio: float | None = 0.25,
            head_size: int = 32,
            pos_embed_sizes: tuple[int | None, ...] = (None, None, 14, 7),
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            bn_momentum: float = 0.01,
    ):
        super().__init__()
        if not len(block_types) == len(depths) == len(dims) == len(pos_embed_sizes):
            raise ValueError(f"block_types {block_types}, depths {depths}, dims {dims} and pos_embed_sizes "
                             f"{pos_embed_sizes} must have one entry per stage")
        self.num_classes = num_classes
        self.drop_rate = drop_rate

        # Stem: (B, in_chans, H, W) -> (B, stem_size[1], H/2, W/2).
        self.stem = nn.Sequential(OrderedDict(
            conv0=create_conv2d(in_chans, stem_size[0], 3, stride=2, padding='same', bias=True),
            norm0=BatchNorm2d(stem_size[0]),
            act0=nn.GELU(),
            conv1=create_conv2d(stem_size[0], stem_size[1], 3, padding='same', bias=True)))

        # Official stochastic depth: block b of N drops with rate drop_path_rate * b / N.
        total = sum(depths)
        dpr = [drop_path_rate * b / total for b in range(total)]
        stages, in_chs = [], stem_size[1]
        for i, (block_type, depth, dim, pos) in enumerate(zip(block_types, depths, dims, pos_embed_sizes)):
            stages.append(MoatStage(block_type, in_chs, dim, depth, dpr[sum(depths[:i]):], expansion_rate,
                                    se_ratio, head_size, pos))
            in_chs = dim
        self.stages = nn.Sequential(*stages)
        self.feature_info = [dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f'stages.{i}')
                             for i in range(len(dims))]
        self.num_features = self.head_hidden_size = dims[-1]
        self.head = NormMlpClassifierHead(dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                          norm_layer=partial(LayerNorm2d, eps=1e-5))
        self.apply(self._init_weights)
        # TF's BN momentum 0.99 is torch's 0.01: right for the official 300k-step schedules, but
        # over a few hundred steps the running statistics would not reach the batch statistics
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = bn_momentum

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Official initialisers: N(0, 0.02) kernels and relative position tables, zero biases."""
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RelativePositionBias):
            nn.init.normal_(m.relative_position_embedding, std=.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith('relative_position_embedding')}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r'^stem', blocks=r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.blocks\.(\d+)')


def _create(variant: str, pretrained: bool = False, **kwargs) -> Moat:
    return build_model_with_cfg(Moat, variant, pretrained,
                                feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)), **kwargs)


def _cfg(**kwargs) -> dict:
    """Input normalisation "option 1" of the official checkpoints (ImageNet mean/std) unless overridden."""
    return {**dict(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                   interpolation='bicubic', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                   first_conv='stem.conv0', classifier='head.fc', paper_ids='arXiv:2210.01820',
                   license='apache-2.0'), **kwargs}


default_cfgs = generate_default_cfgs({
    'gf_moat_0': _cfg(),
    'gf_moat_1': _cfg(),
    'gf_moat_2': _cfg(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0, mean=(0.5, 0.5, 0.5),
                      std=(0.5, 0.5, 0.5)),
    'gf_tiny_moat_0': _cfg(input_size=(3, 256, 256), pool_size=(8, 8)),
    'gf_tiny_moat_1': _cfg(input_size=(3, 256, 256), pool_size=(8, 8)),
    'gf_tiny_moat_2': _cfg(input_size=(3, 256, 256), pool_size=(8, 8)),
    'gf_moat_nano': _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
})


@register_gf_model
def gf_moat_0(pretrained: bool = False, **kwargs) -> Moat:
    """MOAT-0: 27.8M params, 83.3% ImageNet-1k top-1 at 224."""
    return _create('gf_moat_0', pretrained, stem_size=(64, 64), depths=(2, 3, 7, 2), dims=(96, 192, 384, 768),
                   **kwargs)


@register_gf_model
def gf_moat_1(pretrained: bool = False, **kwargs) -> Moat:
    """MOAT-1: 41.6M params, 84.2% ImageNet-1k top-1 at 224."""
    return _create('gf_moat_1', pretrained, stem_size=(64, 64), depths=(2, 6, 14, 2), dims=(96, 192, 384, 768),
                   **kwargs)


@register_gf_model
def gf_moat_2(pretrained: bool = False, **kwargs) -> Moat:
    """MOAT-2: 73.4M params, 87.5% top-1 at 384 (ImageNet-22k, then 1k)."""
    return _create('gf_moat_2', pretrained, stem_size=(128, 128), depths=(2, 6, 14, 2),
                   dims=(128, 256, 512, 1024), **kwargs)


@register_gf_model
def gf_tiny_moat_0(pretrained: bool = False, **kwargs) -> Moat:
    """tiny-MOAT-0: 3.4M params, 76.6% ImageNet-1k top-1 at 256."""
    return _create('gf_tiny_moat_0', pretrained, stem_size=(32, 32), depths=(2, 3, 7, 2), dims=(32, 64, 128, 256),
                   **kwargs)


@register_gf_model
def gf_tiny_moat_1(pretrained: bool = False, **kwargs) -> Moat:
    """tiny-MOAT-1: 5.1M params, 79.2% ImageNet-1k top-1 at 256."""
    return _create('gf_tiny_moat_1', pretrained, stem_size=(40, 40), depths=(2, 3, 7, 2), dims=(40, 80, 160, 320),
                   **kwargs)


@register_gf_model
def gf_tiny_moat_2(pretrained: bool = False, **kwargs) -> Moat:
    """tiny-MOAT-2: 9.8M params, 81.7% ImageNet-1k top-1 at 256."""
    return _create('gf_tiny_moat_2', pretrained, stem_size=(56, 56), depths=(2, 3, 7, 2),
                   dims=(56, 112, 224, 448), **kwargs)


@register_gf_model
def gf_moat_nano(pretrained: bool = False, **kwargs) -> Moat:
    """A test-sized MOAT (64x64 input, so the last MOAT stage still attends over a 2x2 map).

    Its BatchNorm momentum is torch's 0.1, for runs of hundreds rather than 300k steps.
    """
    return _create('gf_moat_nano', pretrained, **{**dict(stem_size=(8, 8), depths=(1, 1, 2, 1), dims=(8, 16, 32, 64),
                   head_size=8, pos_embed_sizes=(None, None, 4, 2), bn_momentum=0.1), **kwargs})
