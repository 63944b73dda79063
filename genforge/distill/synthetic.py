"""The synthetic set: what every engine returns, saved as one safetensors file.

A :class:`SyntheticSet` holds ``images`` ``(N, C, H, W)`` in the engines' input space
(standardised with the real train statistics, whitened when ZCA was used), class-ordered
hard ``labels`` ``(N,)``, optional ``soft_labels`` ``(N, K)`` (teacher probabilities, for
soft-label methods such as DWA) and its metadata: method, ipc, seed, the normalisation and,
with ZCA, the whitening matrices needed to turn the images back into pictures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from genforge.data.grid import save_class_grid
from genforge.distill.data import Normalisation, RealData
from genforge.distill.seeding import INIT_STREAM, stream
from genforge.distill.state import read_safetensors, save_safetensors
from genforge.distill.zca import ZCA

__all__ = ["SyntheticSet", "initial_images"]

_META_KEY = "genforge_synthetic_set"
INITS = ("real", "noise")


@dataclass
class SyntheticSet:
    images: Tensor
    labels: Tensor
    method: str
    ipc: int
    seed: int
    normalisation: Normalisation
    soft_labels: Tensor | None = None
    zca: ZCA | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"a synthetic set needs images (N, C, H, W) and labels (N,); got "
                             f"{tuple(self.images.shape)} and {tuple(self.labels.shape)}")
        if self.soft_labels is not None and self.soft_labels.shape[0] != self.images.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but soft labels of shape {tuple(self.soft_labels.shape)}")

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if self.soft_labels is None else self.soft_labels.shape[1]

    def pixels(self) -> Tensor:
        """The images as [0, 1] pictures (inverse ZCA, then de-standardised)."""
        x = self.images.detach().float()
        if self.zca is not None:
            x = self.zca.inverse(x)
        return self.normalisation.inverse(x).clamp(0, 1)

    def save_grid(self, path: str | Path, upscale: int = 4) -> None:
        """PNG of the set, one row per class (images sorted by label, ``ipc`` per row)."""
        order = torch.argsort(self.labels, stable=True)
        save_class_grid(self.pixels()[order] * 2 - 1, self.ipc, Path(path), upscale=upscale)

    def save(self, path: str | Path) -> None:
        """Write one safetensors file (atomically: a temporary name, then a rename)."""
        tensors = {"images": self.images.float(), "labels": self.labels.long()}
        if self.soft_labels is not None:
            tensors["soft_labels"] = self.soft_labels.float()
        if self.zca is not None:
            tensors.update(self.zca.state())
        meta = {"method": self.method, "ipc": self.ipc, "seed": self.seed,
                "mean": list(self.normalisation.mean), "std": list(self.normalisation.std), "extra": self.extra}
        save_safetensors(path, tensors, metadata={_META_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> "SyntheticSet":
        tensors, metadata = read_safetensors(path, "synthetic set")
        if _META_KEY not in metadata:
            raise ValueError(f"{path} is not a genforge synthetic set (no {_META_KEY!r} metadata)")
        meta = json.loads(metadata[_META_KEY])
        zca = ZCA.from_state(tensors) if "zca_matrix" in tensors else None
        return cls(images=tensors["images"], labels=tensors["labels"], method=meta["method"], ipc=meta["ipc"],
                   seed=meta["seed"], normalisation=Normalisation(tuple(meta["mean"]), tuple(meta["std"])),
                   soft_labels=tensors.get("soft_labels"), zca=zca, extra=meta.get("extra", {}))

    @classmethod
    def merge(cls, parts: list["SyntheticSet"]) -> "SyntheticSet":
        """Join the class shards distilled by several processes into one class-ordered set."""
        if not parts:
            raise ValueError("no synthetic-set parts to merge")
        first = parts[0]
        if any((p.method, p.ipc, p.seed) != (first.method, first.ipc, first.seed) for p in parts):
            raise ValueError("synthetic-set parts come from different runs (method, ipc or seed differ)")
        images = torch.cat([p.images for p in parts])
        labels = torch.cat([p.labels for p in parts])
        soft = torch.cat([p.soft_labels for p in parts]) if first.soft_labels is not None else None
        order = torch.argsort(labels, stable=True)
        return cls(images=images[order], labels=labels[order], method=first.method, ipc=first.ipc,
                   seed=first.seed, normalisation=first.normalisation,
                   soft_labels=None if soft is None else soft[order], zca=first.zca, extra=first.extra)


def initial_images(real: RealData, classes: list[int], ipc: int, init: str, seed: int) -> tuple[Tensor, Tensor]:
    """``ipc`` images per class: distinct random real ones (``"real"``) or N(0, 1) (``"noise"``).

    Each class draws from its own stream of ``seed``, so a subset of the classes gets the
    same images as the full run.
    """
    if init not in INITS:
        raise ValueError(f"unknown initialisation {init!r}; expected one of {INITS}")
    real.check_ipc(ipc, classes)
    labels = torch.tensor(classes).repeat_interleave(ipc)
    if init == "noise":
        images = [torch.randn((ipc, *real.image_shape), generator=stream(seed, c, INIT_STREAM)) for c in classes]
    else:
        images = [real.sample(c, ipc, stream(seed, c, INIT_STREAM)) for c in classes]
    return torch.cat(images).clone(), labels
