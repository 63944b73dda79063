"""Classifier agreement: how often a pretrained classifier recognises the conditioning class.

For class-conditional generators this is the "classification accuracy score"-style check
used alongside FID (e.g. the classifier-based evaluation of conditional GANs, Shmelkov et al.
2018, arXiv:1807.09499; Ravuri & Vinyals 2019, arXiv:1905.10887): draw samples for label
``y`` and count the share that the judge classifies as ``y``. On the bundled digits the judge
is the shipped :class:`~genforge.metrics.digits_classifier.DigitsCNN`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from genforge.metrics.digits_classifier import load_digits_classifier, predict


def _check(images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if labels.dim() != 1 or len(labels) != len(images):
        raise ValueError(f"labels must be ({len(images)},) to match the images, got {tuple(labels.shape)}")
    if len(images) == 0:
        raise ValueError("classifier agreement needs at least one image")


def _predictions(images: torch.Tensor, labels: torch.Tensor,
                 classifier: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    _check(images, labels)
    classifier = classifier if classifier is not None else load_digits_classifier()
    num_classes = getattr(classifier, "num_classes", None)
    if num_classes is not None and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels span {int(labels.min())}..{int(labels.max())}, but the judge "
                         f"knows classes 0..{num_classes - 1}: agreement with a class it cannot "
                         f"predict would be 0 by construction")
    device = next(classifier.parameters()).device
    return predict(classifier, images.to(device)).cpu(), labels.cpu().long()


def classifier_agreement(images: torch.Tensor, labels: torch.Tensor,
                         classifier: nn.Module | None = None) -> float:
    """Share of ``images`` (B, C, H, W) in [-1, 1] that ``classifier`` assigns to ``labels``.

    ``classifier=None`` uses the shipped digits CNN.
    """
    predicted, labels = _predictions(images, labels, classifier)
    return (predicted == labels).float().mean().item()


def per_class_agreement(images: torch.Tensor, labels: torch.Tensor,
                        classifier: nn.Module | None = None, num_classes: int = 10) -> torch.Tensor:
    """Agreement per conditioning class, ``(num_classes,)``; NaN for classes with no sample."""
    predicted, labels = _predictions(images, labels, classifier)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    hits = torch.bincount(labels[predicted == labels], minlength=num_classes).float()
    counts = torch.bincount(labels, minlength=num_classes).float()
    return torch.where(counts > 0, hits / counts.clamp_min(1), torch.nan)
