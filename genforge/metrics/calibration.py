"""Calibration of a classifier: expected calibration error and the reliability diagram.

Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017,
arXiv 1706.04599, Sec. 2. A prediction's confidence is its top-label probability
p_hat_i = max_k p_ik. The confidences are sorted into M equal-width bins
B_m = ((m-1)/M, m/M], m = 1..M, and for each bin

    acc(B_m)  = 1/|B_m| sum_{i in B_m} 1[argmax_k p_ik = y_i]        (Eq. 2)
    conf(B_m) = 1/|B_m| sum_{i in B_m} p_hat_i                        (Eq. 3)

A perfectly calibrated model has acc(B_m) = conf(B_m) in every bin. The expected
calibration error is the bin-size-weighted gap (Eq. 5, with n samples):

    ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|

The reliability diagram (Fig. 1, bottom) plots acc(B_m) against conf(B_m) per bin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ReliabilityDiagram", "expected_calibration_error", "reliability_diagram"]


@dataclass
class ReliabilityDiagram:
    """Per-bin statistics; ``confidence`` and ``accuracy`` are NaN in empty bins.

    ``edges`` (M+1,) are the bin boundaries 0, 1/M, ..., 1; ``confidence``, ``accuracy`` (M,)
    float64 are conf(B_m) and acc(B_m); ``count`` (M,) int64 is |B_m|.
    """

    edges: torch.Tensor
    confidence: torch.Tensor
    accuracy: torch.Tensor
    count: torch.Tensor


def _is_probability(scores: torch.Tensor) -> bool:
    """Rows that are non-negative and sum to one are probabilities; anything else is logits."""
    sums = scores.sum(dim=1)
    return bool((scores >= 0).all() and torch.allclose(sums, torch.ones_like(sums), atol=1e-4))


def _top_label(probs_or_logits, labels, from_logits: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-label confidence p_hat_i (N,) float64 and correctness 1[y_hat_i = y_i] (N,) float64."""
    scores = torch.as_tensor(probs_or_logits).detach().to("cpu", torch.float64)
    labels = torch.as_tensor(labels).detach().to("cpu")
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"expected scores of shape (N, C) with C >= 2 classes, got {tuple(scores.shape)}")
    if labels.shape != scores.shape[:1] or labels.dtype.is_floating_point:
        raise ValueError(f"expected integer labels of shape ({scores.shape[0]},), got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    if scores.shape[0] == 0:
        raise ValueError("cannot measure calibration on zero samples")
    if labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise ValueError(f"labels must lie in [0, {scores.shape[1] - 1}], got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    if from_logits is None:
        from_logits = not _is_probability(scores)
    probs = scores.softmax(dim=1) if from_logits else scores
    confidence, predicted = probs.max(dim=1)
    return confidence, (predicted == labels).to(torch.float64)


def reliability_diagram(probs_or_logits, labels, n_bins: int = 15, *,
                        from_logits: bool | None = None) -> ReliabilityDiagram:
    """Per-bin (confidence, accuracy, count) of top-label predictions in M = ``n_bins`` bins.

    ``probs_or_logits`` (N, C): class probabilities or logits; ``from_logits=None`` treats
    rows that are non-negative and sum to one as probabilities and applies a softmax
    otherwise. ``labels`` (N,) integer classes.
    """
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    confidence, correct = _top_label(probs_or_logits, labels, from_logits)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # bucketize(right=False) puts c in bin m with edges[m] < c <= edges[m+1]: B_m = (lo, hi].
    bins = torch.bucketize(confidence, edges[1:-1], right=False)
    count = torch.bincount(bins, minlength=n_bins)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, confidence)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    size = count.to(torch.float64)
    return ReliabilityDiagram(edges=edges, confidence=conf_sum / size, accuracy=acc_sum / size, count=count)


def expected_calibration_error(probs_or_logits, labels, n_bins: int = 15, *,
                               from_logits: bool | None = None) -> float:
    """ECE = sum_m |B_m|/n |acc(B_m) - conf(B_m)| (Guo et al. 2017, Eq. 5), in [0, 1].

    Arguments as for :func:`reliability_diagram`.
    """
    diagram = reliability_diagram(probs_or_logits, labels, n_bins, from_logits=from_logits)
    filled = diagram.count > 0
    weight = diagram.count[filled].to(torch.float64) / diagram.count.sum()
    gap = (diagram.accuracy[filled] - diagram.confidence[filled]).abs()
    return float((weight * gap).sum())
