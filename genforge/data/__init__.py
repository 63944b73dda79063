"""Datasets for genforge: the bundled digits and MNIST-5k, image folders, CIFAR-format files and
latent caches (``latents``: VAE latents written by ``genforge cache-latents``).

Every dataset yields ``(image, label)`` with ``image`` a float32 ``(C, H, W)`` tensor in
``[-1, 1]`` and ``label`` an int, and carries ``.num_classes``, ``.channels`` and
``.image_size`` (square side). The text-to-image ones yield a caption instead of the label:
``image_text`` (an image-text folder) its string, ``sd_latents`` (a text cache of
``genforge cache-latents --text-encoder``) its text-encoder hidden states. :func:`build_dataset` is the one entry point recipes use;
its registry is explicit and registering a name twice is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from genforge.data.cifar import CIFARDataset, RestrictedUnpickler, safe_load_pickle
from genforge.data.digits import DigitsDataset
from genforge.data.folder import ImageFolderDataset
from genforge.data.image_text import ImageTextFolderDataset
from genforge.data.latents import LatentsDataset
from genforge.data.mnist5k import MNIST5kDataset
from genforge.data.transforms import check_resize_mode

__all__ = [
    "CIFARDataset", "DigitsDataset", "ImageFolderDataset", "ImageTextFolderDataset", "LatentsDataset", "MNIST5kDataset",
    "RestrictedUnpickler",
    "build_dataset", "check_dataset", "dataset_names", "register_dataset", "safe_load_pickle",
]

DatasetBuilder = Callable[..., Dataset]
_REGISTRY: dict[str, DatasetBuilder] = {}


def register_dataset(name: str, builder: DatasetBuilder) -> None:
    """Register ``builder(split=, root=, image_size=, resize=, channels=)`` under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"dataset {name!r} is already registered")
    _REGISTRY[name] = builder


def dataset_names() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(_REGISTRY)


def build_dataset(name: str, *, split: str = "train", root: str | None = None,
                  image_size: int | None = None, resize: str = "pad",
                  channels: int | None = None) -> Dataset:
    """Build the dataset registered as ``name``.

    ``image_size=None`` keeps the native size (8 for digits, 28 for mnist5k, 32 for CIFAR); ``resize``
    (``"pad"`` or ``"resize"``) says how datasets with a native size reach ``image_size``.
    Image folders have no native size: they need ``image_size`` and are always resized and
    center-cropped. ``channels=None`` keeps the dataset's own (1 for digits, 3 otherwise).
    """
    check_dataset(name, root=root, resize=resize)
    return _REGISTRY[name](split=split, root=root, image_size=image_size, resize=resize,
                           channels=channels)


def check_dataset(name: str, *, root: str | None = None, resize: str = "pad") -> None:
    """ValueError, before any work, for an unknown dataset name, a bad ``resize`` mode or a
    ``root`` that does not exist."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {dataset_names()}")
    check_resize_mode(resize)
    if root is not None and not Path(root).exists():
        raise ValueError(f"dataset {name!r}: root {str(root)!r} does not exist")


def _no_root(name: str, root: str | None) -> None:
    if root is not None:
        raise ValueError(f"dataset {name!r} is bundled and takes no root (got root={root!r})")


def _need_root(name: str, root: str | None) -> str:
    if root is None:
        raise ValueError(f"dataset {name!r} needs root=<path to its files>")
    return root


def _build_digits(*, split, root, image_size, resize, channels):
    _no_root("digits", root)
    return DigitsDataset(split=split, image_size=image_size or 8, resize=resize,
                         channels=channels or 1)


def _build_mnist5k(*, split, root, image_size, resize, channels):
    _no_root("mnist5k", root)
    return MNIST5kDataset(split=split, image_size=image_size or 28, resize=resize,
                          channels=channels or 1)


def _build_image_folder(*, split, root, image_size, resize, channels):
    root = _need_root("image_folder", root)
    if image_size is None:
        raise ValueError("dataset 'image_folder' needs image_size (its images have no common size)")
    if split != "train":
        raise ValueError(f"dataset 'image_folder' has no splits (got split={split!r}); "
                         "point root at the folder of the split you want")
    return ImageFolderDataset(root, image_size=image_size, channels=channels or 3)


def _build_image_text(*, split, root, image_size, resize, channels):
    root = _need_root("image_text", root)
    if split != "train":
        raise ValueError(f"dataset 'image_text' has no splits (got split={split!r}); point root at the folder of "
                         "the split you want")
    return ImageTextFolderDataset(root, image_size=image_size, channels=channels or 3)


def _latents_builder(name: str, captioned: bool) -> DatasetBuilder:
    def build(*, split, root, image_size, resize, channels):
        root = _need_root(name, root)
        if split != "train":
            raise ValueError(f"dataset {name!r} has no splits (got split={split!r}); point root at the cache of "
                             "the split you want")
        dataset = LatentsDataset(root)
        if dataset.captioned != captioned:
            made = "with --text-encoder (captions)" if dataset.captioned else "without --text-encoder (class labels)"
            raise ValueError(f"dataset {name!r}: the cache at {root} was made {made}; use data.name "
                             f"{'sd_latents' if dataset.captioned else 'latents'}")
        if image_size is not None and image_size != dataset.image_size:
            raise ValueError(f"dataset {name!r} at {root} holds {dataset.image_size}x{dataset.image_size} latents; "
                             f"data.image_size must be {dataset.image_size}, got {image_size}")
        if channels is not None and channels != dataset.channels:
            raise ValueError(f"dataset {name!r} at {root} holds {dataset.channels}-channel latents, got "
                             f"channels={channels}")
        return dataset
    return build


def _cifar_builder(num_classes: int) -> DatasetBuilder:
    def build(*, split, root, image_size, resize, channels):
        root = _need_root(f"cifar{num_classes}", root)
        return CIFARDataset(root, split=split, num_classes=num_classes, image_size=image_size,
                            resize=resize, channels=channels or 3)
    return build


register_dataset("digits", _build_digits)
register_dataset("mnist5k", _build_mnist5k)
register_dataset("image_folder", _build_image_folder)
register_dataset("image_text", _build_image_text)
register_dataset("latents", _latents_builder("latents", captioned=False))
register_dataset("sd_latents", _latents_builder("sd_latents", captioned=True))
register_dataset("cifar10", _cifar_builder(10))
register_dataset("cifar100", _cifar_builder(100))
