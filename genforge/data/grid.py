"""One PNG of a class-ordered image set: one row per class (samples, synthetic sets)."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import save_image

__all__ = ["save_class_grid"]


def save_class_grid(images: torch.Tensor, per_class: int, path: Path, upscale: int | None = None) -> None:
    """PNG grid of ``(N, C, H, W)`` images in [-1, 1] ordered class by class: one row per class.
    ``upscale`` (nearest): by default 4 for images of at most 32 pixels a side, else 1."""
    if upscale is None:
        upscale = 4 if max(images.shape[-2:]) <= 32 else 1
    if upscale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=upscale, mode="nearest")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image((images.clamp(-1, 1) + 1) / 2, path, nrow=per_class, padding=2, pad_value=0.5)
