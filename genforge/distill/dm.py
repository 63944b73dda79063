"""DM, distribution matching (Zhao & Bilen, WACV 2023, arXiv 2110.04181, Eq. 4).

Under a randomly initialised network ψ, the synthetic set of every class should have the
same mean embedding as the real data of that class (the MMD with a linear kernel):

    L_DM = Σ_c || mean_{x ∈ R_c} ψ(A(x, ω)) − mean_{s ∈ S_c} ψ(A(s, ω)) ||²

with A the Siamese DSA augmentation. ψ is the flattened output of the last block. DataDAM
is this objective plus attention matching (``datadam.py``).

Options: the matching loop's (:class:`~genforge.distill.matching.MatchingOptions`) with
``batch_real`` = 256 real images per class and iteration, the default of the official
``main_DM.py`` (``VICO-UoE/DatasetCondensation``); DataDAM's code uses 64. The digits recipe
and benchmark set 64 for both engines (the spec's CPU protocol), so that they differ only in
the objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from genforge.distill.matching import MatchingOptions, class_means
from genforge.distill.networks import ConvNet

__all__ = ["DMOptions", "dm_objective", "mean_embedding_loss"]


@dataclass
class DMOptions(MatchingOptions):
    """Matching options with DM's official ``batch_real`` of 256 (``main_DM.py``)."""

    batch_real: int = 256


def mean_embedding_loss(real_emb: Tensor, syn_emb: Tensor, real_sizes: list[int], syn_sizes: list[int]) -> Tensor:
    """Σ over classes of the squared distance between per-class mean embeddings."""
    return (class_means(real_emb, real_sizes) - class_means(syn_emb, syn_sizes)).pow(2).sum()


def dm_objective(net: ConvNet, real: list[Tensor], syn: list[Tensor]) -> tuple[Tensor, dict]:
    """L_DM of one iteration; ``real``/``syn`` hold one batch per class."""
    with torch.no_grad():
        real_emb = net.embed(torch.cat(real))
    syn_emb = net.embed(torch.cat(syn))
    loss = mean_embedding_loss(real_emb, syn_emb, [len(r) for r in real], [len(s) for s in syn])
    return loss, {}
