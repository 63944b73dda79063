"""Image-folder datasets: ``root/<class_name>/<image files>``.

The layout and label rule (class folders sorted by name -> labels 0..K-1) are those of
``torchvision.datasets.ImageFolder``, which does the file walking here. Each image is
loaded with PIL, resized so its shorter side is ``image_size``, center-cropped to a square
(the ADM / guided-diffusion preprocessing, Dhariwal & Nichol 2021, arXiv:2105.05233, minus
its random flip) and mapped to float32 ``[-1, 1]``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from genforge.data.transforms import uint8_to_signed

_PIL_MODES = {1: "L", 3: "RGB"}


class _ConvertMode:
    """Picklable ``PIL.Image.convert`` step (DataLoader workers may pickle transforms)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image):
        return image.convert(self.mode)


def square_transform(image_size: int, channels: int) -> T.Compose:
    """PIL image -> uint8 ``(channels, image_size, image_size)``: shorter side resized (bicubic), center crop."""
    if channels not in _PIL_MODES:
        raise ValueError(f"channels={channels} is not supported; expected 1 or 3")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} must be a positive int")
    return T.Compose([_ConvertMode(_PIL_MODES[channels]),
                      T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                      T.CenterCrop(image_size), T.PILToTensor()])


def _check_root(root: Path) -> None:
    """Fail early, naming ``root``, when it is missing or holds no class folder with images."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder root {str(root)!r} does not exist or is not a "
                                "directory; expected root/<class_name>/<images>")
    classes = [d for d in root.iterdir() if d.is_dir()]
    if not classes:
        raise FileNotFoundError(f"image folder root {str(root)!r} has no class subfolders; "
                                "expected root/<class_name>/<images>")
    if not any(f.suffix.lower() in IMG_EXTENSIONS for d in classes for f in d.rglob("*")):
        raise FileNotFoundError(f"image folder root {str(root)!r} has class subfolders but no "
                                f"images with extensions {IMG_EXTENSIONS}")


class ImageFolderDataset(Dataset):
    """``(image, label)`` pairs from class subfolders, image ``(C, S, S)`` float32 in [-1, 1].

    ``.classes`` lists the folder names in label order; ``.num_classes`` is their count.
    """

    def __init__(self, root: str | Path, image_size: int, channels: int = 3) -> None:
        transform = square_transform(image_size, channels)
        self.root = Path(root)
        _check_root(self.root)
        self._folder = ImageFolder(str(self.root), transform=transform)
        self.classes = list(self._folder.classes)
        self.num_classes = len(self.classes)
        self.image_size, self.channels = image_size, channels

    def __len__(self) -> int:
        return len(self._folder)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self._folder[i]  # uint8 (C, S, S)
        return uint8_to_signed(image), int(label)

    def __repr__(self) -> str:
        return (f"ImageFolderDataset(root={str(self.root)!r}, n={len(self)}, "
                f"classes={self.num_classes}, image_size={self.image_size}, channels={self.channels})")
