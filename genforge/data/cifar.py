"""CIFAR-10 / CIFAR-100 from the official "python version" pickle batches.

Format (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html): each batch file is a
pickled dict with ``data`` - a uint8 numpy array ``(N, 3072)``, one row per image holding
the 1024 red, then green, then blue values of a 32x32 image in row-major order - and
``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100). The files were written by Python 2, so
keys may come back as ``bytes`` or ``str``; both are accepted.

Pickle can run arbitrary code, so batches are read with :class:`RestrictedUnpickler`, whose
``find_class`` resolves only an explicit allow-list (numpy's array reconstruction and
builtin containers) - the pattern of the Python docs' "Restricting Globals" section
(https://docs.python.org/3/library/pickle.html#restricting-globals).
"""

from __future__ import annotations

import builtins
import codecs
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from genforge.data.transforms import check_resize_mode, fit_square, match_channels, uint8_to_signed

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

NATIVE_SIZE = 32
_LAYOUT = {  # num_classes -> (folder name, {split: batch files}, label key)
    10: ("cifar-10-batches-py",
         {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}, "labels"),
    100: ("cifar-100-python", {"train": ["train"], "test": ["test"]}, "fine_labels"),
}


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes, limited to latin-1."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


_SAFE_BUILTINS = {name: getattr(builtins, name)
                  for name in ("dict", "list", "tuple", "set", "frozenset", "bytearray")}
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    **{(module, name): obj for module in ("builtins", "__builtin__")
       for name, obj in _SAFE_BUILTINS.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy-array and builtin-container globals.

    Any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``...) raises
    ``pickle.UnpicklingError`` before it can be called.
    """

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: CIFAR batches may only contain numpy "
                f"arrays and builtin containers (allowed: {sorted(_ALLOWED_GLOBALS)})") from None


def safe_load_pickle(path: str | Path):
    """Load a pickle file with :class:`RestrictedUnpickler` (``latin1`` for Python-2 files)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR batch file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, encoding="latin1").load()


def read_cifar_batch(path: str | Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch file -> uint8 images ``(N, 3, 32, 32)`` and int64 labels ``(N,)``."""
    raw = safe_load_pickle(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{str(path)!r} holds a {type(raw).__name__}, expected a dict batch")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in raw.items()}
    for key in ("data", label_key):
        if key not in batch:
            raise KeyError(f"{str(path)!r} has no {key!r} entry (keys: {sorted(batch)})")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * NATIVE_SIZE * NATIVE_SIZE or len(data) != len(labels):
        raise ValueError(f"{str(path)!r}: data has shape {data.shape} and {len(labels)} labels; "
                         "expected (N, 3072) and N labels")
    return data.reshape(-1, 3, NATIVE_SIZE, NATIVE_SIZE), labels


class CIFARDataset(Dataset):
    """CIFAR-10/100 ``(image, label)`` pairs, image ``(C, S, S)`` float32 in [-1, 1].

    ``root`` is the extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``) or its
    parent. Images are kept as uint8 in ``.data`` ``(N, 3, 32, 32)`` and converted per item;
    ``.labels`` is an ``(N,)`` long tensor. ``image_size`` other than 32 uses ``resize``
    (``"pad"`` with -1 background, or bilinear ``"resize"``); ``channels=1`` gives BT.601 grey.
    """

    def __init__(self, root: str | Path, split: str = "train", num_classes: int = 10,
                 image_size: int | None = None, resize: str = "pad", channels: int = 3) -> None:
        if num_classes not in _LAYOUT:
            raise ValueError(f"num_classes={num_classes} is not a CIFAR variant; expected 10 or 100")
        folder, files, label_key = _LAYOUT[num_classes]
        if split not in files:
            raise ValueError(f"split={split!r} is not a CIFAR split; expected one of {tuple(files)}")
        check_resize_mode(resize)
        if channels not in (1, 3):
            raise ValueError(f"channels={channels} is not supported; expected 1 or 3")
        image_size = NATIVE_SIZE if image_size is None else image_size
        if resize == "pad" and image_size < NATIVE_SIZE:
            raise ValueError(f"image_size={image_size} is smaller than CIFAR's 32x32; "
                             "resize='pad' needs image_size >= 32 (use resize='resize')")
        root = Path(root)
        self.root = root / folder if (root / folder).is_dir() else root
        parts = [read_cifar_batch(self.root / name, label_key) for name in files[split]]
        self.data = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        self.labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        self.split, self.resize = split, resize
        self.num_classes, self.image_size, self.channels = num_classes, image_size, channels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = uint8_to_signed(self.data[i : i + 1])  # (1, 3, 32, 32)
        if self.image_size != NATIVE_SIZE:
            image = fit_square(image, self.image_size, self.resize)
        return match_channels(image, self.channels)[0], int(self.labels[i])

    def __repr__(self) -> str:
        return (f"CIFARDataset(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
                f"num_classes={self.num_classes}, image_size={self.image_size}, channels={self.channels})")
