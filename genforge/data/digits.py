"""The bundled handwritten-digits dataset (scikit-learn ``load_digits``).

Source: the UCI "Optical Recognition of Handwritten Digits" data (Alpaydin & Kaynak, 1998),
shipped inside scikit-learn as ``sklearn.datasets.load_digits``: 1,797 grey 8x8 images with
values 0..16 and labels 0..9. It needs no download, so it is genforge's default dataset.

The train/test split is fixed: ``digits_split.json`` (next to this file) stores the indices
made once by ``sklearn.model_selection.train_test_split(test_size=0.2, stratify=y,
random_state=0)`` - 1,437 train and 360 test images, every class ~20% in test. The loader
only reads the file, so the split never depends on the installed scikit-learn version.

Pixels are scaled ``v / 8 - 1`` into ``[-1, 1]`` (background is -1). ``resize="pad"``
centers the 8x8 digit on a background canvas of ``image_size`` (pixels kept exactly);
``resize="resize"`` bilinearly rescales the digit to fill ``image_size``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from genforge.data.transforms import check_resize_mode, fit_square, match_channels

SPLIT_FILE = Path(__file__).with_name("digits_split.json")
SPLITS = ("train", "test")
NATIVE_SIZE = 8
MAX_VALUE = 16.0


@lru_cache(maxsize=1)
def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as ``(N, 8, 8)`` float64 in 0..16 and ``(N,)`` int labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


@lru_cache(maxsize=1)
def load_split_indices() -> dict[str, list[int]]:
    """The stored ``{"train": [...], "test": [...]}`` indices, checked against the data."""
    spec = json.loads(SPLIT_FILE.read_text())
    n = len(_load_raw()[1])
    if spec["n_samples"] != n:
        raise ValueError(f"{SPLIT_FILE} was made for {spec['n_samples']} digits, but "
                         f"sklearn's load_digits has {n}")
    train, test = spec["train"], spec["test"]
    if len(train) + len(test) != n or len(set(train) | set(test)) != n:
        raise ValueError(f"{SPLIT_FILE} does not partition the {n} digits")
    return {"train": train, "test": test}


class DigitsDataset(Dataset):
    """scikit-learn digits as ``(image, label)`` pairs, image ``(C, S, S)`` float32 in [-1, 1].

    All images live in memory: ``.images`` is ``(N, C, S, S)`` and ``.labels`` is ``(N,)``
    long, for code that wants whole batches without a DataLoader.
    """

    num_classes = 10

    def __init__(self, split: str = "train", image_size: int = 8, resize: str = "pad",
                 channels: int = 1) -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not a digits split; expected one of {SPLITS}")
        check_resize_mode(resize)
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size={image_size!r} must be a positive int")
        if resize == "pad" and image_size < NATIVE_SIZE:
            raise ValueError(f"image_size={image_size} is smaller than the 8x8 digits; "
                             "resize='pad' needs image_size >= 8 (use resize='resize')")
        raw, target = _load_raw()
        idx = np.asarray(load_split_indices()[split])
        images = torch.from_numpy(raw[idx]).to(torch.float32) / (MAX_VALUE / 2) - 1.0
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
        return (f"DigitsDataset(split={self.split!r}, n={len(self)}, image_size={self.image_size}, "
                f"resize={self.resize!r}, channels={self.channels})")
