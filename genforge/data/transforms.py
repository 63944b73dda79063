"""Tensor transforms shared by the genforge datasets.

Every dataset in :mod:`genforge.data` yields float32 images ``(C, H, W)`` in ``[-1, 1]``
(the convention of DDPM, Ho et al. 2020, arXiv:2006.11239, and of diffusers). These helpers
convert stored pixels into that range and bring images to a square ``image_size`` either by
padding with background (``"pad"``) or by bilinear resizing (``"resize"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RESIZE_MODES = ("pad", "resize")


def check_resize_mode(resize: str) -> None:
    """Raise ``ValueError`` unless ``resize`` is one of :data:`RESIZE_MODES`."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize={resize!r} is not supported; expected one of {RESIZE_MODES}")


def uint8_to_signed(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 pixels ``0..255`` to float32 ``[-1, 1]``."""
    return images.to(torch.float32) / 127.5 - 1.0


def signed_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Map float images in ``[-1, 1]`` to uint8 ``0..255`` (clamped, rounded)."""
    return ((images.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def pad_center(images: torch.Tensor, size: int, fill: float = -1.0) -> torch.Tensor:
    """Pad ``(..., H, W)`` images with ``fill`` to ``(..., size, size)``, keeping them centered.

    When the padding is odd the extra row/column goes to the bottom/right.
    """
    h, w = images.shape[-2:]
    if size < h or size < w:
        raise ValueError(f"cannot pad {h}x{w} images to a smaller size {size}")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(images, (left, size - w - left, top, size - h - top), value=fill)


def resize_bilinear(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinearly resize ``(B, C, H, W)`` images to ``(B, C, size, size)``.

    Anti-aliasing is used when shrinking so that downsampled images do not alias.
    """
    if images.shape[-2:] == (size, size):
        return images
    shrink = size < images.shape[-1] or size < images.shape[-2]
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=shrink)


def fit_square(images: torch.Tensor, size: int, resize: str, fill: float = -1.0) -> torch.Tensor:
    """Bring ``(B, C, H, W)`` images to ``size`` by ``"pad"`` (with ``fill``) or ``"resize"``."""
    check_resize_mode(resize)
    if resize == "pad":
        return pad_center(images, size, fill)
    return resize_bilinear(images, size)


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert ``(B, C, H, W)`` images between 1 (grey) and 3 (RGB) channels.

    RGB -> grey uses the ITU-R BT.601 luma weights, as PIL's ``convert("L")`` does.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} is not supported; expected 1 or 3")
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1:
        return images.expand(-1, 3, -1, -1).contiguous()
    if c == 3:
        weights = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images * weights).sum(dim=1, keepdim=True)
    raise ValueError(f"cannot convert images with {c} channels to {channels}")
