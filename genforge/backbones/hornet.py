"""HorNet: high-order spatial interactions with recursive gated convolutions (gnConv).

Rao et al., "HorNet: Efficient High-Order Spatial Interactions with Recursive Gated
Convolutions", NeurIPS 2022, arXiv 2207.14284. Implemented here (Sec. 3 and the
official ``hornet.py`` of raoyongming/HorNet):

- gnConv of order n on C channels (Eq. 3-5). Widths C_k = C / 2^(n-1-k), k = 0..n-1, so
  C_0 + sum_k C_k = 2C and C_(n-1) = C::

      [p_0, q_0 .. q_(n-1)] = phi_in(x)                 1x1 conv, C -> 2C       (Eq. 3)
      p_(k+1) = f_k(q_k) * g_k(p_k),  k = 0..n-1        g_0 = id, g_k 1x1 conv  (Eq. 4)
      y = phi_out(p_n)                                  1x1 conv, C -> C

  f is one 7x7 depthwise conv over all q_k at once (depthwise, so the same as one per gate)
  scaled by s = 1/3 (the paper's 1/alpha). With n = 1 this is the gated conv
  ``phi_out(p_0 * s DWConv(q_0))``.
- HorNet-GF: in stages 3-4, f is a global-local filter: half of the channels
  through a 3x3 depthwise conv, the other half multiplied by a learnable filter in the 2-D
  FFT domain (GFNet), the halves interleaved channel by channel, LayerNorm before and after.
- Block (ConvNeXt-style): x += gamma_1 gnConv(LN(x)); x += gamma_2 MLP(LN(x)), MLP
  ratio 4 with GELU, layer scale gamma initialised to 1e-6.
- Layout: 4x4 stride-4 stem + LN; LN + 2x2 stride-2 conv between stages; widths C, 2C, 4C,
  8C; gnConv orders 2, 3, 4, 5; mean-pool -> LN -> linear head.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, NormMlpClassifierHead, register_notrace_function, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs
from torch import nn

from genforge.backbones.registry import register_gf_model, register_official_converter
from genforge.backbones.staged import StagedBackbone, convnext_layout_key

__all__ = ["GlobalLocalFilter", "GnConv", "HorNet", "HorNetBlock", "global_filter", "gnconv_widths"]


def gnconv_widths(dim: int, order: int) -> list[int]:
    """[C_0, ..., C_(n-1)] with C_k = C / 2^(n-1-k) (Eq. 5), smallest first."""
    if order < 1 or dim % 2 ** (order - 1):
        raise ValueError(f"gnConv of order {order} needs a width divisible by {2 ** max(order - 1, 0)}; got {dim}")
    return [dim // 2 ** (order - 1 - k) for k in range(order)]


class GlobalLocalFilter(nn.Module):
    """HorNet-GF's f: 3x3 depthwise conv on one half, a 2-D FFT global filter on the other.

    ``filter_size`` (h, w) is the rfft2 size the learned filter is stored at (14x8 for the
    14x14 maps of stage 3 at 224 px); other map sizes use a bilinear resize of the filter.
    """

    def __init__(self, dim: int, filter_size: tuple[int, int] = (14, 8)):
        super().__init__()
        if dim % 2:
            raise ValueError(f"GlobalLocalFilter splits channels in two; got odd width {dim}")
        half = dim // 2
        self.dw = nn.Conv2d(half, half, kernel_size=3, padding=1, bias=False, groups=half)
        # real and imaginary parts of the frequency-domain filter, (C/2, h, w, 2)
        self.complex_weight = nn.Parameter(torch.empty(half, *filter_size, 2))
        trunc_normal_(self.complex_weight, std=.02)
        self.pre_norm = LayerNorm2d(dim, eps=1e-6)
        self.post_norm = LayerNorm2d(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(x)
        local, glob = x.chunk(2, dim=1)  # (B, C/2, H, W) each
        local = self.dw(local)
        glob = global_filter(glob, self.complex_weight).to(local.dtype)
        # interleave the halves channel by channel: (local_0, global_0, local_1, global_1, ...)
        return self.post_norm(torch.stack((local, glob), dim=2).flatten(1, 2))


@register_notrace_function  # reason: the filter is resized when the map size (a Proxy under FX) differs
def global_filter(x: torch.Tensor, complex_weight: torch.Tensor) -> torch.Tensor:
    """GFNet's global filter: ``irfft2(rfft2(x) * W)`` with W the (C, h, w, 2) real/imaginary filter,
    bilinearly resized to the map's rfft2 size where that differs; computed in float32."""
    height, width = x.shape[-2:]
    # the FFT runs in float32: half-precision rfft2 only takes power-of-two sizes
    spec = torch.fft.rfft2(x.float(), dim=(2, 3), norm='ortho')  # (B, C, H, W // 2 + 1) complex
    weight = complex_weight
    if weight.shape[1:3] != spec.shape[2:4]:
        weight = F.interpolate(weight.permute(3, 0, 1, 2), size=spec.shape[2:4], mode='bilinear',
                               align_corners=True).permute(1, 2, 3, 0)
    spec = spec * torch.view_as_complex(weight.float().contiguous())
    return torch.fft.irfft2(spec, s=(height, width), dim=(2, 3), norm='ortho')


class GnConv(nn.Module):
    """Recursive gated convolution of order n (Eq. 3-5); ``filter_size`` selects the GF variant."""

    def __init__(self, dim: int, order: int = 5, scale: float = 1.0, filter_size: tuple[int, int] | None = None):
        super().__init__()
        self.order = order
        self.dims = gnconv_widths(dim, order)
        self.scale = scale
        self.proj_in = nn.Conv2d(dim, 2 * dim, 1)
        gates = sum(self.dims)
        if filter_size is None:
            self.dwconv = nn.Conv2d(gates, gates, kernel_size=7, padding=3, groups=gates)
        else:
            self.dwconv = GlobalLocalFilter(gates, filter_size)
        self.proj_out = nn.Conv2d(dim, dim, 1)
        self.pws = nn.ModuleList([nn.Conv2d(self.dims[k], self.dims[k + 1], 1) for k in range(order - 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = self.proj_in(x).split((self.dims[0], sum(self.dims)), dim=1)  # (B, C_0, H, W), (B, sum C_k, H, W)
        gates = (self.dwconv(q) * self.scale).split(self.dims, dim=1)  # f_k(q_k), (B, C_k, H, W)
        p = p * gates[0]
        for k, pw in enumerate(self.pws):
            p = pw(p) * gates[k + 1]  # p_(k+1) = g_k(p_k) * f_k(q_k)
        return self.proj_out(p)


class HorNetBlock(nn.Module):
    """x += gamma_1 gnConv(LN(x)); x += gamma_2 MLP(LN(x))."""

    def __init__(self, dim: int, order: int, scale: float, filter_size: tuple[int, int] | None = None,
                 mlp_ratio: float = 4., drop_path: float = 0., layer_scale_init_value: float = 1e-6):
        super().__init__()
        self.norm1 = LayerNorm2d(dim, eps=1e-6)
        self.gnconv = GnConv(dim, order, scale, filter_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, int(mlp_ratio * dim))
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(int(mlp_ratio * dim), dim)
        if layer_scale_init_value > 0:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
        else:
            self.gamma1 = self.gamma2 = None
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gnconv(self.norm1(x))
        if self.gamma1 is not None:
            y = y * self.gamma1[:, None, None]
        x = x + self.drop_path(y)

        y = self.pwconv2(self.act(self.pwconv1(self.norm2(x.permute(0, 2, 3, 1)))))  # (B, H, W, C)
        if self.gamma2 is not None:
            y = y * self.gamma2
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class HorNetStage(nn.Module):
    """Optional LN + 2x2 stride-2 conv, then ``depth`` HorNet blocks of one gnConv order."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, order: int, scale: float,
                 filter_size: tuple[int, int] | None, drop_path_rates: list[float], mlp_ratio: float,
                 layer_scale_init_value: float):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = nn.Identity() if in_chs == out_chs else nn.Sequential(
            LayerNorm2d(in_chs, eps=1e-6), nn.Conv2d(in_chs, out_chs, kernel_size=2, stride=2))
        self.blocks = nn.Sequential(*[
            HorNetBlock(out_chs, order, scale, filter_size, mlp_ratio, drop_path_rates[j], layer_scale_init_value)
            for j in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class HorNet(StagedBackbone):
    """HorNet image classifier with the timm model contract.

    ``filter_sizes[i]`` is None for the 7x7 depthwise gnConv in stage i, or the stored
    (h, w) of the global-local filter for the GF variant.
    """

    def __init__(
            self,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            depths: tuple[int, ...] = (2, 3, 18, 2),
            base_dim: int = 64,
            orders: tuple[int, ...] = (2, 3, 4, 5),
            gnconv_scale: float = 1 / 3,
            filter_sizes: tuple[tuple[int, int] | None, ...] = (None, None, None, None),
            mlp_ratio: float = 4.,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            layer_scale_init_value: float = 1e-6,
            head_init_scale: float = 1.,
    ):
        super().__init__()
        if not len(depths) == len(orders) == len(filter_sizes) == 4:
            raise ValueError(f"HorNet has 4 stages; got depths {depths}, orders {orders}, filter_sizes {filter_sizes}")
        dims = [base_dim * 2 ** i for i in range(4)]
        self.num_classes = num_classes
        self.drop_rate = drop_rate

        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
                                  LayerNorm2d(dims[0], eps=1e-6))  # (B, C, H/4, W/4)
        dpr = [r.tolist() for r in torch.linspace(0, drop_path_rate, sum(depths), device='cpu').split(list(depths))]
        self.stages = nn.Sequential(*[
            HorNetStage(dims[max(i - 1, 0)], dims[i], depths[i], orders[i], gnconv_scale, filter_sizes[i], dpr[i],
                        mlp_ratio, layer_scale_init_value) for i in range(4)])
        self.feature_info = [dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f'stages.{i}') for i in range(4)]
        self.num_features = self.head_hidden_size = dims[-1]
        self.head = NormMlpClassifierHead(dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                          norm_layer=partial(LayerNorm2d, eps=1e-6))
        self.apply(self._init_weights)
        if isinstance(self.head.fc, nn.Linear):
            self.head.fc.weight.data.mul_(head_init_scale)
            self.head.fc.bias.data.mul_(head_init_scale)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@register_official_converter("gf_hornet")
def convert_official(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official ``hornet.py`` keys -> ours, by renaming only (our own layout passes through):
    :func:`~genforge.backbones.staged.convnext_layout_key`."""
    if 'stem.0.weight' in state_dict:
        return dict(state_dict)
    return {convnext_layout_key(key): value for key, value in state_dict.items()}


def _create(variant: str, pretrained: bool = False, **kwargs) -> HorNet:
    return build_model_with_cfg(HorNet, variant, pretrained, pretrained_filter_fn=convert_official,
                                feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)), **kwargs)


def _cfg(**kwargs) -> dict:
    return {**dict(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                   interpolation='bicubic', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                   first_conv='stem.0', classifier='head.fc', paper_ids='arXiv:2207.14284', license='mit'), **kwargs}


default_cfgs = generate_default_cfgs({
    'gf_hornet_tiny_7x7.untrained': _cfg(),
    'gf_hornet_tiny_gf.untrained': _cfg(),
    'gf_hornet_small_7x7.untrained': _cfg(),
    'gf_hornet_small_gf.untrained': _cfg(),
    'gf_hornet_base_7x7.untrained': _cfg(),
    'gf_hornet_base_gf.untrained': _cfg(),
    'gf_hornet_nano.untrained': _cfg(input_size=(3, 32, 32), pool_size=(1, 1)),
})

# Stored filter sizes of the GF variant at 224 px: rfft2 of the 14x14 and 7x7 maps of stages 3-4.
_GF_224 = (None, None, (14, 8), (7, 4))


@register_gf_model
def gf_hornet_tiny_7x7(pretrained: bool = False, **kwargs) -> HorNet:
    """HorNet-T 7x7: 22M params, 82.8% ImageNet-1k top-1."""
    return _create('gf_hornet_tiny_7x7', pretrained, depths=(2, 3, 18, 2), base_dim=64, **kwargs)


@register_gf_model
def gf_hornet_tiny_gf(pretrained: bool = False, **kwargs) -> HorNet:
    """HorNet-T GF: 23M params, 83.0% ImageNet-1k top-1."""
    return _create('gf_hornet_tiny_gf', pretrained, depths=(2, 3, 18, 2), base_dim=64, filter_sizes=_GF_224,
                   **kwargs)


@register_gf_model
def gf_hornet_small_7x7(pretrained: bool = False, **kwargs) -> HorNet:
    """HorNet-S 7x7: 50M params, 83.8% ImageNet-1k top-1."""
    return _create('gf_hornet_small_7x7', pretrained, depths=(2, 3, 18, 2), base_dim=96, **kwargs)


@register_gf_model
def gf_hornet_small_gf(pretrained: bool = False, **kwargs) -> HorNet:
    """HorNet-S GF: 50M params, 84.0% ImageNet-1k top-1."""
    return _create('gf_hornet_small_gf', pretrained, depths=(2, 3, 18, 2), base_dim=96, filter_sizes=_GF_224,
                   **kwargs)


@register_gf_model
def gf_hornet_base_7x7(pretrained: bool = False, **kwargs) -> HorNet:
    """HorNet-B 7x7: 87M params, 84.2% ImageNet-1k top-1."""
    return _create('gf_hornet_base_7x7', pretrained, depths=(2, 3, 18, 2), base_dim=128, **kwargs)


@register_gf_model
def gf_hornet_base_gf(pretrained: bool = False, **kwargs) -> HorNet:
    """HorNet-B GF: 88M params, 84.3% ImageNet-1k top-1."""
    return _create('gf_hornet_base_gf', pretrained, depths=(2, 3, 18, 2), base_dim=128, filter_sizes=_GF_224,
                   **kwargs)


@register_gf_model
def gf_hornet_nano(pretrained: bool = False, **kwargs) -> HorNet:
    """A test-sized HorNet (32x32 input): width 16, one block per stage, GF filters in stages 3-4."""
    return _create('gf_hornet_nano', pretrained, depths=(1, 1, 1, 1), base_dim=16,
                   filter_sizes=(None, None, (2, 2), (1, 1)), **kwargs)
