"""Embeddings for diffusion transformers: timestep, class label, image patches, 2-D positions.

All four follow DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023,
arXiv 2212.09748, Sec. 3.1 and its reference code), so DiT-style checkpoints line up:

- :func:`timestep_sinusoidal`: the sinusoidal features of "Attention Is All You Need"
  (Vaswani et al. 2017) applied to the diffusion time, laid out as in ADM (Dhariwal &
  Nichol 2021) and DiT: for i < half = dim // 2, with freq_i = max_period^(-i / half)::

      emb[:, i]        = cos(t * freq_i)
      emb[:, half + i] = sin(t * freq_i)        (cos half first, then sin half)

  :class:`TimestepEmbedding` maps them through Linear-SiLU-Linear.
- :class:`LabelEmbedding`: a class-embedding table with one extra "null" row; during
  training labels are replaced by the null class with probability p, so one network learns
  the conditional and the unconditional model used by classifier-free guidance (Ho &
  Salimans, "Classifier-Free Diffusion Guidance", 2022, arXiv 2207.12598).
- :class:`PatchEmbed`: non-overlapping p x p patches, linearly projected (a Conv2d with
  kernel = stride = p), as in ViT (Dosovitskiy et al. 2021) and DiT's "patchify" layer.
- :func:`sincos_2d_pos_embed`: fixed 2-D sine-cosine positions of MAE (He et al. 2022) and
  DiT: the first dim/2 channels encode the column (x) index, the last dim/2 the row (y)
  index, each as [sin(pos * omega), cos(pos * omega)] with omega_c = 10000^(-c / (dim/4)).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn


def timestep_sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps t (B,) -> (B, dim), float32.

    Cosines of all frequencies come first, then the sines (ADM/DiT order); an odd ``dim``
    gets one zero column at the end.
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must be 1-D (B,); got shape {tuple(t.shape)}")
    if dim < 2:
        raise ValueError(f"dim must be at least 2; got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedding(nn.Module):
    """t (B,) -> (B, dim): :func:`timestep_sinusoidal` features through Linear-SiLU-Linear."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_sinusoidal(t, self.freq_dim)  # (B, freq_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def batch_conditions(timestep: torch.Tensor | float | int, class_labels: torch.Tensor | None, batch: int,
                     null_index: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-conditional denoiser's (timestep, labels) as (B,) tensors.

    A scalar timestep is repeated over the batch (diffusers schedulers pass one ``t`` per
    step); missing labels mean the unconditional (null) class.
    """
    timestep = torch.as_tensor(timestep, device=device)
    if timestep.dim() == 0:
        timestep = timestep.expand(batch)
    if class_labels is None:
        class_labels = torch.full((batch,), null_index, device=device, dtype=torch.long)
    return timestep, class_labels


def drop_labels(
    labels: torch.Tensor, prob: float, null_index: int, force_drop_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Replace labels by ``null_index`` for classifier-free guidance training.

    Without ``force_drop_ids`` each label is replaced independently with probability
    ``prob``, drawn from torch's global RNG. With it, exactly the positions where
    ``force_drop_ids`` is nonzero are replaced and ``prob`` is not used (DiT's convention,
    used to build the unconditional half of a guided batch).
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"label drop probability must be in [0, 1]; got {prob}")
    if force_drop_ids is None:
        drop = torch.rand(labels.shape, device=labels.device) < prob
    else:
        if force_drop_ids.shape != labels.shape:
            raise ValueError(
                f"force_drop_ids shape {tuple(force_drop_ids.shape)} must equal labels shape {tuple(labels.shape)}"
            )
        drop = force_drop_ids.to(device=labels.device, dtype=torch.bool)
    return torch.where(drop, torch.full_like(labels, null_index), labels)


class LabelEmbedding(nn.Module):
    """Class labels (B,) -> (B, dim), with label dropout for classifier-free guidance.

    With ``dropout_prob > 0`` the table has ``num_classes + 1`` rows and row ``num_classes``
    (:attr:`null_index`) is the null class: the unconditional model. Passing labels equal
    to ``null_index`` asks for it directly, as guided sampling does.
    """

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        if not 0.0 <= dropout_prob <= 1.0:
            raise ValueError(f"dropout_prob must be in [0, 1]; got {dropout_prob}")
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.null_index = num_classes if dropout_prob > 0 else None
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(
        self, labels: torch.Tensor, *, train: bool, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embed ``labels``; during training drop them to the null class with prob ``dropout_prob``."""
        rows = self.embedding_table.num_embeddings
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= rows):
            raise ValueError(
                f"labels must lie in [0, {rows - 1}] (num_classes={self.num_classes}"
                f"{', plus the null index' if self.null_index is not None else ''}); "
                f"got values in [{int(labels.min())}, {int(labels.max())}]"
            )
        if force_drop_ids is not None or (train and self.dropout_prob > 0):
            if self.null_index is None:
                raise ValueError("force_drop_ids needs a null class; build LabelEmbedding with dropout_prob > 0")
            labels = drop_labels(labels, self.dropout_prob, self.null_index, force_drop_ids)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """Images (B, C, H, W) -> patch tokens (B, N, dim), N = (H / p) * (W / p), row-major."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, bias: bool = True):
        super().__init__()
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"PatchEmbed expects (B, {self.in_channels}, H, W); got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} (HxW) is not divisible by patch_size={p}")
        return rearrange(self.proj(x), "b d h w -> b (h w) d")


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """positions (L,) float64 -> (L, dim): [sin(pos * omega), cos(pos * omega)]."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions[:, None] * omega[None]  # (L, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d_pos_embed(dim: int, height: int, width: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, (height * width, dim) float32, row-major tokens.

    Token ``r * width + c`` (row r, column c) gets ``[sincos_1d(c), sincos_1d(r)]``, each
    half of ``dim / 2`` channels: the MAE/DiT layout, computed in float64 as they do.
    """
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4 for a 2-D sin-cos embedding; got {dim}")
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive; got {height}x{width}")
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )
    column_part = _sincos_1d(dim // 2, cols.reshape(-1))  # (H*W, dim/2)
    row_part = _sincos_1d(dim // 2, rows.reshape(-1))  # (H*W, dim/2)
    return torch.cat([column_part, row_part], dim=1).float()
