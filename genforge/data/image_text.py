"""Image-text folders: every image with a same-stem ``.txt`` caption beside it.

This is the layout of most Stable Diffusion fine-tuning folders (``photo_001.jpg`` +
``photo_001.txt``, in any sub-folder): the caption is the text file's content, stripped. Images
are read as in :mod:`genforge.data.folder` (shorter side resized to ``image_size``, center crop,
float32 in ``[-1, 1]``); files are taken in sorted path order. Items are ``(image, caption)``:
the caption stays a string, tokenized by the training method with its own tokenizer (a DataLoader
batch holds a list of strings).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from genforge.data.folder import square_transform
from genforge.data.transforms import uint8_to_signed

__all__ = ["ImageTextFolderDataset"]


class ImageTextFolderDataset(Dataset):
    """``(image (C, S, S) float32 in [-1, 1], caption str)`` for each image under ``root`` with a same-stem
    ``.txt`` caption; a ValueError naming the first image without one (and how many lack one).

    ``.captions`` lists the captions in item order.
    """

    def __init__(self, root: str | Path, image_size: int, channels: int = 3) -> None:
        self.transform = square_transform(image_size, channels)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image-text folder {str(self.root)!r} does not exist or is not a directory")
        self.files = sorted(f for f in self.root.rglob("*") if f.suffix.lower() in IMG_EXTENSIONS and f.is_file())
        if not self.files:
            raise FileNotFoundError(f"image-text folder {str(self.root)!r} holds no images with extensions "
                                    f"{IMG_EXTENSIONS}")
        uncaptioned = [f for f in self.files if not f.with_suffix(".txt").is_file()]
        if uncaptioned:
            raise ValueError(f"image-text folder {str(self.root)!r}: {len(uncaptioned)} of {len(self.files)} images "
                             f"have no caption, e.g. {str(uncaptioned[0])!r} needs "
                             f"{str(uncaptioned[0].with_suffix('.txt'))!r}")
        self.captions = [f.with_suffix(".txt").read_text(encoding="utf-8").strip() for f in self.files]
        self.image_size, self.channels, self.num_classes = image_size, channels, 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        with Image.open(self.files[i]) as image:
            return uint8_to_signed(self.transform(image)), self.captions[i]

    def __repr__(self) -> str:
        return f"ImageTextFolderDataset(root={str(self.root)!r}, n={len(self)}, image_size={self.image_size})"
