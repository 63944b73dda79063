"""RMT: Retentive Networks Meet Vision Transformers.

Qihang Fan, Huaibo Huang, Mingrui Chen, Hongmin Liu, Ran He, CVPR 2024, arXiv:2309.11523;
official code qhfan/RMT (``classfication_release/RMT.py``).

What the code implements (the paper's method section, in its order):

* **Manhattan self-attention (MaSA)** with the spatial decay matrix ``D^2d_nm = gamma^(|x_n - x_m| + |y_n - y_m|)``
  applied in log space: ``MaSA(X) = softmax(Q K^T / sqrt(d) + log D^2d) V``. Each head h has its
  own ``gamma_h = 1 - 2^(-init - range * h / heads)`` (the official parameterisation).
* **Decomposed MaSA**: attention along W with the 1-D decay ``log gamma * |x_n - x_m|``, then, on
  that output, attention along H with ``log gamma * |y_n - y_m|``. Early stages use it; the last stage(s)
  use the full 2-D form.
* q and k are rotated by the official rotary embedding (pairs of channels (2i, 2i+1) turned by the angle
  ``p * 10000^(-i/(d/2-1))``, where p is the token's raster index) and ``LCE(V) = DWConv5x5(V)`` is added
  to the attention output before the output projection.
* Block: ``x += DWConv3x3(x)`` (conditional position encoding); ``x += MaSA(LN(x))``;
  ``x += FFN(LN(x))`` with ``FFN(x) = fc2(h + DWConv3x3(h)), h = GELU(fc1(x))``; optional layer scale.
* Stem: four 3x3 convs with BN (two of stride 2); between stages a 3x3 stride-2 conv + BN.
* Head: per-position ``Linear(C -> 1024)``, BN, Swish, global average pool, classifier.
* Token labelling (the official ``classification_token_label_release``, checkpoints RMT-S*/B*/L*):
  ``token_label=True`` adds the official ``aux_head``, a linear classifier of every last-stage token,
  and the logits become the official inference output ``head(x) + 0.5 * max_n aux_head(token_n)``.
  Only that inference form is implemented: the official training forward (MixToken, and returning
  the per-token logits for dense token-label targets) is not, so in train mode the model returns
  the same combined logits.

The layout differs from the official one only in where the downsampling conv lives (at the start of the
next stage, so ``stages.i`` outputs stage i's features, as timm's feature extraction expects);
``checkpoint_filter_fn`` converts official checkpoints by renames. A token-labelled checkpoint loaded
into a model built without ``token_label`` loses its ``aux_head``, with a warning saying so.
"""

from __future__ import annotations

import re
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, SelectAdaptivePool2d, calculate_drop_path_rates
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from torch.nn.init import trunc_normal_

from genforge.backbones.registry import register_gf_model, register_official_converter
from genforge.backbones.staged import StagedBackbone

__all__ = ["FeedForwardNetwork", "ManhattanSelfAttention", "RMT", "RetNetRelPos2d", "decayed_attention",
           "rotate_every_two", "theta_shift"]


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)``: the 90-degree turn of each channel pair."""
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)


def theta_shift(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding: turn each channel pair of ``x`` by its angle (given as sin/cos)."""
    return x * cos + rotate_every_two(x) * sin


def decayed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T + log_decay) v`` over the last two dims (k already carries 1/sqrt(d))."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=log_decay.to(q.dtype), scale=1.0)


class DWConv2d(nn.Module):
    """Depthwise conv on a channels-last map: (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class RetNetRelPos2d(nn.Module):
    """Per-stage rotary angles and per-head decay ``log gamma_h``, and the masks built from them.

    ``angle`` and ``decay`` are (persistent) buffers, as in the official checkpoints.
    """

    def __init__(self, dim: int, num_heads: int, initial_value: float, heads_range: float):
        super().__init__()
        head_dim = dim // num_heads
        if dim % num_heads or head_dim % 2:
            raise ValueError(f"dim {dim} / num_heads {num_heads} must give an even head dim for the rotary embedding")
        angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 2))
        self.register_buffer("angle", angle.repeat_interleave(2))  # (d,)
        gamma = 1 - 2 ** (-initial_value - heads_range * torch.arange(num_heads, dtype=torch.float)
                           / num_heads)
        self.register_buffer("decay", torch.log(gamma))  # (heads,)

    def rotary(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """sin and cos of every token's rotation angles, (H, W, d); the position is the raster index."""
        index = torch.arange(height * width).to(self.decay)
        theta = (index[:, None] * self.angle[None, :]).reshape(height, width, -1)
        return torch.sin(theta), torch.cos(theta)

    def decay_1d(self, length: int) -> torch.Tensor:
        """``log gamma_h * |i - j|``, (heads, L, L)."""
        index = torch.arange(length).to(self.decay)
        return (index[:, None] - index[None, :]).abs() * self.decay[:, None, None]

    def decay_2d(self, height: int, width: int) -> torch.Tensor:
        """``log gamma_h * (|y_n - y_m| + |x_n - x_m|)``, (heads, HW, HW)."""
        grid = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij"), -1)
        grid = grid.reshape(-1, 2).to(self.decay)
        manhattan = (grid[:, None, :] - grid[None, :, :]).abs().sum(-1)
        return manhattan * self.decay[:, None, None]

    def forward(self, height: int, width: int,
                decomposed: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(sin, cos, decay): decay is [mask along H, mask along W] if decomposed, else [the 2-D mask]."""
        sin, cos = self.rotary(height, width)
        if decomposed:
            return sin, cos, [self.decay_1d(height), self.decay_1d(width)]
        return sin, cos, [self.decay_2d(height, width)]


class ManhattanSelfAttention(nn.Module):
    """MaSA, full 2-D or decomposed (W then H), plus the local context term DWConv5x5(V)."""

    def __init__(self, dim: int, num_heads: int, decomposed: bool):
        super().__init__()
        self.num_heads = num_heads
        self.decomposed = decomposed
        self.scaling = (dim // num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.lepe = DWConv2d(dim, 5)
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H, W, n d) -> (B, n, H, W, d)."""
        B, H, W, _ = t.shape
        return t.reshape(B, H, W, self.num_heads, -1).permute(0, 3, 1, 2, 4)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
                decay: list[torch.Tensor]) -> torch.Tensor:
        """x (B, H, W, C); ``decay`` as :meth:`RetNetRelPos2d.forward` returns it."""
        B, H, W, C = x.shape
        v = self.v_proj(x)
        lepe = self.lepe(v)
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x) * self.scaling), self._heads(v)
        q, k = theta_shift(q, sin, cos), theta_shift(k, sin, cos)
        if self.decomposed:
            v = decayed_attention(q, k, v, decay[1][:, None])  # along W: rows (B, n, H, W, d)
            q, k, v = q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3)  # (B, n, W, H, d)
            out = decayed_attention(q, k, v, decay[0][:, None]).transpose(2, 3)  # along H: columns
        else:
            out = decayed_attention(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), decay[0])  # (B, n, HW, d)
            out = out.reshape(B, self.num_heads, H, W, -1)
        out = out.permute(0, 2, 3, 1, 4).reshape(B, H, W, C) + lepe
        return self.out_proj(out)


class FeedForwardNetwork(nn.Module):
    """``fc2(h + DWConv3x3(h))`` with ``h = GELU(fc1(x))``, channels-last."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.dwconv = DWConv2d(hidden, 3)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x + self.dwconv(x)))


class RetBlock(nn.Module):
    """``x += DWConv3x3(x); x += g1 * MaSA(LN(x)); x += g2 * FFN(LN(x))`` (g = layer scale or 1)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, decomposed: bool, drop_path: float = 0.,
                 proj_drop: float = 0., layerscale: bool = False, layer_init_value: float = 1e-6):
        super().__init__()
        self.pos = DWConv2d(dim, 3)
        self.retention_layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.retention = ManhattanSelfAttention(dim, num_heads, decomposed)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = FeedForwardNetwork(dim, int(mlp_ratio * dim), proj_drop)
        if layerscale:
            self.gamma_1 = nn.Parameter(torch.full((1, 1, 1, dim), layer_init_value))
            self.gamma_2 = nn.Parameter(torch.full((1, 1, 1, dim), layer_init_value))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
                decay: list[torch.Tensor]) -> torch.Tensor:
        x = x + self.pos(x)
        y = self.retention(self.retention_layer_norm(x), sin, cos, decay)
        x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.ffn(self.final_layer_norm(x))
        return x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)


class PatchMerging(nn.Module):
    """3x3 stride-2 conv + BN: (B, C, H, W) -> (B, C', H/2, W/2)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x))


class PatchEmbed(nn.Module):
    """Conv stem, stride 4: (B, C_in, H, W) -> (B, C, H/4, W/4)."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, dim // 2, 3, 2, 1), nn.BatchNorm2d(dim // 2), nn.GELU(),
            nn.Conv2d(dim // 2, dim // 2, 3, 1, 1), nn.BatchNorm2d(dim // 2), nn.GELU(),
            nn.Conv2d(dim // 2, dim, 3, 2, 1), nn.BatchNorm2d(dim), nn.GELU(),
            nn.Conv2d(dim, dim, 3, 1, 1), nn.BatchNorm2d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class RMTStage(nn.Module):
    """[Downsample,] RetBlocks; NCHW in and out, channels-last inside."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, init_value: float, heads_range: float,
                 mlp_ratio: float, decomposed: bool, downsample: bool, drop_path: list[float], proj_drop: float,
                 layerscale: bool, layer_init_value: float):
        super().__init__()
        self.grad_checkpointing = False
        self.decomposed = decomposed
        self.downsample = PatchMerging(in_dim, dim) if downsample else nn.Identity()
        self.relpos = RetNetRelPos2d(dim, num_heads, init_value, heads_range)
        self.blocks = nn.ModuleList([
            RetBlock(dim, num_heads, mlp_ratio, decomposed, drop_path[i], proj_drop, layerscale, layer_init_value)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        sin, cos, decay = self.relpos(x.shape[1], x.shape[2], self.decomposed)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, sin, cos, decay)
            else:
                x = blk(x, sin, cos, decay)
        return x.permute(0, 3, 1, 2)


def _head_pool(pool_type: str) -> SelectAdaptivePool2d:
    pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))
    if pool.feat_mult() != 1:
        raise ValueError(f"global_pool {pool_type!r} changes the pooled width; use 'avg', 'max', 'avgmax' or ''")
    return pool


class RMTHead(nn.Module):
    """Per-position ``Linear -> BN -> Swish``, then pool, dropout and the classifier.

    With ``pool_type=''`` nothing is pooled and the classifier is applied at every position.
    ``token_label=True`` adds ``aux_fc`` (the official token-labelled models' ``aux_head``) on the
    input tokens, and ``0.5 * max_n aux_fc(token_n)`` to the logits (at every position if unpooled).
    """

    def __init__(self, in_features: int, hidden: int, num_classes: int, pool_type: str = "avg",
                 drop_rate: float = 0., token_label: bool = False):
        super().__init__()
        self.token_label = token_label
        self.proj = nn.Linear(in_features, hidden)
        self.norm = nn.BatchNorm2d(hidden)
        self.act = nn.SiLU()
        self.global_pool = _head_pool(pool_type)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_fc = nn.Linear(in_features, num_classes) if token_label and num_classes > 0 else None

    def reset(self, num_classes: int, pool_type: str | None = None) -> None:
        if pool_type is not None:
            self.global_pool = _head_pool(pool_type)
        self.fc = nn.Linear(self.proj.out_features, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_fc = (nn.Linear(self.proj.in_features, num_classes) if self.token_label and num_classes > 0
                       else None)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        aux = None if self.aux_fc is None else 0.5 * self.aux_fc(x.flatten(2).transpose(1, 2)).amax(1)  # (B, K)
        x = self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, hidden, H, W)
        x = self.drop(self.global_pool(self.act(self.norm(x))))
        if pre_logits:
            return x
        if self.global_pool.is_identity():  # unpooled (B, hidden, H, W): the classifier at every position
            logits = self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return logits if aux is None else logits + aux[:, :, None, None]
        logits = self.fc(x)
        return logits if aux is None else logits + aux


class RMT(StagedBackbone):
    """RMT ("VisRetNet") with the timm model contract; ``forward_features`` returns the last stage's map."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, global_pool: str = "avg",
                 embed_dims: tuple[int, ...] = (96, 192, 384, 768), depths: tuple[int, ...] = (2, 2, 6, 2),
                 num_heads: tuple[int, ...] = (3, 6, 12, 24), init_values: tuple[float, ...] = (1, 1, 1, 1),
                 heads_ranges: tuple[float, ...] = (3, 3, 3, 3), mlp_ratios: tuple[float, ...] = (3, 3, 3, 3),
                 decomposed: tuple[bool, ...] = (True, True, False, False),
                 layerscales: tuple[bool, ...] = (False, False, False, False), layer_init_value: float = 1e-6,
                 projection: int = 1024, drop_rate: float = 0., proj_drop_rate: float = 0.,
                 drop_path_rate: float = 0., token_label: bool = False):
        super().__init__()
        per_stage = (embed_dims, num_heads, init_values, heads_ranges, mlp_ratios, decomposed, layerscales)
        if any(len(v) != len(depths) for v in per_stage):
            raise ValueError("embed_dims, num_heads, init_values, heads_ranges, mlp_ratios, decomposed and "
                             f"layerscales need one entry per stage ({len(depths)}); got {[len(v) for v in per_stage]}")
        self.num_classes = num_classes
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=False)
        stages, self.feature_info, in_dim, cur = [], [], embed_dims[0], 0
        for i, depth in enumerate(depths):
            stages.append(RMTStage(in_dim, embed_dims[i], depth, num_heads[i], init_values[i], heads_ranges[i],
                                   mlp_ratios[i], decomposed[i], i > 0, dpr[cur:cur + depth], proj_drop_rate,
                                   layerscales[i], layer_init_value))
            in_dim, cur = embed_dims[i], cur + depth
            self.feature_info.append(dict(num_chs=in_dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = embed_dims[-1]
        self.head_hidden_size = projection
        self.head = RMTHead(self.num_features, projection, num_classes, global_pool, drop_rate, token_label)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed",
                    blocks=r"^stages\.(\d+)" if coarse else [
                        (r"^stages\.(\d+)\.downsample", None),
                        (r"^stages\.(\d+)\.blocks\.(\d+)", None)])

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_head or max_index < len(self.feature_info) - 1:
            # the head's projection is sized for the last stage, so it goes with the classifier
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.head = ClassifierHead(self.num_features, 0, pool_type="")
        return take_indices

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x)  # (B, dims[0], H/4, W/4)


def _official_rename(key: str) -> str:
    if m := re.match(r"^layers\.(\d+)\.downsample\.(.*)", key):
        return f"stages.{int(m[1]) + 1}.downsample.{m[2]}"
    key = re.sub(r"^layers\.(\d+)\.Relpos\.", r"stages.\1.relpos.", key)
    key = re.sub(r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks.", key)
    heads = {"head": "head.fc.", "aux_head": "head.aux_fc."}
    return re.sub(r"^(proj|norm|head|aux_head)\.", lambda m: heads.get(m[1], f"head.{m[1]}."), key)


@register_official_converter("gf_rmt")
def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official ``VisRetNet`` keys -> ours: ``layers.i`` -> ``stages.i`` (its downsample -> ``stages.{i+1}``),
    ``Relpos`` -> ``relpos``, and ``proj``/``norm``/``head``/``aux_head`` -> ``head.proj``/``head.norm``/
    ``head.fc``/``head.aux_fc``.

    The ``aux_head`` of a token-labelled checkpoint is dropped, with a warning, when ``model`` has no
    ``head.aux_fc`` (built without ``token_label=True``): the official model adds
    ``0.5 * max_n aux_head(token_n)`` to its logits, so the predictions then differ from the official ones.
    """
    if any(k.startswith("stages.") for k in state_dict):
        return state_dict
    aux_keys = [k for k in state_dict if k.startswith("aux_head.")]
    if aux_keys and getattr(model.head, "aux_fc", None) is None:
        warnings.warn(f"dropping {aux_keys} of a token-labelled RMT checkpoint: this model was built without "
                      f"token_label=True, so its logits lack the official 0.5 * max_n aux_head(token_n) term; "
                      f"build it with token_label=True to keep it", stacklevel=2)
        state_dict = {k: v for k, v in state_dict.items() if k not in aux_keys}
    return {_official_rename(k): v for k, v in state_dict.items()}


def _create(variant: str, pretrained: bool = False, **kwargs) -> RMT:
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs.get("depths", (0,) * 4)))))
    return build_model_with_cfg(RMT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **kwargs)


def _cfg(**kwargs) -> dict:
    return dict(dict(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.9,
                     interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                     first_conv="patch_embed.proj.0", classifier="head.fc", paper_ids="arXiv:2309.11523"), **kwargs)


# no weight location: official ImageNet-1k checkpoints load with load_official(name, path)
default_cfgs = generate_default_cfgs({
    "gf_rmt_nano": _cfg(input_size=(3, 32, 32), pool_size=(2, 2)),
    "gf_rmt_t": _cfg(),
    "gf_rmt_s": _cfg(),
    "gf_rmt_b": _cfg(),
    "gf_rmt_l": _cfg(),
})


@register_gf_model
def gf_rmt_nano(pretrained: bool = False, **kwargs) -> RMT:
    """A tiny test configuration for 32x32 inputs: three stages (8x8, 4x4 decomposed; 2x2 full)."""
    args = dict(embed_dims=(16, 32, 64), depths=(1, 1, 1), num_heads=(2, 2, 4), init_values=(2, 2, 2),
                heads_ranges=(4, 4, 6), mlp_ratios=(3, 3, 3), decomposed=(True, True, False),
                layerscales=(False, False, True), projection=64)
    return _create("gf_rmt_nano", pretrained, **dict(args, **kwargs))


@register_gf_model
def gf_rmt_t(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-T (official ``RMT_T3``), 14M parameters."""
    args = dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16),
                init_values=(2, 2, 2, 2), heads_ranges=(4, 4, 6, 6), mlp_ratios=(3, 3, 3, 3),
                decomposed=(True, True, False, False))
    return _create("gf_rmt_t", pretrained, **dict(args, **kwargs))


@register_gf_model
def gf_rmt_s(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-S (official ``RMT_S``), 27M parameters."""
    args = dict(embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 4), num_heads=(4, 4, 8, 16),
                init_values=(2, 2, 2, 2), heads_ranges=(4, 4, 6, 6), mlp_ratios=(4, 4, 3, 3),
                decomposed=(True, True, True, False))
    return _create("gf_rmt_s", pretrained, **dict(args, **kwargs))


@register_gf_model
def gf_rmt_b(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-B (official ``RMT_M2``), 54M parameters."""
    args = dict(embed_dims=(80, 160, 320, 512), depths=(4, 8, 25, 8), num_heads=(5, 5, 10, 16),
                init_values=(2, 2, 2, 2), heads_ranges=(5, 5, 6, 6), mlp_ratios=(4, 4, 3, 3),
                decomposed=(True, True, True, False), layerscales=(False, False, True, True))
    return _create("gf_rmt_b", pretrained, **dict(args, **kwargs))


@register_gf_model
def gf_rmt_l(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-L (official ``RMT_L6``), 95M parameters."""
    args = dict(embed_dims=(112, 224, 448, 640), depths=(4, 8, 25, 8), num_heads=(7, 7, 14, 20),
                init_values=(2, 2, 2, 2), heads_ranges=(6, 6, 6, 6), mlp_ratios=(4, 4, 3, 3),
                decomposed=(True, True, True, False), layerscales=(False, False, True, True))
    return _create("gf_rmt_l", pretrained, **dict(args, **kwargs))
