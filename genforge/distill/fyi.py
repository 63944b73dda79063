"""FYI, "Flip Your Images" (Son et al., ECCV 2024, arXiv 2407.08113): the synthetic set with its mirror.

Matching objectives push each synthetic image to carry a class's discriminative parts on
both sides at once, because real images show them on either side ("bilateral
equivalence"). FYI feeds the objective A = S ∪ flip_W(S) instead of S, labels duplicated
(the official ``BatchAug``): a deterministic flip of every image along the width axis,
concatenated on the batch axis, applied to the synthetic side only, before DSA, and only
during distillation (evaluation is unchanged).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["flip_concat"]


def flip_concat(x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``(cat(x, x.flip(-1)), cat(labels, labels))``; ``x`` is ``(N, C, H, W)``, the result ``2N``."""
    doubled = torch.cat([x, x.flip(-1)], dim=0)
    return doubled, (None if labels is None else torch.cat([labels, labels], dim=0))
