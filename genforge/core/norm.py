"""Time-conditioned normalisation: DiMR's TD-LN / TD-RMSNorm.

Time-Dependent LayerNorm comes from DiMR (Liu et al., "Alleviating Distortion in Image
Generation via Multi-Resolution Diffusion Models", NeurIPS 2024, arXiv 2406.09416, Sec. 3.3).
Every affine parameter theta of shape (d,) is a :class:`TimeDependentParameter` holding two
learned endpoints p0, p1 and a per-channel sigmoid gate::

    theta(tau) = p1 + sigmoid(tau * (1 + w') + b') * (p0 - p1)          (TD-LN, Eq. 4)

so time enters the network through the norms alone, with 4d parameters per affine vector
instead of adaLN's per-block MLP. p0 and p1 start equal, so a fresh model is time-independent.
The parameter names (``param0``, ``param1``, ``nodecay_weight``, ``nodecay_bias``) follow the
official code, which keeps the two ``nodecay_*`` vectors out of weight decay.

The adaLN-Zero that TD-LN is measured against (DiT, arXiv 2212.09748, Sec. 3.2: a
zero-initialised linear map of the conditioning vector gives shift, scale and gate for each
residual branch) is diffusers' ``AdaLayerNormZero``, inside the DiT baseline
(:mod:`genforge.models.dit`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NO_DECAY_SUFFIXES = (".nodecay_weight", ".nodecay_bias")


class TimeDependentParameter(nn.Module):
    """A vector theta(tau) interpolated per channel between two learned endpoints (Eq. 4)."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.param0 = nn.Parameter(torch.full((dim,), float(init_value)))
        self.param1 = nn.Parameter(torch.full((dim,), float(init_value)))
        self.nodecay_weight = nn.Parameter(torch.zeros(dim))
        self.nodecay_bias = nn.Parameter(torch.zeros(dim))

    def forward(self, tau: torch.Tensor) -> torch.Tensor:
        """Evaluate theta at tau (B,): returns (B, d), or (1, d) when every tau is equal."""
        tau = _as_time_vector(tau, self.param0)
        if tau.shape[0] > 1 and bool((tau == tau[0]).all()):
            tau = tau[:1]
        gate = torch.sigmoid(torch.addcmul(self.nodecay_bias, tau[:, None], 1 + self.nodecay_weight))
        return torch.addcmul(self.param1, gate, self.param0 - self.param1)


def _as_time_vector(tau: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    tau = torch.as_tensor(tau, dtype=like.dtype, device=like.device)
    if tau.dim() == 0:
        tau = tau[None]
    if tau.dim() != 1:
        raise ValueError(f"tau must be a scalar or a (B,) vector, got shape {tuple(tau.shape)}")
    return tau


def _broadcast_channels(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B or 1, d) -> (B or 1, 1, ..., 1, d) so it broadcasts against channel-last x."""
    if value.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"time batch {value.shape[0]} does not match input batch {x.shape[0]}")
    return value.reshape(value.shape[0], *([1] * (x.dim() - 2)), value.shape[-1])


class TDLayerNorm(nn.Module):
    """LayerNorm over the last dim whose weight and bias are TimeDependentParameters."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = TimeDependentParameter(dim, 1.0)
        self.bias = TimeDependentParameter(dim, 0.0)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        x_hat = F.layer_norm(x, (self.dim,), eps=self.eps)
        weight = _broadcast_channels(self.weight(tau), x)
        bias = _broadcast_channels(self.bias(tau), x)
        return torch.addcmul(bias, weight, x_hat)


class TDRMSNorm(nn.Module):
    """RMSNorm y = x / (||x|| / sqrt(d) + eps) * gamma(tau), no bias (DiMR's released norm)."""

    def __init__(self, dim: int, eps: float = 1e-8):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.scale = TimeDependentParameter(dim, 1.0)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        rms = x.norm(dim=-1, keepdim=True) * self.dim**-0.5
        return x / (rms + self.eps) * _broadcast_channels(self.scale(tau), x)


class ConditionFreeNorm(nn.Module):
    """A plain LayerNorm or RMSNorm behind the (x, cond) interface, for time-free ablations."""

    def __init__(self, dim: int, kind: str = "layer"):
        super().__init__()
        if kind not in ("layer", "rms"):
            raise ValueError(f"kind must be 'layer' or 'rms', got {kind!r}")
        self.norm = nn.LayerNorm(dim) if kind == "layer" else nn.RMSNorm(dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.norm(x)


NORM_TYPES = {
    "TDLN": TDLayerNorm,
    "TDRMSN": TDRMSNorm,
    "LN": lambda dim: ConditionFreeNorm(dim, "layer"),
    "RMSN": lambda dim: ConditionFreeNorm(dim, "rms"),
}


def make_norm(norm_type: str, dim: int) -> nn.Module:
    """Build a norm with the ``forward(x, cond)`` interface by its DiMR config name."""
    if norm_type not in NORM_TYPES:
        raise ValueError(f"unknown norm_type {norm_type!r}; expected one of {sorted(NORM_TYPES)}")
    return NORM_TYPES[norm_type](dim)


def split_no_decay_parameters(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups as in the official DiMR code: TDP gate vectors get no weight decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith(NO_DECAY_SUFFIXES) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
