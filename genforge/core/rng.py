"""Reproducible draws that torch's samplers cannot take a generator for.

``torch.distributions.Beta`` has no ``generator`` argument, so mixup-style coefficients are
drawn with numpy's Beta sampler, seeded by one draw from the caller's torch generator: the
result depends only on that generator's state (used by the distillation evaluator's mixup and
by dataset reinforcement's MixUp/CutMix).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["symmetric_beta"]


def symmetric_beta(alpha: float, generator: torch.Generator | None) -> float:
    """λ ~ Beta(α, α), reproducible from ``generator`` (mixup, Zhang et al. 2018; CutMix)."""
    seed = int(torch.randint(1 << 30, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))
