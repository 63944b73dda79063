"""The field's evaluation protocol: train fresh networks on the synthetic set, test on real data.

Following VICO's ``evaluate_synset`` (Zhao & Bilen, ``VICO-UoE/DatasetCondensation``
utils.py) exactly: a freshly initialised network per run, SGD (momentum 0.9, weight decay
5e-4, lr 0.01), ``for ep in range(E + 1)`` shuffled passes over the synthetic set with
E = ``epochs`` (VICO's ``epoch_eval_train``), so E + 1 epochs are run; after the pass with
0-based index E // 2 + 1 (``lr_schedule = [E // 2 + 1]``) the lr is multiplied by 0.1 and the
optimiser re-created (its momentum dropped). DSA on every training batch with independent
per-image parameters, and the accuracy of the **final** network on the full real test set
without augmentation (no checkpoint is selected on the test set). ``num_eval`` networks
give mean ± std.

Soft labels: ``soft="teacher"`` relabels every augmented, mixed-up batch (mixup α 0.8)
online with the unperturbed teacher in eval mode, as DWA's ``validation_cifar.py`` relabels
(online, after mixup), but inside VICO's protocol above and with our choice of loss, Hinton's
T²·KL(softmax(t/T) || softmax(s/T)) at T = ``temperature`` (4). DWA's own CIFAR evaluation
differs, and we do not reproduce it: plain ``KLDivLoss(batchmean)`` at T = 30 with no T²
factor, AdamW (lr 1e-3, weight decay 0.01) with a cosine schedule over 200 epochs (400 in
its run script), RandomCrop + flip instead of DSA, batch 128, the teacher left in train mode
(it forgets ``eval()``), and the best test accuracy over epochs reported.
``soft="stored"`` uses the set's stored soft labels instead (no teacher in memory, no
mixup), with the same loss. The student never sees the hard labels in either mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from genforge.core.rng import symmetric_beta
from genforge.distill.data import RealData
from genforge.distill.dsa import DSA, check_strategy
from genforge.distill.networks import ConvNetConfig, build_convnet
from genforge.distill.seeding import stream, stream_seed
from genforge.distill.synthetic import SyntheticSet

__all__ = ["EvalOptions", "EvalResult", "SOFT_MODES", "evaluate_synthetic", "accuracy_on", "train_network"]

SOFT_MODES = ("none", "teacher", "stored")


@dataclass
class EvalOptions:
    """The train-on-synthetic recipe (defaults: the spec's digits protocol).

    ``epochs`` is VICO's E (``epoch_eval_train``): E + 1 passes are run.
    """

    num_eval: int = 5
    epochs: int = 300
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa_strategy: str = "color_crop_cutout_scale_rotate"
    net_width: int = 32
    net_depth: int = 2
    net_norm: str = "instancenorm"
    soft: str = "none"
    temperature: float = 4.0
    mixup_alpha: float = 0.8

    def check(self) -> None:
        if self.num_eval < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("num_eval, epochs and batch_size must be positive")
        if self.soft not in SOFT_MODES:
            raise ValueError(f"unknown soft-label mode {self.soft!r}; expected one of {SOFT_MODES}")
        check_strategy(self.dsa_strategy)
        self.net_config()

    def net_config(self) -> ConvNetConfig:
        return ConvNetConfig(width=self.net_width, depth=self.net_depth, norm=self.net_norm)


@dataclass
class EvalResult:
    accuracies: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.accuracies))

    def __str__(self) -> str:
        return f"{100 * self.mean:.2f} ± {100 * self.std:.2f}% over {len(self.accuracies)} networks"


def _kd_loss(student_logits: Tensor, target_probs: Tensor, temperature: float) -> Tensor:
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_p, target_probs, reduction="batchmean") * temperature ** 2


def train_network(net: nn.Module, images: Tensor, labels: Tensor, options: EvalOptions, generator: torch.Generator,
                  *, soft_targets: Tensor | None = None, teacher: nn.Module | None = None) -> nn.Module:
    """Train ``net`` on ``(images, labels)`` with the evaluation recipe; returns it in eval mode.

    With ``teacher``, targets are the teacher's tempered probabilities on each augmented,
    mixed-up batch; with ``soft_targets`` (``(N, K)`` probabilities) they are those; else CE
    on the hard labels.
    """
    dsa = DSA(options.dsa_strategy)
    n = len(images)
    lr = options.lr

    def make_optimizer():
        return torch.optim.SGD(net.parameters(), lr=lr, momentum=options.momentum, weight_decay=options.weight_decay)

    optimizer = make_optimizer()
    if teacher is not None:
        teacher.eval()
    net.train()
    for epoch in range(options.epochs + 1):  # VICO: for ep in range(Epoch + 1)
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, options.batch_size):
            idx = order[start:start + options.batch_size]
            x = dsa(images[idx], generator=generator)
            if teacher is not None:
                lam = symmetric_beta(options.mixup_alpha, generator)
                partner = torch.randperm(len(idx), generator=generator)
                x = lam * x + (1 - lam) * x[partner]
                with torch.no_grad():
                    target = F.softmax(teacher(x) / options.temperature, dim=1)
                loss = _kd_loss(net(x), target, options.temperature)
            elif soft_targets is not None:
                loss = _kd_loss(net(x), soft_targets[idx], options.temperature)
            else:
                loss = F.cross_entropy(net(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epoch == options.epochs // 2 + 1:  # VICO: lr_schedule = [Epoch // 2 + 1]
            lr *= 0.1
            optimizer = make_optimizer()
    return net.eval()


@torch.no_grad()
def accuracy_on(net: nn.Module, test: RealData, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``net`` on every test image, without augmentation."""
    net.eval()
    correct = 0
    for start in range(0, len(test.labels), batch_size):
        logits = net(test.images[start:start + batch_size])
        correct += int((logits.argmax(1) == test.labels[start:start + batch_size]).sum())
    return correct / len(test.labels)


def evaluate_synthetic(images: Tensor | SyntheticSet, test: RealData, options: EvalOptions | None = None, *,
                       labels: Tensor | None = None, seed: int = 0, teacher: nn.Module | None = None,
                       progress: bool = True, desc: str = "evaluating") -> EvalResult:
    """Accuracies of ``options.num_eval`` fresh networks trained on a synthetic set, tested on ``test``.

    ``images`` is a :class:`SyntheticSet` or an image tensor with its ``labels``; ``options``
    defaults to the spec's digits protocol (:class:`EvalOptions`).
    """
    options = options or EvalOptions()
    options.check()
    soft_targets = None
    if isinstance(images, SyntheticSet):
        synthetic, images = images, images.images
        labels = synthetic.labels
        if options.soft == "stored":
            if synthetic.soft_labels is None:
                raise ValueError(f"soft='stored' but the {synthetic.method} set carries no soft labels")
            soft_targets = synthetic.soft_labels
    elif options.soft == "stored":
        raise ValueError("soft='stored' needs a SyntheticSet with soft labels")
    elif labels is None:
        raise ValueError("evaluate_synthetic needs labels= for an image tensor (a SyntheticSet carries its own)")
    if options.soft == "teacher" and teacher is None:
        raise ValueError("soft='teacher' needs the teacher network")
    if images.shape[1:] != test.images.shape[1:]:
        raise ValueError(f"synthetic images {tuple(images.shape[1:])} do not match the test images "
                         f"{tuple(test.images.shape[1:])}")
    channels, size = images.shape[1], images.shape[2]
    result = EvalResult()
    for k in tqdm(range(options.num_eval), desc=desc, disable=not progress):
        net = build_convnet(channels, test.num_classes, size, width=options.net_width, depth=options.net_depth,
                            norm=options.net_norm, seed=stream_seed(seed, k, 1 << 21))
        train_network(net, images.detach(), labels, options, stream(seed, k, 1 << 22), soft_targets=soft_targets,
                      teacher=teacher if options.soft == "teacher" else None)
        result.accuracies.append(accuracy_on(net, test))
    return result
