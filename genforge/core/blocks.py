"""Residual blocks shared by the generators; each takes its norm by name or factory.

- :class:`GatedMLP`: W2(GELU(W0 x) * W1 x), the gated-GELU MLP of DiMR (arXiv 2406.09416,
  Sec. 3.2; official ``MLPBlock``).
- :class:`TransformerBlock`: x + Attn(Norm(x, c)); x + MLP(Norm(x, c)). With a TD-norm the
  conditioning c is DiMR's time tau; with a plain norm it is ignored.
- :class:`ConvNeXtBlock`: DiMR's ConvNeXt variant on channel-last maps:
  x + DWConv_kxk(x) with no norm before it, then x + MLP(Norm(x, c)). (Liu et al. 2022's
  original ConvNeXt puts the norm between the depthwise conv and the MLP in one residual.)

DiT's adaLN-Zero block is diffusers' ``BasicTransformerBlock`` (see :mod:`genforge.models.dit`).

Conditioned norms share one interface, ``norm(x, cond)`` (see :mod:`genforge.core.norm`).
"""

from __future__ import annotations

from typing import Callable

import torch
from einops import rearrange
from torch import nn

from genforge.core.attention import MultiHeadAttention
from genforge.core.norm import make_norm

NormFactory = Callable[[int], nn.Module]


def _norm_factory(norm: str | NormFactory) -> NormFactory:
    if isinstance(norm, str):
        return lambda dim: make_norm(norm, dim)
    return norm


class GatedMLP(nn.Module):
    """W2(GELU(W0 x) * W1 x) (DiMR's MLP; Shazeer 2020's GEGLU)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w0 = nn.Linear(dim, hidden_dim)
        self.w1 = nn.Linear(dim, hidden_dim)
        self.w2 = nn.Linear(hidden_dim, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w0(x)) * self.w1(x))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block on (B, N, D) tokens with a conditioned norm."""

    def __init__(self, dim: int, num_heads: int, hidden_dim: int, norm: str | NormFactory = "TDRMSN",
                 dropout: float = 0.0):
        super().__init__()
        make = _norm_factory(norm)
        self.attn_norm = make(dim)
        self.attn = MultiHeadAttention(dim, num_heads, qkv_bias=False, out_bias=True, upcast=True)
        self.mlp_norm = make(dim)
        self.mlp = GatedMLP(dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x, cond)))
        return x + self.dropout(self.mlp(self.mlp_norm(x, cond)))


class ConvNeXtBlock(nn.Module):
    """DiMR's ConvNeXt block on channel-last (B, H, W, D) maps with a conditioned norm."""

    def __init__(self, dim: int, hidden_dim: int, kernel_size: int = 7, norm: str | NormFactory = "TDRMSN",
                 dropout: float = 0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.mlp_norm = _norm_factory(norm)(dim)
        self.mlp = GatedMLP(dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        conv = self.dwconv(rearrange(x, "b h w d -> b d h w"))
        x = x + self.dropout(rearrange(conv, "b d h w -> b h w d"))
        return x + self.dropout(self.mlp(self.mlp_norm(x, cond)))

