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

from functools import lru_cache
from pathlib import Path

import numpy as np

from genforge.data.bundled import SPLITS, BundledImages, read_split

SPLIT_FILE = Path(__file__).with_name("digits_split.json")
NATIVE_SIZE = 8
MAX_VALUE = 16.0
__all__ = ["DigitsDataset", "SPLITS", "SPLIT_FILE", "load_split_indices"]


@lru_cache(maxsize=1)
def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as ``(N, 8, 8)`` float64 in 0..16 and ``(N,)`` int labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


@lru_cache(maxsize=1)
def load_split_indices() -> dict[str, list[int]]:
    """The stored ``{"train": [...], "test": [...]}`` indices, checked against the data."""
    return read_split(SPLIT_FILE, len(_load_raw()[1]), "sklearn's load_digits")


class DigitsDataset(BundledImages):
    """scikit-learn digits as ``(image, label)`` pairs, image ``(C, S, S)`` float32 in [-1, 1]."""

    name, native_size, max_value = "digits", NATIVE_SIZE, MAX_VALUE

    def __init__(self, split: str = "train", image_size: int = 8, resize: str = "pad",
                 channels: int = 1) -> None:
        super().__init__(_load_raw, load_split_indices, split, image_size, resize, channels)
