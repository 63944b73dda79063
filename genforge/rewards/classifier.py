"""A classifier's log-probability of the wanted class as a ReNO reward (arXiv 2406.04312).

For genforge's class-conditional pipelines the "prompt" is a class label and the reward is
score = log p(y | x) under a frozen classifier (by default the shipped digits CNN,
:mod:`genforge.metrics.digits_classifier`), so L = -log p(y | x), the cross-entropy. Images in
[0, 1] are mapped to the classifier's [-1, 1]; the classifier resizes them itself. This reward
is ours: ReNO's official rewards are the text-image ones of :mod:`genforge.rewards.clip`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from genforge.rewards.base import Reward, register_reward

__all__ = ["ClassifierReward"]


class ClassifierReward(Reward):
    """score = log softmax(classifier(2x - 1))[y]; ``prompts`` are class labels (B,) or one int."""

    offset = 0.0

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__(image_size=None, mean=None, std=None)
        self.classifier = classifier
        self.freeze()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"ClassifierReward expects images (B, 1 or 3, H, W) in [0, 1], got {tuple(images.shape)}")
        return images.to(self.device, self.dtype) * 2 - 1

    def score_inputs(self, pixels: torch.Tensor, prompts) -> torch.Tensor:
        return self.classifier(pixels).log_softmax(-1).gather(1, prompts[:, None]).squeeze(1)

    def score(self, images: torch.Tensor, prompts) -> torch.Tensor:
        labels = torch.as_tensor(prompts, dtype=torch.long, device=self.device).reshape(-1)
        labels = labels.expand(images.shape[0]) if labels.numel() == 1 else labels
        classes = getattr(self.classifier, "num_classes", None)
        in_range = classes is None or 0 <= int(labels.min()) <= int(labels.max()) < classes
        if labels.shape != (images.shape[0],) or not in_range:
            raise ValueError(f"expected one class label or {images.shape[0]} labels in [0, {classes}), "
                             f"got {labels.tolist()}")
        return self.score_inputs(self.preprocess(images), labels)


def load_classifier(path=None) -> ClassifierReward:
    """The digits-CNN reward: weights from the safetensors file ``path`` (default: the shipped ones)."""
    from genforge.metrics.digits_classifier import load_digits_classifier

    return ClassifierReward(load_digits_classifier(path))


register_reward("digits-cnn", load_classifier)
