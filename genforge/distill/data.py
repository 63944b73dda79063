"""The real training data a distillation engine matches against, as tensors.

Distillation reads the whole real train set into memory (as the field's code does): images
scaled to [0, 1], standardised per channel with the **train** mean and std (and optionally
ZCA-whitened, :mod:`genforge.distill.zca`), with the indices of every class kept for
class-balanced sampling. The test set is transformed with the train statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor
from torch.utils.data import Dataset

from genforge.data import build_dataset
from genforge.distill.state import tensors_digest
from genforge.distill.zca import ZCA

__all__ = ["Normalisation", "RealData", "load_real"]


@dataclass(frozen=True)
class Normalisation:
    """Per-channel ``(x - mean) / std`` of images in [0, 1]."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, images01: Tensor) -> "Normalisation":
        return cls(tuple(images01.mean(dim=(0, 2, 3)).tolist()), tuple(images01.std(dim=(0, 2, 3)).tolist()))

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, len(self.mean), 1, 1)
        return (torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape),
                torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape))

    def __call__(self, images01: Tensor) -> Tensor:
        mean, std = self._stats(images01)
        return (images01 - mean) / std

    def inverse(self, x: Tensor) -> Tensor:
        mean, std = self._stats(x)
        return x * std + mean


def _dataset_tensors(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """All ``(image in [-1, 1], label)`` items of a genforge dataset, stacked."""
    if hasattr(dataset, "images") and hasattr(dataset, "labels") and torch.is_tensor(getattr(dataset, "images")):
        images, labels = dataset.images, dataset.labels
    else:
        items = [dataset[i] for i in range(len(dataset))]
        images = torch.stack([img for img, _ in items])
        labels = torch.tensor([int(lab) for _, lab in items])
    return images.float(), torch.as_tensor(labels).long()


class RealData:
    """Real images in the engines' input space with per-class indices.

    ``images`` is ``(N, C, H, W)``: standardised, and whitened when ``zca`` is set;
    ``labels`` is ``(N,)``. ``to_pixels`` maps any tensor of that space back to [0, 1].
    """

    def __init__(self, images01: Tensor, labels: Tensor, num_classes: int, *,
                 normalisation: Normalisation | None = None, zca: ZCA | bool = False, zca_eps: float = 0.1):
        if images01.ndim != 4:
            raise ValueError(f"real images must be (N, C, H, W), got shape {tuple(images01.shape)}")
        if labels.shape != (images01.shape[0],):
            raise ValueError(f"{images01.shape[0]} images but labels of shape {tuple(labels.shape)}")
        self.normalisation = normalisation or Normalisation.fit(images01)
        x = self.normalisation(images01)
        if zca is True:
            zca = ZCA.fit(x, eps=zca_eps)
        self.zca: ZCA | None = zca or None
        self.images = self.zca(x) if self.zca is not None else x
        self.labels = labels.long()
        self.num_classes = num_classes
        self.indices_by_class = [torch.nonzero(self.labels == c).flatten() for c in range(num_classes)]

    @classmethod
    def from_dataset(cls, dataset: Dataset, *, like: "RealData | None" = None, zca: bool = False) -> "RealData":
        """Read a genforge dataset (items in [-1, 1]); ``like`` reuses another set's statistics."""
        images, labels = _dataset_tensors(dataset)
        num_classes = getattr(dataset, "num_classes", None) or int(labels.max()) + 1
        if like is not None:
            return cls((images + 1) / 2, labels, num_classes, normalisation=like.normalisation,
                       zca=like.zca or False)
        return cls((images + 1) / 2, labels, num_classes, zca=zca)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the images (in this space), labels and class count: which data a saved state was made from."""
        return tensors_digest({"images": self.images, "labels": self.labels,
                               "num_classes": torch.tensor(self.num_classes)})

    def class_count(self, c: int) -> int:
        return len(self.indices_by_class[c])

    def check_ipc(self, ipc: int, classes: list[int] | None = None) -> None:
        """Refuse an ``ipc`` larger than the real image count of any of ``classes`` (default: all)."""
        classes = range(self.num_classes) if classes is None else classes
        short = [c for c in classes if self.class_count(c) < ipc]
        if short:
            raise ValueError(f"ipc={ipc} is larger than the number of real images of class(es) {short} "
                             f"(smallest count {min(self.class_count(c) for c in short)})")

    def sample(self, c: int, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``min(n, count)`` distinct random images of class ``c`` (VICO's ``get_images``)."""
        idx = self.indices_by_class[c]
        pick = idx[torch.randperm(len(idx), generator=generator)[:n]]
        return self.images[pick]

    def to_pixels(self, x: Tensor) -> Tensor:
        """Images of this space back to [0, 1] pixels (inverse ZCA, then de-standardise)."""
        if self.zca is not None:
            x = self.zca.inverse(x)
        return self.normalisation.inverse(x).clamp(0, 1)


def load_real(name: str = "digits", *, root: str | None = None, test_root: str | None = None,
              image_size: int | None = None, resize: str = "pad", channels: int | None = None,
              zca: bool = False) -> tuple[RealData, RealData]:
    """Train and test :class:`RealData` of a registered dataset, the test set in the train statistics.

    Datasets with splits (digits, CIFAR) read ``split="test"``; an image folder has none, so
    its test images come from the folder ``test_root`` (e.g. ImageNet's ``val/``).
    """
    kwargs = dict(image_size=image_size, resize=resize, channels=channels)
    train = RealData.from_dataset(build_dataset(name, split="train", root=root, **kwargs), zca=zca)
    test_set = (build_dataset(name, split="train", root=test_root, **kwargs) if test_root is not None
                else build_dataset(name, split="test", root=root, **kwargs))
    return train, RealData.from_dataset(test_set, like=train)
