"""A small CNN that recognises the bundled digits; genforge's judge for digit samples.

It plays, for the 8x8 scikit-learn digits, the role Inception-v3 plays for ImageNet-like
images: its penultimate features feed FID/KID through torch-fidelity (see
:mod:`genforge.metrics.fidelity`) and its logits give classifier agreement for
class-conditional samples (see :mod:`genforge.metrics.agreement`), as done with
domain-specific classifiers for MNIST-like data since Salimans et al. 2016 (arXiv:1606.03498).

Input: ``(B, C, H, W)`` in ``[-1, 1]``. RGB is turned grey (BT.601 luma) and other sizes are
bilinearly resized to 16x16 inside :meth:`DigitsCNN.forward`. Training uses the 16x16
``"pad"`` layout (8x8 digit centered on -1 background) and, for half of the samples, the
``"resize"`` layout (digit upscaled to fill 16x16), each with random shifts of up to one
pixel, so the classifier judges both layouts the data loader makes and 8x8 inputs (which
``forward`` upsamples, i.e. the resize layout). Its weights ship as
``weights/digits_cnn.safetensors``; ``weights/digits_cnn.json`` records how they were made.

Retrain with ``python -m genforge.metrics.digits_classifier --out PATH`` (seeded; the same
machine and torch build give the same bits).
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
from genforge.data.digits import DigitsDataset
from genforge.data.transforms import match_channels, resize_bilinear

INPUT_SIZE = 16
WEIGHTS_PATH = Path(__file__).parent / "weights" / "digits_cnn.safetensors"
LAYOUTS = ("pad", "resize")


class JudgeCNN(nn.Module):
    """What genforge's judges share: grey ``input_size`` inputs, a 64-d ``features`` layer
    (subclasses define it) and a linear ``head`` to 10 class logits."""

    num_classes = 10
    feature_dim = 64
    input_size: int

    @classmethod
    def prepare(cls, x: torch.Tensor) -> torch.Tensor:
        """Any ``(B, 1|3, H, W)`` image in [-1, 1] -> ``(B, 1, S, S)`` grey at the judge's size."""
        if x.dim() != 4 or x.shape[1] not in (1, 3) or not x.is_floating_point():
            raise ValueError(f"{cls.__name__} expects float images (B, 1 or 3, H, W) in [-1, 1], "
                             f"got {x.dtype} {tuple(x.shape)}")
        return resize_bilinear(match_channels(x.float(), 1), cls.input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, 10)``."""
        return self.head(self.features(x))


def load_judge(cls: type[JudgeCNN], path: str | Path, module: str) -> JudgeCNN:
    """A ``cls`` judge with the weights of the safetensors file ``path``, frozen in eval mode;
    a missing file names the command (``python -m MODULE``) that trains it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{cls.__name__} weights {str(path)!r} not found; train them with "
                                f"`python -m {module} --out PATH`")
    model = cls()
    load_state_dict_strict(model, read_state_dict(path, strip_prefixes=()), what=f"weights file {path}")
    return model.eval().requires_grad_(False)


class DigitsCNN(JudgeCNN):
    """Three 3x3 conv stages and two linear layers; ``features`` is the 64-d penultimate layer."""

    input_size = INPUT_SIZE

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 48, 3, padding=1)
        self.fc1 = nn.Linear(48 * 2 * 2, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, self.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, 64)`` (after ReLU), used for FID/KID."""
        x = F.relu(self.conv1(self.prepare(x)))  # (B, 16, 16, 16)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 32, 8, 8)
        x = F.max_pool2d(F.relu(self.conv3(x)), 4)  # (B, 48, 2, 2)
        return F.relu(self.fc1(x.flatten(1)))  # (B, 64)


def load_digits_classifier(path: str | Path | None = None) -> DigitsCNN:
    """Load DigitsCNN weights from a safetensors file (default: the shipped ones), in eval mode."""
    return load_judge(DigitsCNN, path if path is not None else WEIGHTS_PATH, "genforge.metrics.digits_classifier")


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each ``(B, 1, S, S)`` image by up to ``max_shift`` px per axis, filling with -1."""
    b, _, s, _ = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b, 1), generator=generator)
    rows = (dy + torch.arange(s))[:, :, None]  # (B, S, 1)
    cols = (dx + torch.arange(s))[:, None, :]  # (B, 1, S)
    return padded[torch.arange(b)[:, None, None], 0, rows, cols][:, None]


@torch.no_grad()
def predict(classifier: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted classes ``(N,)`` for ``(N, C, H, W)`` images, in batches."""
    return torch.cat([classifier(chunk).argmax(dim=1) for chunk in images.split(batch_size)])


def digits_test_accuracy(classifier: nn.Module | None = None, resize: str = "pad") -> float:
    """Accuracy on the digits test split at 16x16 in the layout ``resize`` ("pad" or "resize")."""
    classifier = classifier if classifier is not None else load_digits_classifier()
    test = DigitsDataset("test", image_size=INPUT_SIZE, resize=resize)
    return (predict(classifier, test.images) == test.labels).float().mean().item()


def fit_classifier(model: nn.Module, views: torch.Tensor, labels: torch.Tensor, *, seed: int,
                   epochs: int, batch_size: int, lr: float, max_shift: int,
                   num_threads: int = 1) -> nn.Module:
    """Train a judge on ``views`` ``(L, N, 1, S, S)`` (one image per layout per sample).

    Each step draws every sample in one of the ``L`` layouts (uniformly) and shifts it by up
    to ``max_shift`` px; AdamW with a cosine learning-rate decay. Runs on CPU with
    ``num_threads`` threads (restored afterwards) so results do not depend on core count;
    deterministic for a given ``seed`` (``model`` must be built after ``torch.manual_seed``).
    """
    n = len(labels)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        generator = torch.Generator().manual_seed(seed)
        steps = epochs * ((n + batch_size - 1) // batch_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(n, generator=generator).split(batch_size):
                layout = torch.randint(0, len(views), (len(idx),), generator=generator)
                x = random_shift(views[layout, idx], generator, max_shift)
                loss = F.cross_entropy(model(x), labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    finally:
        torch.set_num_threads(previous_threads)
    return model.eval().requires_grad_(False)


def check_layouts(layouts: tuple[str, ...]) -> None:
    """ValueError unless ``layouts`` is a non-empty subset of ``("pad", "resize")``."""
    unknown = set(layouts) - set(LAYOUTS)
    if not layouts or unknown:
        raise ValueError(f"layouts={layouts!r} must be a non-empty subset of {LAYOUTS}")


def train_digits_classifier(seed: int = 0, epochs: int = 40, batch_size: int = 64, lr: float = 3e-3,
                            layouts: tuple[str, ...] = LAYOUTS, max_shift: int = 1,
                            num_threads: int = 1) -> DigitsCNN:
    """Train DigitsCNN on the digits train split with :func:`fit_classifier`; deterministic
    for a given ``seed``."""
    check_layouts(layouts)
    train = [DigitsDataset("train", image_size=INPUT_SIZE, resize=mode) for mode in layouts]
    views = torch.stack([d.images for d in train])  # (L, N, 1, 16, 16)
    torch.manual_seed(seed)
    return fit_classifier(DigitsCNN(), views, train[0].labels, seed=seed, epochs=epochs,
                          batch_size=batch_size, lr=lr, max_shift=max_shift, num_threads=num_threads)


def judge_main(argv: list[str] | None, *, module: str, what: str, default_out: Path,
               default_epochs: int, train, accuracy, train_split: str, input_layout: str) -> None:
    """The command that trains a judge: ``python -m MODULE [--out FILE] [--seed] [--epochs]``.

    ``train(seed=, epochs=)`` returns the model, ``accuracy(model, layout)`` its test accuracy;
    the weights go to ``--out`` (safetensors) and the facts of the run beside them (``.json``).
    """
    parser = argparse.ArgumentParser(description=f"Train the {what} used by genforge's metrics.")
    parser.add_argument("--out", type=Path, default=default_out, help="safetensors file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=default_epochs)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model = train(seed=args.seed, epochs=args.epochs)
    seconds = time.perf_counter() - start
    test_accuracy = {mode: round(accuracy(model, mode), 4) for mode in LAYOUTS}

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    facts = {
        "weights": args.out.name, "seed": args.seed, "epochs": args.epochs,
        "train_split": train_split, "input": input_layout,
        "parameters": sum(p.numel() for p in model.parameters()),
        "test_accuracy": test_accuracy, "train_seconds": round(seconds, 1),
        "torch_version": torch.__version__,
        "command": f"python -m {module} --seed {args.seed} --epochs {args.epochs}",
    }
    args.out.with_suffix(".json").write_text(json.dumps(facts, indent=2) + "\n")
    print(json.dumps(facts, indent=2))


def main(argv: list[str] | None = None) -> None:
    judge_main(argv, module="genforge.metrics.digits_classifier", what="digits CNN", default_out=WEIGHTS_PATH,
               default_epochs=40, train=train_digits_classifier, accuracy=digits_test_accuracy,
               train_split="digits train (1437 images, genforge/data/digits_split.json)",
               input_layout="1x16x16 in [-1, 1]; layouts pad+resize, random shifts <= 1 px")


if __name__ == "__main__":
    main()
