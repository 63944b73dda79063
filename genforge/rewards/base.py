"""The one interface of ReNO's reward models, and the registry that loads them by name.

ReNO (Eyring et al., NeurIPS 2024, arXiv 2406.04312; official code ExplainableML/ReNO,
``rewards/``) scores an image tensor in [0, 1] with frozen reward models and minimises
L = offset - score, each with the official constant offset (HPSv2 1, PickScore 30, CLIP 100,
ImageReward 2, aesthetic 10). Every reward here:

- preprocesses differentiably to its model's input, as the official ``clip_img_transform``:
  torchvision ``Resize(size, bicubic)`` -> ``CenterCrop(size)`` -> ``Normalize(mean, std)``,
  with ``size``, ``mean`` and ``std`` read from the model's own config (224 and the CLIP
  statistics for the released models, whatever a tiny test model says otherwise);
- has ``score(images, prompts)`` (higher is better, one value per image) and
  ``loss(images, prompts) = offset - score``, both differentiable in the images;
- is frozen: eval mode, ``requires_grad=False`` on every parameter.

Where the official code averages ``image_features @ text_features.T`` over a batch of one, we
score image i against prompt i (the diagonal), which is the same for a batch of one.

:func:`load` builds a registered reward from local files only (nothing is downloaded); a
missing file is a ``FileNotFoundError`` that names it. :func:`register_reward` refuses a name
that is already taken.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

__all__ = ["CLIP_MEAN", "CLIP_STD", "REWARDS", "Reward", "RewardMLP", "load", "prompt_list", "register_reward", "require_files"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def prompt_list(prompts: str | Sequence[str], batch: int) -> list[str]:
    """``prompts`` as a list of ``batch`` strings: one string is repeated; a list must match."""
    if isinstance(prompts, str):
        return [prompts] * batch
    prompts = list(prompts)
    if len(prompts) != batch or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"expected one prompt or a list of {batch} prompt strings (one per image), got {prompts!r}")
    return prompts


class Reward(nn.Module, ABC):
    """A frozen differentiable reward: ``loss(images, prompts) = offset - score(images, prompts)``.

    Subclasses set ``offset`` and implement :meth:`score_inputs` on preprocessed pixels.
    ``image_size=None`` skips resizing; ``mean=None`` skips normalising.
    """

    offset: float = 0.0

    def __init__(self, image_size: int | None, mean: Sequence[float] | None = CLIP_MEAN,
                 std: Sequence[float] | None = CLIP_STD) -> None:
        super().__init__()
        self.image_size = image_size
        self.mean = None if mean is None else tuple(float(m) for m in mean)
        self.std = None if std is None else tuple(float(s) for s in std)

    def freeze(self) -> Reward:
        """Eval mode and no gradient for any parameter (the images still get one)."""
        return self.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the model's input: bicubic resize of the short side,
        centre crop, normalise; differentiable, on the model's device and dtype."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{type(self).__name__} expects RGB images (B, 3, H, W) in [0, 1], "
                             f"got shape {tuple(images.shape)}")
        x = images.to(self.device, self.dtype)
        if self.image_size is not None:
            x = TF.resize(x, [self.image_size], interpolation=InterpolationMode.BICUBIC, antialias=True)
            x = TF.center_crop(x, [self.image_size])
        if self.mean is not None:
            x = TF.normalize(x, self.mean, self.std)
        return x

    @abstractmethod
    def score_inputs(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(B,) scores of preprocessed ``pixels`` against their prompts; higher is better."""

    def score(self, images: torch.Tensor, prompts) -> torch.Tensor:
        """(B,) rewards of images in [0, 1] for ``prompts`` (one per image, or one for all)."""
        return self.score_inputs(self.preprocess(images), prompt_list(prompts, images.shape[0]))

    def loss(self, images: torch.Tensor, prompts) -> torch.Tensor:
        """(B,) ReNO losses ``offset - score`` (lower is better)."""
        return self.offset - self.score(images, prompts)


class RewardMLP(nn.Module):
    """The MLP head shared by ImageReward and the LAION aesthetic predictor (no activations
    between the linear layers, as both release it); state-dict keys ``layers.*``."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                    nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                    nn.Linear(16, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, input_size) -> (B,)"""
        return self.layers(features).squeeze(-1)


REWARDS: dict[str, Callable[..., Reward]] = {}
"""Reward loaders by name: ``REWARDS[name](path, **kwargs)`` builds the reward from local files."""


def register_reward(name: str, loader: Callable[..., Reward]) -> Callable[..., Reward]:
    """Register ``loader(path, **kwargs) -> Reward`` under ``name``; a taken name is an error."""
    if name in REWARDS:
        raise ValueError(f"a reward named {name!r} is already registered ({REWARDS[name].__qualname__})")
    REWARDS[name] = loader
    return loader


def load(name: str, path: str | Path | None = None, **kwargs) -> Reward:
    """The registered reward ``name`` built from the local files at ``path`` (nothing is
    downloaded), frozen; e.g. ``load("pickscore", "/models/PickScore_v1").score(images, prompts)``."""
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}")
    return REWARDS[name](path, **kwargs).freeze()


def require_files(path: str | Path | None, *names: str, what: str) -> Path:
    """``path`` as a Path once every file in ``names`` (alternatives joined by '|') is there;
    otherwise a FileNotFoundError naming the first missing file and the reward it belongs to."""
    if path is None:
        raise FileNotFoundError(f"the {what} reward needs a local path to its weights (nothing is downloaded)")
    path = Path(path)
    for name in names:
        options = name.split("|")
        if not any((path / option).is_file() for option in options):
            raise FileNotFoundError(f"{what} weights: {str(path / options[0])!r} not found"
                                    + (f" (nor {', '.join(options[1:])})" if len(options) > 1 else ""))
    return path
