"""Differentiable Siamese Augmentation (DSA; Zhao & Bilen, ICML 2021, arXiv 2102.08259).

Every transform is differentiable in the pixels, so a matching loss back-propagates through
it into the synthetic images. During distillation the real and the synthetic batch are
augmented with the **same** seed (Siamese): both get the identical transform, one parameter
set for the whole batch (VICO's ``param.Siamese``). During evaluation training there is no
seed and every image draws its own parameters.

A strategy string joins families with ``_``: ``color_crop_cutout_flip_scale_rotate`` is the
field's default; the digits recipes drop ``flip`` (digits are not mirror-invariant). In
mode ``"S"`` (the default) one family is drawn per call; in ``"M"`` all of them apply in
order. "color" is brightness, saturation and contrast together. The magnitudes are VICO's
``ParamDiffAug``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DSA", "DSAParams", "FAMILIES", "check_strategy"]

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass(frozen=True)
class DSAParams:
    """VICO's ``ParamDiffAug`` magnitudes."""

    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


def check_strategy(strategy: str) -> tuple[str, ...]:
    """The families of a strategy string ("" or "none" is no augmentation)."""
    if strategy in ("", "none", "None"):
        return ()
    families = tuple(strategy.split("_"))
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown DSA families {unknown} in strategy {strategy!r}; known: {FAMILIES}")
    return families


class DSA:
    """``dsa(x, seed=s)`` augments a ``(B, C, H, W)`` batch; equal seeds give equal transforms."""

    def __init__(self, strategy: str = "color_crop_cutout_flip_scale_rotate", mode: str = "S",
                 params: DSAParams = DSAParams()):
        if mode not in ("S", "M"):
            raise ValueError(f"DSA mode must be 'S' (one family per call) or 'M' (all), got {mode!r}")
        self.families = check_strategy(strategy)
        self.strategy = strategy
        self.mode = mode
        self.params = params

    def __call__(self, x: Tensor, *, seed: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Siamese (one transform for the batch) when ``seed`` is given, else per-image."""
        if not self.families:
            return x
        if seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        siamese = seed is not None
        if self.mode == "S":
            pick = torch.randint(len(self.families), (1,), generator=generator).item()
            families = (self.families[pick],)
        else:
            families = self.families
        for family in families:
            x = getattr(self, f"_{family}")(x, generator, siamese)
        return x.contiguous()

    @staticmethod
    def _uniform(n: int, generator, siamese: bool, x: Tensor, shape=()) -> Tensor:
        draw = torch.rand((1 if siamese else n, *shape), generator=generator)
        return draw.expand(n, *shape).to(device=x.device, dtype=x.dtype)

    @staticmethod
    def _integers(low: int, high: int, n: int, generator, siamese: bool, x: Tensor) -> Tensor:
        draw = torch.randint(low, high, (1 if siamese else n,), generator=generator)
        return draw.expand(n).to(x.device)

    def _color(self, x, generator, siamese):
        n, p = x.shape[0], self.params
        b = self._uniform(n, generator, siamese, x, (1, 1, 1))
        x = x + (b - 0.5) * p.brightness
        s = self._uniform(n, generator, siamese, x, (1, 1, 1))
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (s * p.saturation) + mean
        c = self._uniform(n, generator, siamese, x, (1, 1, 1))
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * (c + p.contrast) + mean

    def _flip(self, x, generator, siamese):
        r = self._uniform(x.shape[0], generator, siamese, x, (1, 1, 1))
        return torch.where(r < self.params.prob_flip, x.flip(3), x)

    def _affine(self, x, theta):
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, align_corners=False)

    def _scale(self, x, generator, siamese):
        n, ratio = x.shape[0], self.params.ratio_scale
        sx = self._uniform(n, generator, siamese, x) * (ratio - 1 / ratio) + 1 / ratio
        sy = self._uniform(n, generator, siamese, x) * (ratio - 1 / ratio) + 1 / ratio
        zero = torch.zeros_like(sx)
        theta = torch.stack([torch.stack([sx, zero, zero], -1), torch.stack([zero, sy, zero], -1)], 1)
        return self._affine(x, theta)  # theta: (B, 2, 3)

    def _rotate(self, x, generator, siamese):
        n = x.shape[0]
        angle = (self._uniform(n, generator, siamese, x) - 0.5) * 2 * self.params.ratio_rotate / 180 * math.pi
        cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
        theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
        return self._affine(x, theta)

    def _crop(self, x, generator, siamese):
        """Translate by up to ``ratio_crop_pad`` of the side, filling with zeros (pad-and-crop)."""
        n, _, h, w = x.shape
        sh, sw = int(h * self.params.ratio_crop_pad + 0.5), int(w * self.params.ratio_crop_pad + 0.5)
        ty = self._integers(-sh, sh + 1, n, generator, siamese, x)
        tx = self._integers(-sw, sw + 1, n, generator, siamese, x)
        rows = (torch.arange(h, device=x.device)[None, :] + ty[:, None] + 1).clamp(0, h + 1)  # (B, H)
        cols = (torch.arange(w, device=x.device)[None, :] + tx[:, None] + 1).clamp(0, w + 1)  # (B, W)
        padded = F.pad(x, [1, 1, 1, 1])
        batch = torch.arange(n, device=x.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

    def _cutout(self, x, generator, siamese):
        """Zero a square of ``ratio_cutout`` of the side at a random centre."""
        n, _, h, w = x.shape
        ch, cw = int(h * self.params.ratio_cutout + 0.5), int(w * self.params.ratio_cutout + 0.5)
        oy = self._integers(0, h + (1 - ch % 2), n, generator, siamese, x)
        ox = self._integers(0, w + (1 - cw % 2), n, generator, siamese, x)
        rows = (torch.arange(ch, device=x.device)[None, :] + oy[:, None] - ch // 2).clamp(0, h - 1)
        cols = (torch.arange(cw, device=x.device)[None, :] + ox[:, None] - cw // 2).clamp(0, w - 1)
        mask = torch.ones(n, h, w, dtype=x.dtype, device=x.device)
        batch = torch.arange(n, device=x.device)[:, None, None]
        mask[batch, rows[:, :, None], cols[:, None, :]] = 0
        return x * mask[:, None]
