"""UniRepLKNet: a large-kernel ConvNet with dilated structural re-parameterisation.

Ding et al., "UniRepLKNet: A Universal Perception Large-Kernel ConvNet for Audio, Video,
Point Cloud, Time-Series and Image Recognition", CVPR 2024, arXiv 2311.15599.

Implemented here (image models A/F/P/N/T of the official ``unireplknet.py``):

- Dilated Reparam Block: a K x K depthwise conv plus parallel depthwise convs of kernel k
  and dilation r, each followed by BN, summed::

      y = BN(W_K * x) + sum_(k, r) BN(W_(k, r) *_r x)

  A dilated k x k kernel equals a sparse ((k - 1) r + 1)^2 kernel holding the k^2 weights
  every r-th position (the paper's Eq. 1, :func:`dilated_to_dense_kernel`); padded to K and
  summed with the BN-fused large kernel, the block becomes one K x K conv at inference.
- Block: x + DropPath(gamma * BN(W2 GRN(GELU(W1 SE(BN(DRB(x))))))), with the ConvNeXt-V2
  GRN (Woo et al., arXiv 2301.00808) and an SE gate (ReLU, sigmoid) of width C/4; blocks
  with a 3x3 kernel use a plain depthwise conv in place of the Dilated Reparam Block.
- Deploy structure: ``reparameterize()`` on each block (called by
  ``timm.utils.reparameterize_model``) folds every BN into the preceding conv / linear, the
  dilated branches into the large kernel, GRN's bias into ``pwconv2`` and the layer scale
  gamma into ``pwconv2``, exactly as the official ``reparameterize_unireplknet``. ``deploy=True``
  builds that fused structure directly, so a re-parameterised state dict loads into it.
- Layout: a two-conv stem (stride 4), three 3x3 stride-2 downsamplings, four stages, and a
  mean-pool -> LayerNorm -> linear head. Paper parameter counts are those of the fused model.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, NormMlpClassifierHead, SEModule, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs
from torch import nn

from genforge.backbones.registry import register_gf_model, register_official_converter
from genforge.backbones.staged import StagedBackbone, convnext_layout_key

__all__ = ["DilatedReparamBlock", "UniRepLKNet", "UniRepLKNetBlock", "dilated_to_dense_kernel"]

# (kernel, dilation) of the parallel small branches for each large kernel size K, as in the
# official code (not tuned by the authors).
DILATED_BRANCHES = {
    5: ((3, 1), (3, 2)),
    7: ((5, 1), (3, 2), (3, 3)),
    9: ((5, 1), (5, 2), (3, 3), (3, 4)),
    11: ((5, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    13: ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
    15: ((5, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
    17: ((5, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
}


def fuse_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') with BN(W x + b) = W' x + b' in eval mode; W is (C_out, ...)."""
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    bias = torch.zeros_like(bn.running_mean) if bias is None else bias
    shape = (-1,) + (1,) * (weight.ndim - 1)
    return weight * scale.reshape(shape), bn.bias + (bias - bn.running_mean) * scale


def dilated_to_dense_kernel(kernel: torch.Tensor, dilation: int) -> torch.Tensor:
    """The non-dilated kernel equal to ``kernel`` applied with ``dilation``.

    (C, 1, k, k) -> (C, 1, (k - 1) r + 1, (k - 1) r + 1), zero except every r-th position.
    """
    c, g, k, _ = kernel.shape
    size = (k - 1) * dilation + 1
    dense = kernel.new_zeros(c, g, size, size)
    dense[:, :, ::dilation, ::dilation] = kernel
    return dense


def _depthwise(channels: int, kernel_size: int, bias: bool, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel_size, padding=dilation * (kernel_size - 1) // 2,
                     dilation=dilation, groups=channels, bias=bias)


class DilatedReparamBlock(nn.Module):
    """K x K depthwise conv + BN, plus parallel dilated depthwise convs + BN, summed.

    Branch (k, r) is ``dilated[f"k{k}_{r}"]`` = (``conv``, ``bn``); the official keys
    ``dil_conv_k{k}_{r}`` / ``dil_bn_k{k}_{r}`` convert to it by renaming.
    """

    __constants__ = ['deploy']  # TorchScript compiles only the structure this block has

    def __init__(self, channels: int, kernel_size: int, deploy: bool = False):
        super().__init__()
        if kernel_size not in DILATED_BRANCHES:
            raise ValueError(f"Dilated Reparam Block has settings for kernel sizes {sorted(DILATED_BRANCHES)}; "
                             f"got {kernel_size}")
        self.branches = DILATED_BRANCHES[kernel_size]
        self.deploy = deploy
        self.lk_origin = _depthwise(channels, kernel_size, bias=deploy)
        if not deploy:
            self.origin_bn = nn.BatchNorm2d(channels)
            self.dilated = nn.ModuleDict({f"k{k}_{r}": nn.Sequential(OrderedDict(
                conv=_depthwise(channels, k, bias=False, dilation=r), bn=nn.BatchNorm2d(channels)))
                for k, r in self.branches})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.lk_origin(x)
        else:
            out = self.origin_bn(self.lk_origin(x))
            for branch in self.dilated.values():
                out = out + branch(x)
            return out

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge every branch into ``lk_origin`` (one K x K conv with bias); idempotent."""
        if self.deploy:
            return
        weight, bias = fuse_bn(self.lk_origin.weight, None, self.origin_bn)
        size = weight.shape[-1]
        for branch in self.dilated.values():
            w, b = fuse_bn(branch.conv.weight, None, branch.bn)
            w = dilated_to_dense_kernel(w, branch.conv.dilation[0])
            pad = (size - w.shape[-1]) // 2
            weight, bias = weight + F.pad(w, [pad] * 4), bias + b
        del self.origin_bn, self.dilated
        self.lk_origin = _depthwise(weight.shape[0], size, bias=True).to(weight)
        self.lk_origin.weight.copy_(weight)
        self.lk_origin.bias.copy_(bias)
        self.deploy = True


class GRN(nn.Module):
    """Global Response Normalization on (B, H, W, C): x + gamma * x * N(x) + beta.

    N(x) = ||x||_(H,W) / mean_C ||x||_(H,W) (ConvNeXt V2). ``use_bias=False`` is the
    deploy form, whose beta has been folded into the next linear layer.
    """

    def __init__(self, dim: int, use_bias: bool = True, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim)) if use_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)  # (B, 1, 1, C)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        out = x + self.gamma * (x * nx)
        return out if self.beta is None else out + self.beta


class UniRepLKNetBlock(nn.Module):
    """x + DropPath(gamma * BN(pwconv2(GRN(GELU(pwconv1(SE(BN(dwconv(x)))))))))."""

    def __init__(self, dim: int, kernel_size: int, drop_path: float = 0., layer_scale_init_value: float | None = 1e-6,
                 deploy: bool = False, ffn_factor: int = 4):
        super().__init__()
        self.deploy = deploy
        if kernel_size >= 7:
            self.dwconv = DilatedReparamBlock(dim, kernel_size, deploy=deploy)
        elif kernel_size in (3, 5):
            self.dwconv = _depthwise(dim, kernel_size, bias=deploy)
        else:
            raise ValueError(f"UniRepLKNet block kernel size must be 3, 5 or >= 7; got {kernel_size}")
        self.norm = nn.Identity() if deploy else nn.BatchNorm2d(dim)
        self.se = SEModule(dim, rd_channels=dim // 4)
        ffn_dim = int(ffn_factor * dim)
        self.pwconv1 = nn.Linear(dim, ffn_dim)
        self.act = nn.GELU()
        self.grn = GRN(ffn_dim, use_bias=not deploy)
        self.pwconv2 = nn.Linear(ffn_dim, dim, bias=deploy)
        self.norm2 = nn.Identity() if deploy else nn.BatchNorm2d(dim)
        use_gamma = not deploy and layer_scale_init_value is not None and layer_scale_init_value > 0
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim)) if use_gamma else None
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(self.norm(self.dwconv(x)))
        y = y.permute(0, 2, 3, 1)                               # (B, H, W, C)
        y = self.pwconv2(self.grn(self.act(self.pwconv1(y))))  # (B, H, W, 4C) -> (B, H, W, C)
        y = self.norm2(y.permute(0, 3, 1, 2))                   # (B, C, H, W)
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, 1, 1)
        return x + self.drop_path(y)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold BNs, dilated branches, GRN's beta and gamma into convs/linears; idempotent."""
        if self.deploy:
            return
        if isinstance(self.dwconv, DilatedReparamBlock):
            self.dwconv.reparameterize()
            conv = self.dwconv.lk_origin
        else:
            conv = self.dwconv
        weight, bias = fuse_bn(conv.weight, conv.bias, self.norm)
        fused = _depthwise(weight.shape[0], weight.shape[-1], bias=True).to(weight)
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
        if isinstance(self.dwconv, DilatedReparamBlock):
            self.dwconv.lk_origin = fused
        else:
            self.dwconv = fused
        self.norm = nn.Identity()

        # gamma * BN(W (z + beta)) = W' z + b': GRN's beta enters as the bias W beta, then BN, then gamma.
        weight, bias = fuse_bn(self.pwconv2.weight, self.pwconv2.weight @ self.grn.beta.reshape(-1), self.norm2)
        gamma = torch.ones_like(bias) if self.gamma is None else self.gamma
        linear = nn.Linear(self.pwconv2.in_features, self.pwconv2.out_features).to(weight)
        linear.weight.copy_(weight * gamma[:, None])
        linear.bias.copy_(bias * gamma)
        self.pwconv2 = linear
        self.grn.beta = None
        self.norm2 = nn.Identity()
        self.gamma = None
        self.deploy = True


class UniRepLKNetStage(nn.Module):
    """Optional 3x3 stride-2 conv + LayerNorm downsampling, then blocks at one resolution."""

    def __init__(self, in_chs: int, out_chs: int, downsample: bool, kernel_sizes: tuple[int, ...],
                 drop_path_rates: list[float], layer_scale_init_value: float | None, deploy: bool, ffn_factor: int):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = nn.Identity() if not downsample else nn.Sequential(
            nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1), LayerNorm2d(out_chs, eps=1e-6))
        self.blocks = nn.Sequential(*[
            UniRepLKNetBlock(out_chs, k, drop_path=dpr, layer_scale_init_value=layer_scale_init_value,
                             deploy=deploy, ffn_factor=ffn_factor)
            for k, dpr in zip(kernel_sizes, drop_path_rates)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


_A_F_P_KERNELS = ((3, 3), (13, 13), (13,) * 6, (13, 13))
_N_KERNELS = ((3, 3), (13, 13), (13,) * 8, (13, 13))
_T_KERNELS = ((3, 3, 3), (13, 13, 13), (13, 3) * 9, (13, 13, 13))
DEFAULT_KERNEL_SIZES = {(2, 2, 6, 2): _A_F_P_KERNELS, (2, 2, 8, 2): _N_KERNELS, (3, 3, 18, 3): _T_KERNELS}


class UniRepLKNet(StagedBackbone):
    """UniRepLKNet image classifier with the timm model contract."""

    def __init__(
            self,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            depths: tuple[int, ...] = (3, 3, 18, 3),
            dims: tuple[int, ...] = (80, 160, 320, 640),
            kernel_sizes: tuple[tuple[int, ...], ...] | None = None,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            layer_scale_init_value: float | None = 1e-6,
            ffn_factor: int = 4,
            deploy: bool = False,
    ):
        super().__init__()
        depths, dims = tuple(depths), tuple(dims)
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"UniRepLKNet has 4 stages; got depths {depths} and dims {dims}")
        if kernel_sizes is None:
            if depths not in DEFAULT_KERNEL_SIZES:
                raise ValueError(f"no default kernel sizes for depths {depths} (defaults exist for "
                                 f"{sorted(DEFAULT_KERNEL_SIZES)}); pass kernel_sizes per block")
            kernel_sizes = DEFAULT_KERNEL_SIZES[depths]
        if [len(k) for k in kernel_sizes] != list(depths):
            raise ValueError(f"kernel_sizes {kernel_sizes} must list one kernel per block of depths {depths}")
        self.num_classes = num_classes
        self.drop_rate = drop_rate

        # Stem: two 3x3 stride-2 convs, (B, in_chans, H, W) -> (B, dims[0], H/4, W/4).
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0] // 2, 3, stride=2, padding=1), LayerNorm2d(dims[0] // 2, eps=1e-6),
            nn.GELU(),
            nn.Conv2d(dims[0] // 2, dims[0], 3, stride=2, padding=1), LayerNorm2d(dims[0], eps=1e-6))

        dpr = [r.tolist() for r in torch.linspace(0, drop_path_rate, sum(depths), device='cpu').split(depths)]
        self.stages = nn.Sequential(*[
            UniRepLKNetStage(dims[max(i - 1, 0)], dims[i], i > 0, tuple(kernel_sizes[i]), dpr[i],
                             layer_scale_init_value, deploy, ffn_factor) for i in range(4)])
        self.feature_info = [dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f'stages.{i}') for i in range(4)]
        self.num_features = self.head_hidden_size = dims[-1]
        self.head = NormMlpClassifierHead(dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                          norm_layer=partial(LayerNorm2d, eps=1e-6))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """GRN's gamma/beta are stored (1, 1, 1, C), so timm's "skip 1-d params" rule misses them."""
        return {n for n, _ in self.named_parameters() if n.endswith(('grn.gamma', 'grn.beta'))}


_DILATED_KEY = re.compile(r'\.dil_(conv|bn)_k(\d+)_(\d+)\.')


@register_official_converter("gf_unireplknet")
def convert_official(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official ``unireplknet.py`` keys (training or deploy structure) -> ours, by renaming only.

    The stage layout maps by :func:`~genforge.backbones.staged.convnext_layout_key`; inside a
    block ``se.down/up`` -> ``se.fc1/fc2``, ``pwconv1.1`` -> ``pwconv1``, ``act.1`` -> ``grn``,
    ``pwconv2.0`` -> ``pwconv2``, ``pwconv2.2`` -> ``norm2``, ``dil_{conv,bn}_k{k}_{r}`` ->
    ``dilated.k{k}_{r}.{conv,bn}``.
    """
    block_renames = (('.se.down.', '.se.fc1.'), ('.se.up.', '.se.fc2.'), ('.pwconv1.1.', '.pwconv1.'),
                     ('.act.1.', '.grn.'), ('.pwconv2.0.', '.pwconv2.'), ('.pwconv2.2.', '.norm2.'))
    out = {}
    for key, value in state_dict.items():
        key = convnext_layout_key(key)
        if key.startswith('stages.') and '.blocks.' in key:
            for old, new in block_renames:
                key = key.replace(old, new)
            key = _DILATED_KEY.sub(r'.dilated.k\2_\3.\1.', key)
        out[key] = value
    return out


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: UniRepLKNet) -> dict[str, torch.Tensor]:
    """Pretrained-weight filter for timm: our own layout passes through, the official one is converted."""
    state_dict = state_dict.get('model', state_dict)
    return state_dict if 'stem.0.weight' in state_dict else convert_official(state_dict, model)


def _create(variant: str, pretrained: bool = False, **kwargs) -> UniRepLKNet:
    return build_model_with_cfg(UniRepLKNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)), **kwargs)


def _cfg(hf_hub_filename: str | None = None, **kwargs) -> dict:
    """Official ImageNet-1k weights are ``hf_hub_filename`` in the hub repo DingXiaoH/UniRepLKNet."""
    cfg = dict(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
               interpolation='bicubic', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
               first_conv='stem.0', classifier='head.fc', paper_ids='arXiv:2311.15599', license='apache-2.0')
    if hf_hub_filename:
        cfg.update(hf_hub_id='DingXiaoH/UniRepLKNet', hf_hub_filename=hf_hub_filename)
    return {**cfg, **kwargs}


default_cfgs = generate_default_cfgs({
    'gf_unireplknet_a.in1k': _cfg('unireplknet_a_in1k_224_acc77.03.pth'),
    'gf_unireplknet_f.in1k': _cfg('unireplknet_f_in1k_224_acc78.58.pth'),
    'gf_unireplknet_p.in1k': _cfg('unireplknet_p_in1k_224_acc80.23.pth'),
    'gf_unireplknet_n.in1k': _cfg('unireplknet_n_in1k_224_acc81.64.pth'),
    'gf_unireplknet_t.in1k': _cfg('unireplknet_t_in1k_224_acc83.21.pth'),
    'gf_unireplknet_nano': _cfg(input_size=(3, 32, 32), pool_size=(1, 1)),
})


@register_gf_model
def gf_unireplknet_a(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-A: 4.4M params (fused), 77.0% ImageNet-1k top-1."""
    return _create('gf_unireplknet_a', pretrained, depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), **kwargs)


@register_gf_model
def gf_unireplknet_f(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-F: 6.2M params (fused), 78.6% ImageNet-1k top-1."""
    return _create('gf_unireplknet_f', pretrained, depths=(2, 2, 6, 2), dims=(48, 96, 192, 384), **kwargs)


@register_gf_model
def gf_unireplknet_p(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-P: 10.7M params (fused), 80.2% ImageNet-1k top-1."""
    return _create('gf_unireplknet_p', pretrained, depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), **kwargs)


@register_gf_model
def gf_unireplknet_n(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-N: 18.3M params (fused), 81.6% ImageNet-1k top-1."""
    return _create('gf_unireplknet_n', pretrained, depths=(2, 2, 8, 2), dims=(80, 160, 320, 640), **kwargs)


@register_gf_model
def gf_unireplknet_t(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-T: 31M params (fused), 83.2% ImageNet-1k top-1."""
    return _create('gf_unireplknet_t', pretrained, depths=(3, 3, 18, 3), dims=(80, 160, 320, 640), **kwargs)


@register_gf_model
def gf_unireplknet_nano(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """A test-sized UniRepLKNet (32x32 input): one 7x7 Dilated Reparam Block per stage after the first."""
    return _create('gf_unireplknet_nano', pretrained, depths=(1, 1, 2, 1), dims=(8, 16, 32, 64),
                   kernel_sizes=((3,), (7,), (7, 3), (7,)), **kwargs)
