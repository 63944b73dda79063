"""ZCA whitening of images, with the inverse needed to export a set distilled in ZCA space.

KIP, MTT and DataDAM whiten CIFAR with kornia's ``ZCAWhitening`` fitted on the real train
set (regulariser ``eps`` = 0.1 in MTT/DataDAM). With C the covariance of the flattened,
mean-centred images and C = U diag(s) U^T: W = U diag(1/sqrt(s + eps)) U^T,
whiten(x) = (x - mu) W and its inverse x = whiten(x) W^{-1} + mu. Synthetic images
distilled in whitened space must be mapped back before they are saved as pictures
(DataDAM issue #13: without it reuse drops to ~25%).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ZCA"]


class ZCA:
    """A ZCA transform fitted on ``(N, C, H, W)`` images; ``__call__`` whitens, ``inverse`` undoes it."""

    def __init__(self, mean: Tensor, matrix: Tensor, inverse_matrix: Tensor, eps: float):
        self.mean, self.matrix, self.inverse_matrix, self.eps = mean, matrix, inverse_matrix, eps

    @classmethod
    def fit(cls, images: Tensor, eps: float = 0.1) -> "ZCA":
        flat = images.reshape(images.shape[0], -1).double()
        mean = flat.mean(0)
        centred = flat - mean
        cov = centred.T @ centred / (flat.shape[0] - 1)
        s, u = torch.linalg.eigh(cov)
        s = s.clamp_min(0)
        matrix = u @ torch.diag((s + eps).rsqrt()) @ u.T
        inverse = u @ torch.diag((s + eps).sqrt()) @ u.T
        return cls(mean.float(), matrix.float(), inverse.float(), eps)

    def __call__(self, images: Tensor) -> Tensor:
        flat = images.reshape(images.shape[0], -1)
        return ((flat - self.mean.to(flat)) @ self.matrix.to(flat)).reshape(images.shape)

    def inverse(self, images: Tensor) -> Tensor:
        flat = images.reshape(images.shape[0], -1)
        return (flat @ self.inverse_matrix.to(flat) + self.mean.to(flat)).reshape(images.shape)

    def state(self) -> dict[str, Tensor]:
        """Tensors to store next to a synthetic set (``ZCA.from_state`` rebuilds it)."""
        return {"zca_mean": self.mean, "zca_matrix": self.matrix, "zca_inverse": self.inverse_matrix,
                "zca_eps": torch.tensor(self.eps)}

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> "ZCA":
        return cls(state["zca_mean"], state["zca_matrix"], state["zca_inverse"], float(state["zca_eps"]))
