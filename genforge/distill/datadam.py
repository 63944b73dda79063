"""DataDAM: dataset distillation with attention matching (Sajedi et al., ICCV 2023, arXiv 2310.00093).

The Spatial Attention Matching module (Sec. 3.2, Eq. 2-3) summarises a feature map
f ∈ R^{B×C×H×W} by its channel-aggregated attention map

    A(f) = Σ_c |f_c|^p,   flattened to (B, H·W) and L2-normalised per sample,

and matches, per class, the mean normalised attention of real and synthetic images at the
post-ReLU output of every block except the last. The last block's flattened output (the
embedding) is matched by DM's mean-embedding loss (Eq. 4, "L_MMD"). The total (Eq. 5, with
the scales of the released code) is

    L = 100 · Σ_{l < L} Σ_c || mean_c A_l(real) − mean_c A_l(syn) ||²  +  100 · λ · L_MMD

with λ = ``task_balance`` (0.01 at low resolution, 0.02 at high). The paper and its
hyper-parameter table use p = 4; the released code calls ``get_attention(param=1, exp=1)``,
i.e. p = 1: both are available through ``power``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from genforge.distill.dm import mean_embedding_loss
from genforge.distill.matching import MatchingOptions, class_means
from genforge.distill.networks import ConvNet

__all__ = ["DataDAMOptions", "attention_map", "datadam_objective", "SAM_SCALE"]

SAM_SCALE = 100.0


@dataclass
class DataDAMOptions(MatchingOptions):
    """Matching options plus DataDAM's power p (paper: 4; released code: 1) and λ."""

    power: float = 4.0
    task_balance: float = 0.01

    def check(self) -> None:
        super().check()
        if self.power <= 0:
            raise ValueError(f"the attention power p must be > 0, got {self.power}")
        if self.task_balance < 0:
            raise ValueError(f"task_balance must be >= 0, got {self.task_balance}")


def attention_map(features: Tensor, power: float = 4.0) -> Tensor:
    """A(f) = Σ_c |f_c|^p of ``(B, C, H, W)`` features, as ``(B, H*W)`` rows of unit L2 norm."""
    return F.normalize(features.abs().pow(power).sum(dim=1).flatten(1), p=2, dim=1)


def datadam_objective(net: ConvNet, real: list[Tensor], syn: list[Tensor], *, power: float = 4.0,
                      task_balance: float = 0.01) -> tuple[Tensor, dict]:
    """DataDAM's loss for one iteration; ``real``/``syn`` hold one batch per class."""
    real_sizes, syn_sizes = [len(r) for r in real], [len(s) for s in syn]
    with torch.no_grad():
        real_maps, real_emb = net.activations(torch.cat(real))
    syn_maps, syn_emb = net.activations(torch.cat(syn))
    sam = syn_emb.new_zeros(())
    for real_f, syn_f in zip(real_maps[:-1], syn_maps[:-1]):
        diff = class_means(attention_map(real_f, power), real_sizes) - class_means(attention_map(syn_f, power), syn_sizes)
        sam = sam + SAM_SCALE * diff.pow(2).sum()
    mmd = SAM_SCALE * task_balance * mean_embedding_loss(real_emb, syn_emb, real_sizes, syn_sizes)
    return sam + mmd, {"sam": float(sam.detach()), "mmd": float(mmd.detach())}
