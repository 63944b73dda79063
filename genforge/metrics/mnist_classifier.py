"""A small CNN that recognises MNIST digits at 32x32; genforge's judge for MNIST-5k samples.

The MNIST counterpart of :class:`~genforge.metrics.digits_classifier.DigitsCNN` (the role
Inception-v3 plays for ImageNet, as in Salimans et al. 2016, arXiv:1606.03498): its
penultimate features feed FID/KID through torch-fidelity as ``"mnist-cnn"`` (see
:mod:`genforge.metrics.fidelity`) and its logits give classifier agreement.

Input: ``(B, C, H, W)`` in ``[-1, 1]``; RGB is turned grey and other sizes are bilinearly
resized to 32x32 inside :meth:`MNISTCNN.prepare`. It is trained on the MNIST-5k train split
(4,000 digits, never the test split) in both 32x32 layouts the loader makes, ``"pad"`` (28x28
digit centered, 2 px border) and ``"resize"`` (digit scaled to fill 32x32), with random
shifts of up to two pixels. Weights ship as ``weights/mnist_cnn.safetensors``;
``weights/mnist_cnn.json`` records how they were made and the test accuracy.

Retrain with ``python -m genforge.metrics.mnist_classifier --out PATH`` (seeded, one CPU
thread; the same machine and torch build give the same bits).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from genforge.core.io import atomic_write
from genforge.core.state_dict import load_state_dict_strict, read_state_dict
from genforge.data.mnist5k import MNIST5kDataset
from genforge.data.transforms import match_channels, resize_bilinear
from genforge.metrics.digits_classifier import LAYOUTS, check_layouts, fit_classifier, predict

INPUT_SIZE = 32
WEIGHTS_PATH = Path(__file__).parent / "weights" / "mnist_cnn.safetensors"


class MNISTCNN(nn.Module):
    """Three 3x3 conv stages (16, 32, 64 channels, each max-pooled by 2) and two linear
    layers; ``features`` is the 64-d penultimate layer."""

    num_classes = 10
    feature_dim = 64

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, self.num_classes)

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """Any ``(B, 1|3, H, W)`` image in [-1, 1] -> ``(B, 1, 32, 32)`` grey."""
        if x.dim() != 4 or x.shape[1] not in (1, 3) or not x.is_floating_point():
            raise ValueError("MNISTCNN expects float images (B, 1 or 3, H, W) in [-1, 1], "
                             f"got {x.dtype} {tuple(x.shape)}")
        return resize_bilinear(match_channels(x.float(), 1), INPUT_SIZE)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, 64)`` (after ReLU), used for FID/KID."""
        x = F.max_pool2d(F.relu(self.conv1(self.prepare(x))), 2)  # (B, 16, 16, 16)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 32, 8, 8)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # (B, 64, 4, 4)
        return F.relu(self.fc1(x.flatten(1)))  # (B, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, 10)``."""
        return self.head(self.features(x))


def load_mnist_classifier(path: str | Path | None = None) -> MNISTCNN:
    """Load MNISTCNN weights from a safetensors file (default: the shipped ones), in eval mode."""
    path = Path(path) if path is not None else WEIGHTS_PATH
    if not path.is_file():
        raise FileNotFoundError(f"MNIST classifier weights {str(path)!r} not found; train them with "
                                "`python -m genforge.metrics.mnist_classifier --out PATH`")
    model = MNISTCNN()
    load_state_dict_strict(model, read_state_dict(path, strip_prefixes=()), what=f"weights file {path}")
    return model.eval().requires_grad_(False)


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
    parser = argparse.ArgumentParser(description="Train the MNIST CNN used by genforge's metrics.")
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH, help="safetensors file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model = train_mnist_classifier(seed=args.seed, epochs=args.epochs)
    seconds = time.perf_counter() - start
    accuracy = {mode: round(mnist_test_accuracy(model, mode), 4) for mode in LAYOUTS}

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    facts = {
        "weights": args.out.name, "seed": args.seed, "epochs": args.epochs,
        "train_split": "mnist5k train (4000 images, genforge/data/mnist5k_split.json)",
        "input": "1x32x32 in [-1, 1]; layouts pad+resize, random shifts <= 2 px",
        "parameters": sum(p.numel() for p in model.parameters()),
        "test_accuracy": accuracy, "train_seconds": round(seconds, 1),
        "torch_version": torch.__version__,
        "command": f"python -m genforge.metrics.mnist_classifier --seed {args.seed} --epochs {args.epochs}",
    }
    args.out.with_suffix(".json").write_text(json.dumps(facts, indent=2) + "\n")
    print(json.dumps(facts, indent=2))


if __name__ == "__main__":
    main()
