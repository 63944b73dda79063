"""A small CNN that recognises MNIST digits at 32x32; genforge's judge for MNIST-5k samples.

The MNIST counterpart of :class:`~genforge.metrics.digits_classifier.DigitsCNN` (the role
Inception-v3 plays for ImageNet, as in Salimans et al. 2016, arXiv:1606.03498): its
penultimate features feed FID/KID through torch-fidelity as ``"mnist-cnn"`` (see
:mod:`genforge.metrics.fidelity`) and its logits give classifier agreement.

Input: ``(B, C, H, W)`` in ``[-1, 1]``; RGB is turned grey and other sizes are bilinearly
resized to 32x32 inside ``MNISTCNN.prepare``. It is trained on the MNIST-5k train split
(4,000 digits, never the test split) in both 32x32 layouts the loader makes, ``"pad"`` (28x28
digit centered, 2 px border) and ``"resize"`` (digit scaled to fill 32x32), with random
shifts of up to two pixels. Weights ship as ``weights/mnist_cnn.safetensors``;
``weights/mnist_cnn.json`` records how they were made and the test accuracy.

Retrain with ``python -m genforge.metrics.mnist_classifier --out PATH`` (seeded, one CPU
thread; the same machine and torch build give the same bits).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from genforge.data.mnist5k import MNIST5kDataset
from genforge.metrics.digits_classifier import (
    LAYOUTS,
    JudgeCNN,
    check_layouts,
    fit_classifier,
    judge_main,
    load_judge,
    predict,
)

INPUT_SIZE = 32
WEIGHTS_PATH = Path(__file__).parent / "weights" / "mnist_cnn.safetensors"


class MNISTCNN(JudgeCNN):
    """Three 3x3 conv stages (16, 32, 64 channels, each max-pooled by 2) and two linear
    layers; ``features`` is the 64-d penultimate layer."""

    input_size = INPUT_SIZE

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, self.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, 64)`` (after ReLU), used for FID/KID."""
        x = F.max_pool2d(F.relu(self.conv1(self.prepare(x))), 2)  # (B, 16, 16, 16)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 32, 8, 8)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # (B, 64, 4, 4)
        return F.relu(self.fc1(x.flatten(1)))  # (B, 64)


def load_mnist_classifier(path: str | Path | None = None) -> MNISTCNN:
    """Load MNISTCNN weights from a safetensors file (default: the shipped ones), in eval mode."""
    return load_judge(MNISTCNN, path if path is not None else WEIGHTS_PATH, "genforge.metrics.mnist_classifier")


def mnist_test_accuracy(classifier: nn.Module | None = None, resize: str = "pad") -> float:
    """Accuracy on the MNIST-5k test split (1,000 digits) at 32x32 in the layout ``resize``."""
    classifier = classifier if classifier is not None else load_mnist_classifier()
    test = MNIST5kDataset("test", image_size=INPUT_SIZE, resize=resize)
    return (predict(classifier, test.images) == test.labels).float().mean().item()


def train_mnist_classifier(seed: int = 0, epochs: int = 20, batch_size: int = 64, lr: float = 3e-3,
                           layouts: tuple[str, ...] = LAYOUTS, max_shift: int = 2,
                           num_threads: int = 1) -> MNISTCNN:
    """Train MNISTCNN on the MNIST-5k train split; deterministic for a given ``seed``."""
    check_layouts(layouts)
    train = [MNIST5kDataset("train", image_size=INPUT_SIZE, resize=mode) for mode in layouts]
    views = torch.stack([d.images for d in train])  # (L, 4000, 1, 32, 32)
    torch.manual_seed(seed)
    return fit_classifier(MNISTCNN(), views, train[0].labels, seed=seed, epochs=epochs,
                          batch_size=batch_size, lr=lr, max_shift=max_shift, num_threads=num_threads)


def main(argv: list[str] | None = None) -> None:
    judge_main(argv, module="genforge.metrics.mnist_classifier", what="MNIST CNN", default_out=WEIGHTS_PATH,
               default_epochs=20, train=train_mnist_classifier, accuracy=mnist_test_accuracy,
               train_split="mnist5k train (4000 images, genforge/data/mnist5k_split.json)",
               input_layout="1x32x32 in [-1, 1]; layouts pad+resize, random shifts <= 2 px")


if __name__ == "__main__":
    main()
