"""TransNeXt: Robust Foveal Visual Perception for Vision Transformers.

Dai Shi, CVPR 2024, arXiv:2311.17132; official code DaiShiResearch/TransNeXt
(``classification/transnext.py`` with the pure-torch ``attention_native.py``, which is the
path implemented here; the ``swattention`` CUDA kernel computes the same function).

What the code implements, in the order of the paper's method section:

* **Pixel-focused / aggregated attention.** Every query token at (i, j) attends, under one
  softmax over the concatenated logits, to (a) its k x k sliding-window neighbourhood at full
  resolution (positions outside the map are masked) and (b) the whole map pooled to
  H/sr x W/sr by ``LN(AvgPool(GELU(Conv1x1(X))))``::

      A = softmax([ s * (q_hat + e_q) k_hat_local^T + B_local ,  s * (q_hat + e_q) k_hat_pool^T + B_pool ])
      out = (A_local + q_hat T + b) V_local + A_pool V_pool

  ``q_hat``/``k_hat`` are L2-normalised ("length-scaled cosine attention"),
  ``s = softplus(tau_h) * log(n_i)`` with ``n_i`` the number of keys query i sees,
  ``e_q`` the learnable query embedding, ``B_local`` a learnable bias per window offset,
  ``B_pool`` a continuous relative-position bias: an MLP (2 -> 512 -> heads) over
  log-spaced relative coordinates ``sign(d) log2(1 + |d|) / log2(8)`` between each query and
  each pooled key centre. ``T`` (learnable tokens) and ``b`` form the query-dependent
  ("query-learnable-value") local weights added after the softmax.
* **Full attention** in the last stage (sr = 1): the same length-scaled cosine attention with
  query embedding and continuous position bias over all tokens.
* **Convolutional GLU**: ``fc1: C -> 2h`` split into (gate, value);
  ``out = fc2(GELU(DWConv3x3(gate)) * value)``, with ``h = 2/3 * mlp_ratio * C``.
* Block: ``x += Attn(LN(x)); x += ConvGLU(LN(x))``; each stage opens with an overlapping
  patch embedding (conv 2p-1 / stride p for the first, 3x3 / stride 2 after) + LN and closes
  with its own LN.

As in the official code, the position biases, padding masks and pooled sizes are fixed at
construction by ``img_size`` (``pretrain_size`` rescales the relative coordinates when a
model trained at one size is built for another); an input of another size is refused with a
clear error, and the pretrained configs say ``fixed_input_size=True``. LayerNorm eps: 1e-6 in
the blocks and stage norms, torch's default 1e-5 in the patch embeddings and the pooled
branch, as in the official model. Official checkpoints convert by renames only
(``checkpoint_filter_fn``). The model scripts (TorchScript) and traces (FX).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (ClassifierHead, DropPath, calculate_drop_path_rates, register_notrace_function, to_2tuple,
                         use_fused_attn)
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from torch.nn.init import trunc_normal_

from genforge.backbones.registry import register_gf_model, register_official_converter
from genforge.backbones.staged import StagedBackbone

__all__ = ["AggregatedAttention", "Attention", "ConvGLU", "TransNeXt", "check_map_size", "relative_position_cpb"]

_CPB_HIDDEN = 512
_TEMPERATURE_INIT = 1 / 0.24  # softplus(temperature) starts at 1/0.24, as in the official code


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


@torch.no_grad()
def relative_position_cpb(query_size: tuple[int, int], key_size: tuple[int, int],
                          pretrain_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Index (Nq*Nk,) into a table (U, 2) of unique log-spaced query-to-key offsets (dy, dx).

    Keys sit at the centres of an adaptive average pooling of the query grid. Offsets are
    measured in query-grid units, scaled so the pre-training grid spans [-8, 8], and mapped
    to ``sign(d) * log2(1 + |d|) / log2(8)``. Row and column offsets vary independently, so
    the table is the product of the unique ones per axis (in the lexicographic order the
    official ``torch.unique(dim=0)`` gives). Built on the CPU, whatever the default device.
    """
    def axis(q: int, k: int, pretrain: int):
        positions = torch.arange(q, dtype=torch.float32, device="cpu")
        keys = F.adaptive_avg_pool1d(positions[None], k)[0]
        # a 1-pixel pre-training grid would divide by zero; such a grid has only offset 0 anyway
        return torch.unique((positions[:, None] - keys[None, :]) / max(pretrain - 1, 1) * 8, return_inverse=True)

    offsets_h, index_h = axis(query_size[0], key_size[0], pretrain_size[0])  # index: (Hq, Hk)
    offsets_w, index_w = axis(query_size[1], key_size[1], pretrain_size[1])  # index: (Wq, Wk)
    index = index_h[:, None, :, None] * len(offsets_w) + index_w[None, :, None, :]  # (Hq, Wq, Hk, Wk)
    table = torch.cartesian_prod(offsets_h, offsets_w)
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return index.reshape(-1), table


@torch.no_grad()
def local_window_mask(grid: tuple[int, int], window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query: how many window positions fall inside the map (N, 1), and which do not (N, k*k)."""
    inside = F.unfold(torch.ones(1, 1, *grid, device="cpu"), window, padding=window // 2)[0].t()  # (N, k*k)
    return inside.sum(-1, keepdim=True), inside == 0


def _tokens_to_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    return x.transpose(1, 2).reshape(x.shape[0], -1, size[0], size[1])


def _split_heads(x: torch.Tensor, parts: int, num_heads: int) -> list[torch.Tensor]:
    """(B, N, parts * heads * d) -> ``parts`` tensors (B, heads, N, d)."""
    return x.reshape(x.shape[0], x.shape[1], parts, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    return x.transpose(1, 2).flatten(2)


@register_notrace_function  # reason: compares the map size, a Proxy under FX
def check_map_size(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``x`` (B, C, H, W) unchanged if (H, W) == size, else a ValueError naming both."""
    if x.shape[-2] != size[0] or x.shape[-1] != size[1]:
        raise ValueError(f"this TransNeXt stage was built for a {size[0]}x{size[1]} input map but got "
                         f"{x.shape[-2]}x{x.shape[-1]}: its position biases are fixed by img_size, so create "
                         f"the model with img_size equal to the input resolution")
    return x


class ConvGLU(nn.Module):
    """Convolutional GLU: ``fc2(GELU(DWConv3x3(gate)) * value)`` with ``(gate, value) = fc1(x)``.

    ``hidden`` is ``mlp_ratio * dim``; as in the official code each half gets ``int(2 * hidden / 3)``
    channels, so the GLU costs about what a plain MLP of width ``hidden`` would.
    """

    def __init__(self, dim: int, hidden: int, drop: float = 0.):
        super().__init__()
        hidden = int(2 * hidden / 3)
        self.fc1 = nn.Linear(dim, hidden * 2)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)  # (B, N, h) each
        gate = self.dwconv(_tokens_to_map(gate, size)).flatten(2).transpose(1, 2)
        return self.drop(self.fc2(self.drop(self.act(gate) * value)))


class _CosineAttentionBase(nn.Module):
    """Parameters shared by both attentions: temperature, query embedding, position-bias MLP."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.temperature = nn.Parameter(torch.full((num_heads, 1, 1), math.log(math.expm1(_TEMPERATURE_INIT))))
        self.query_embedding = nn.Parameter(trunc_normal_(torch.empty(num_heads, 1, self.head_dim), std=0.02))
        self.cpb_fc1 = nn.Linear(2, _CPB_HIDDEN)
        self.cpb_act = nn.ReLU(inplace=True)
        self.cpb_fc2 = nn.Linear(_CPB_HIDDEN, num_heads)

    def position_bias(self, index: torch.Tensor, table: torch.Tensor, num_queries: int) -> torch.Tensor:
        """Continuous relative-position bias, (heads, Nq, Nk)."""
        bias = self.cpb_fc2(self.cpb_act(self.cpb_fc1(table)))  # (U, heads)
        return bias.t()[:, index].reshape(self.num_heads, num_queries, -1)

    def scaled_query(self, q_hat: torch.Tensor, length_scale: torch.Tensor) -> torch.Tensor:
        """``(q_hat + e_q) * softplus(tau) * log(n)``: the query of length-scaled cosine attention."""
        return (q_hat + self.query_embedding) * F.softplus(self.temperature) * length_scale


class Attention(_CosineAttentionBase):
    """Length-scaled cosine self-attention over all tokens (the last stage, sr = 1)."""

    def __init__(self, dim: int, grid: tuple[int, int], num_heads: int = 8, qkv_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__(dim, num_heads)
        self.fused_attn = use_fused_attn()
        self.register_buffer("seq_length_scale", torch.tensor(math.log(grid[0] * grid[1])), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, size: tuple[int, int], rel_index: torch.Tensor,
                rel_table: torch.Tensor) -> torch.Tensor:
        q, k, v = _split_heads(self.qkv(x), 3, self.num_heads)
        q = self.scaled_query(F.normalize(q, dim=-1), self.seq_length_scale)
        k = F.normalize(k, dim=-1)
        bias = self.position_bias(rel_index, rel_table, x.shape[1])
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0,
                                               dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = self.attn_drop((q @ k.transpose(-2, -1) + bias).softmax(-1))
            x = attn @ v
        return self.proj_drop(self.proj(_merge_heads(x)))


class AggregatedAttention(_CosineAttentionBase):
    """Aggregated attention: a sliding window and a pooled map under one softmax (module docstring)."""

    def __init__(self, dim: int, grid: tuple[int, int], num_heads: int = 8, window_size: int = 3,
                 qkv_bias: bool = True, attn_drop: float = 0., proj_drop: float = 0., sr_ratio: int = 2,
                 fixed_pool_size: int | None = None):
        super().__init__(dim, num_heads)
        if window_size % 2 != 1:
            raise ValueError(f"window_size must be odd, got {window_size}")
        if fixed_pool_size is None:
            self.pool_size = (grid[0] // sr_ratio, grid[1] // sr_ratio)
        elif fixed_pool_size < min(grid):
            self.pool_size = (fixed_pool_size, fixed_pool_size)
        else:
            raise ValueError(f"fixed_pool_size {fixed_pool_size} must be smaller than the shorter side of "
                             f"the {grid[0]}x{grid[1]} token grid")
        if min(self.pool_size) < 1:
            raise ValueError(f"a {grid[0]}x{grid[1]} token grid pooled by sr_ratio {sr_ratio} is empty; "
                             f"use a larger img_size or a smaller sr_ratio")
        self.window_size = window_size
        self.local_len = window_size ** 2
        self.pool_len = self.pool_size[0] * self.pool_size[1]

        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # pooled branch: LN(AvgPool(GELU(Conv1x1(x))))
        self.sr = nn.Conv2d(dim, dim, 1)
        self.act = nn.GELU()
        self.pool = nn.AdaptiveAvgPool2d(self.pool_size)
        self.norm = nn.LayerNorm(dim)
        # local branch: bias per window offset, and the query-dependent weights q_hat T + b
        self.relative_pos_bias_local = nn.Parameter(
            trunc_normal_(torch.empty(num_heads, self.local_len), std=0.0004))
        self.learnable_tokens = nn.Parameter(
            trunc_normal_(torch.empty(num_heads, self.head_dim, self.local_len), std=0.02))
        self.learnable_bias = nn.Parameter(torch.zeros(num_heads, 1, self.local_len))

        local_len, padding_mask = local_window_mask(grid, window_size)
        self.register_buffer("seq_length_scale", torch.log(local_len + self.pool_len), persistent=False)  # (N, 1)
        self.register_buffer("padding_mask", padding_mask, persistent=False)  # (N, k*k)

    def _windows(self, t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, h, N, d) -> (B, h, N, k*k, d): each token's zero-padded k x k neighbourhood."""
        B, heads, N, d = t.shape
        t = t.transpose(2, 3).reshape(B, heads * d, size[0], size[1])
        t = F.unfold(t, self.window_size, padding=self.window_size // 2)  # (B, h d L, N)
        return t.reshape(B, heads, d, self.local_len, N).permute(0, 1, 4, 3, 2)

    def forward(self, x: torch.Tensor, size: tuple[int, int], rel_index: torch.Tensor,
                rel_table: torch.Tensor) -> torch.Tensor:
        q_hat = F.normalize(_split_heads(self.q(x), 1, self.num_heads)[0], dim=-1)
        q = self.scaled_query(q_hat, self.seq_length_scale)  # (B, h, N, d)

        # (a) full-resolution sliding window
        k_local, v_local = _split_heads(self.kv(x), 2, self.num_heads)
        k_local = self._windows(F.normalize(k_local, dim=-1), size)  # (B, h, N, L, d)
        v_local = self._windows(v_local, size)
        logits_local = torch.einsum("bhnd,bhnld->bhnl", q, k_local) + self.relative_pos_bias_local[:, None]
        logits_local = logits_local.masked_fill(self.padding_mask, float("-inf"))

        # (b) pooled map
        pooled = self.pool(self.act(self.sr(_tokens_to_map(x, size))))
        pooled = self.norm(pooled.flatten(2).transpose(1, 2))  # (B, P, C)
        k_pool, v_pool = _split_heads(self.kv(pooled), 2, self.num_heads)
        logits_pool = (q @ F.normalize(k_pool, dim=-1).transpose(-2, -1)
                       + self.position_bias(rel_index, rel_table, size[0] * size[1]))

        # one softmax over both key sets, then the query-dependent local weights
        attn = self.attn_drop(torch.cat([logits_local, logits_pool], -1).softmax(-1))
        attn_local, attn_pool = attn.split([self.local_len, self.pool_len], dim=-1)
        attn_local = attn_local + q_hat @ self.learnable_tokens + self.learnable_bias
        x = torch.einsum("bhnl,bhnld->bhnd", attn_local, v_local) + attn_pool @ v_pool
        return self.proj_drop(self.proj(_merge_heads(x)))


class Block(nn.Module):
    """``x += Attn(LN(x)); x += ConvGLU(LN(x))``; aggregated attention unless sr_ratio == 1."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], window_size: int = 3,
                 mlp_ratio: float = 4., qkv_bias: bool = True, proj_drop: float = 0., attn_drop: float = 0.,
                 drop_path: float = 0., norm_eps: float = 1e-6, sr_ratio: int = 1,
                 fixed_pool_size: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        if sr_ratio == 1:
            self.attn = Attention(dim, grid, num_heads, qkv_bias, attn_drop, proj_drop)
        else:
            self.attn = AggregatedAttention(dim, grid, num_heads, window_size, qkv_bias, attn_drop, proj_drop,
                                            sr_ratio, fixed_pool_size)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = ConvGLU(dim, int(dim * mlp_ratio), proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, size: tuple[int, int], rel_index: torch.Tensor,
                rel_table: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), size, rel_index, rel_table))
        return x + self.drop_path(self.mlp(self.norm2(x), size))


class OverlapPatchEmbed(nn.Module):
    """Overlapping strided conv then LN: (B, C_in, H, W) -> tokens (B, H/s * W/s, C).

    The LN has torch's default eps 1e-5, as the official ``OverlapPatchEmbed`` (the blocks'
    and stage norms use the model's ``norm_eps``, 1e-6).
    """

    def __init__(self, in_chs: int, dim: int, kernel: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chs, dim, kernel, stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class TransNeXtStage(nn.Module):
    """Patch embedding, blocks, LN; NCHW in and out. Holds the stage's relative-position table."""

    def __init__(self, in_chs: int, dim: int, depth: int, num_heads: int, in_grid: tuple[int, int],
                 pretrain_grid: tuple[int, int], kernel: int, stride: int, sr_ratio: int, window_size: int,
                 mlp_ratio: float, qkv_bias: bool, proj_drop: float, attn_drop: float, drop_path: list[float],
                 norm_eps: float, fixed_pool_size: int | None):
        super().__init__()
        self.grad_checkpointing = False
        self.in_grid = (in_grid[0], in_grid[1])
        self.grid = (_conv_out(in_grid[0], kernel, stride), _conv_out(in_grid[1], kernel, stride))
        pretrain_grid = tuple(_conv_out(s, kernel, stride) for s in pretrain_grid)
        if sr_ratio == 1:
            key_grid = self.grid
        elif fixed_pool_size is not None:
            key_grid = (fixed_pool_size, fixed_pool_size)
        else:
            key_grid = (self.grid[0] // sr_ratio, self.grid[1] // sr_ratio)
        rel_index, rel_table = relative_position_cpb(self.grid, key_grid, pretrain_grid)
        self.register_buffer("relative_pos_index", rel_index, persistent=False)
        self.register_buffer("relative_coords_table", rel_table, persistent=False)

        self.patch_embed = OverlapPatchEmbed(in_chs, dim, kernel, stride)
        self.blocks = nn.ModuleList([
            Block(dim, num_heads, self.grid, window_size, mlp_ratio, qkv_bias, proj_drop, attn_drop,
                  drop_path[i], norm_eps, sr_ratio, fixed_pool_size) for i in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(check_map_size(x, self.in_grid))  # (B, N, C)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, self.grid, self.relative_pos_index, self.relative_coords_table)
            else:
                x = blk(x, self.grid, self.relative_pos_index, self.relative_coords_table)
        return _tokens_to_map(self.norm(x), self.grid)


class TransNeXt(StagedBackbone):
    """TransNeXt with the timm model contract; ``forward_features`` returns the last stage's map."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, global_pool: str = "avg",
                 img_size: int | tuple[int, int] = 224, pretrain_size: int | tuple[int, int] | None = None,
                 patch_size: int = 4, embed_dims: tuple[int, ...] = (64, 128, 256, 512),
                 num_heads: tuple[int, ...] = (1, 2, 4, 8), mlp_ratios: tuple[float, ...] = (4, 4, 4, 4),
                 depths: tuple[int, ...] = (3, 4, 6, 3), sr_ratios: tuple[int, ...] = (8, 4, 2, 1),
                 window_size: int = 3, qkv_bias: bool = True, norm_eps: float = 1e-6,
                 fixed_pool_size: int | None = None, drop_rate: float = 0., proj_drop_rate: float = 0.,
                 attn_drop_rate: float = 0., drop_path_rate: float = 0.):
        super().__init__()
        num_stages = len(depths)
        if not len(embed_dims) == len(num_heads) == len(mlp_ratios) == len(sr_ratios) == num_stages:
            raise ValueError("embed_dims, num_heads, mlp_ratios, sr_ratios and depths need one entry per stage; "
                             f"got {len(embed_dims)}, {len(num_heads)}, {len(mlp_ratios)}, {len(sr_ratios)}, "
                             f"{num_stages}")
        self.num_classes = num_classes
        self.img_size = to_2tuple(img_size)
        grid, pretrain_grid = self.img_size, to_2tuple(pretrain_size or img_size)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=False)
        stages, self.feature_info, in_chs, reduction, cur = [], [], in_chans, 1, 0
        for i in range(num_stages):
            kernel, stride = (patch_size * 2 - 1, patch_size) if i == 0 else (3, 2)
            stage = TransNeXtStage(in_chs, embed_dims[i], depths[i], num_heads[i], grid, pretrain_grid, kernel,
                                   stride, sr_ratios[i], window_size, mlp_ratios[i], qkv_bias, proj_drop_rate,
                                   attn_drop_rate, dpr[cur:cur + depths[i]], norm_eps, fixed_pool_size)
            grid = stage.grid
            pretrain_grid = tuple(_conv_out(s, kernel, stride) for s in pretrain_grid)
            stages.append(stage)
            in_chs, reduction, cur = embed_dims[i], reduction * stride, cur + depths[i]
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        keywords = ("query_embedding", "relative_pos_bias_local", "cpb", "temperature")
        return {n for n, _ in self.named_parameters() if any(k in n for k in keywords)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stages\.0\.patch_embed",
                    blocks=r"^stages\.(\d+)" if coarse else [
                        (r"^stages\.(\d+)\.patch_embed", None),
                        (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                        (r"^stages\.(\d+)\.norm", (99999,))])

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return x  # every stage starts with its own patch embedding


_RENAMES = (
    (re.compile(r"^patch_embed(\d+)\."), lambda m: f"stages.{int(m[1]) - 1}.patch_embed."),
    (re.compile(r"^block(\d+)\."), lambda m: f"stages.{int(m[1]) - 1}.blocks."),
    (re.compile(r"^norm(\d+)\."), lambda m: f"stages.{int(m[1]) - 1}.norm."),
    (re.compile(r"\.mlp\.dwconv\.dwconv\."), lambda m: ".mlp.dwconv."),
    (re.compile(r"^head\."), lambda m: "head.fc."),
)


@register_official_converter("gf_transnext")
def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official ``TransNeXt`` keys -> ours: ``patch_embed{i}``/``block{i}``/``norm{i}`` -> ``stages.{i-1}``."""
    if any(k.startswith("stages.") for k in state_dict):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _RENAMES:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def _create(variant: str, pretrained: bool = False, **kwargs) -> TransNeXt:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(TransNeXt, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **kwargs)


def _cfg(**kwargs) -> dict:
    return dict(dict(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.95,
                     interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                     first_conv="stages.0.patch_embed.proj", classifier="head.fc", license="apache-2.0",
                     paper_ids="arXiv:2311.17132", fixed_input_size=True), **kwargs)


# no weight location: official ImageNet-1k checkpoints load with load_official(name, path)
default_cfgs = generate_default_cfgs({
    "gf_transnext_nano": _cfg(input_size=(3, 32, 32), pool_size=(2, 2)),
    "gf_transnext_micro": _cfg(),
    "gf_transnext_tiny": _cfg(),
    "gf_transnext_small": _cfg(),
    "gf_transnext_base": _cfg(),
})

_COMMON = dict(patch_size=4, mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1), window_size=3, qkv_bias=True)


@register_gf_model
def gf_transnext_nano(pretrained: bool = False, **kwargs) -> TransNeXt:
    """A tiny test configuration for 32x32 inputs (patch 2, so the last stage still sees 2x2 tokens)."""
    args = dict(_COMMON, img_size=32, patch_size=2, embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8),
                depths=(1, 1, 1, 1))
    return _create("gf_transnext_nano", pretrained, **dict(args, **kwargs))


@register_gf_model
def gf_transnext_micro(pretrained: bool = False, **kwargs) -> TransNeXt:
    """TransNeXt-Micro, 12.8M parameters."""
    args = dict(_COMMON, embed_dims=(48, 96, 192, 384), num_heads=(2, 4, 8, 16), depths=(2, 2, 15, 2))
    return _create("gf_transnext_micro", pretrained, **dict(args, **kwargs))


@register_gf_model
def gf_transnext_tiny(pretrained: bool = False, **kwargs) -> TransNeXt:
    """TransNeXt-Tiny, 28.2M parameters."""
    args = dict(_COMMON, embed_dims=(72, 144, 288, 576), num_heads=(3, 6, 12, 24), depths=(2, 2, 15, 2))
    return _create("gf_transnext_tiny", pretrained, **dict(args, **kwargs))


@register_gf_model
def gf_transnext_small(pretrained: bool = False, **kwargs) -> TransNeXt:
    """TransNeXt-Small, 49.7M parameters."""
    args = dict(_COMMON, embed_dims=(72, 144, 288, 576), num_heads=(3, 6, 12, 24), depths=(5, 5, 22, 5))
    return _create("gf_transnext_small", pretrained, **dict(args, **kwargs))


@register_gf_model
def gf_transnext_base(pretrained: bool = False, **kwargs) -> TransNeXt:
    """TransNeXt-Base, 89.7M parameters."""
    args = dict(_COMMON, embed_dims=(96, 192, 384, 768), num_heads=(4, 8, 16, 32), depths=(5, 5, 23, 5))
    return _create("gf_transnext_base", pretrained, **dict(args, **kwargs))
