"""CLME-CondConv: A-SDM's cross-layer multi-expert conditional convolution (arXiv 2312.15516).

A-SDM's abstract says only that CLME-CondConv is added where blocks were pruned "to inherit the
original convolution parameters"; there is no official code. This module is CondConv (Yang et
al., arXiv 1904.04971, Eq. 1-2) with cross-layer experts:

    alpha(x) = r(FC(GAP(x)))                     r = softmax (default) or sigmoid (CondConv's own)
    y        = (sum_k alpha_k(x) W_k) * x + sum_k alpha_k(x) b_k

computed per sample as one grouped convolution. Our choices: the experts W_k start from the
kept convolution and the removed blocks' convolutions of the same shape
(:func:`genforge.sd.prune.condconv_experts`), and the routing bias starts at the log (or logit)
of a prior that gives the kept convolution ``kept_share`` of the mixture, so the student starts
close to the plain BK-SDM student.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["CondConv2d"]

ROUTINGS = ("softmax", "sigmoid")


class CondConv2d(nn.Module):
    """A KxK convolution whose kernel is a per-sample mixture of ``num_experts`` expert kernels."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_experts: int, stride: int = 1,
                 padding: int = 0, routing: str = "softmax"):
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"CondConv routing {routing!r} is not one of {list(ROUTINGS)}")
        if num_experts < 1:
            raise ValueError(f"CondConv needs num_experts >= 1, got {num_experts}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.routing = stride, padding, routing
        self.experts_weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels, kernel_size, kernel_size))
        self.experts_bias = nn.Parameter(torch.zeros(num_experts, out_channels))
        self.route = nn.Linear(in_channels, num_experts)
        for weight in self.experts_weight:
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))

    @property
    def num_experts(self) -> int:
        return self.experts_weight.shape[0]

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """alpha(x) of shape (B, K) from the globally average-pooled input."""
        logits = self.route(x.mean(dim=(2, 3)))
        return logits.softmax(dim=-1) if self.routing == "softmax" else logits.sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        alpha = self.routing_weights(x).to(self.experts_weight.dtype)  # (B, K)
        weight = torch.einsum("bk,koihw->boihw", alpha, self.experts_weight)  # one kernel per sample
        bias = alpha @ self.experts_bias  # (B, O)
        y = F.conv2d(rearrange(x, "b c h w -> 1 (b c) h w"), rearrange(weight, "b o i h w -> (b o) i h w"),
                     bias.reshape(-1), stride=self.stride, padding=self.padding, groups=batch)
        return rearrange(y, "1 (b o) h w -> b o h w", b=batch)

    @torch.no_grad()
    def inherit(self, convs: list[nn.Conv2d], kept_share: float = 0.8) -> None:
        """Copy ``convs`` into the experts (the first is the kept one) and set the routing prior."""
        if len(convs) != self.num_experts:
            raise ValueError(f"CondConv has {self.num_experts} experts but {len(convs)} convolutions were given")
        if not 0 < kept_share < 1:
            raise ValueError(f"kept_share must be in (0, 1), got {kept_share}")
        for k, conv in enumerate(convs):
            if conv.weight.shape != self.experts_weight.shape[1:]:
                raise ValueError(f"expert {k} has shape {tuple(conv.weight.shape)}, expected "
                                 f"{tuple(self.experts_weight.shape[1:])}")
            self.experts_weight[k].copy_(conv.weight)
            self.experts_bias[k].copy_(conv.bias if conv.bias is not None else torch.zeros_like(self.experts_bias[k]))
        if self.num_experts == 1:
            return
        prior = torch.full((self.num_experts,), (1 - kept_share) / (self.num_experts - 1))
        prior[0] = kept_share
        self.route.bias.copy_(prior.log() if self.routing == "softmax" else torch.logit(prior))
