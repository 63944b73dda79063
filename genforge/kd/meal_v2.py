"""MEAL V2: ensemble distillation with a jointly trained discriminator, no hard labels.

Shen & Savvides, "MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1 Accuracy on ImageNet
without Tricks", arXiv 2009.08453 (official code: szq0214/MEAL-V2).

For a batch x of size B, frozen teachers give z_k = f_k(x) and the student gives z_S:

- ensemble target        p_T  = (1/K) sum_k softmax(z_k)        (``TeacherEnsemble``)
- discriminator "real"   z̄_T  = (1/K) sum_k z_k
- similarity loss        L_KD = mean_b( -sum_c p_T log softmax(z_S) )  (``soft_cross_entropy``)
- discriminator loss     L_D  = BCEWithLogits(D([z_S; z̄_T]), [[1,0]]*B + [[0,1]]*B)
- total                  L    = L_KD + L_D

D is three 1x1 convolutions C -> C//K -> C//K^2 -> 2 (1000 -> 125 -> 15 -> 2 with K = 8, as in
the official train.py), with a ReLU after every layer, the last included (an official quirk,
kept by default through ``relu_last=True``). There is no gradient reversal and no alternating
step: one backward pass and one SGD step (weight decay 0) update the student and D together,
so the student also lowers L_D and D acts as a regulariser. Hard labels never enter the loss.

The official per-epoch LR setter overwrites every parameter group, so D ends up following the
student's LR (MEAL-V2 issue #9). ``meal_v2_param_groups`` keeps D in its own group with its own
LR; ``follow_student_lr=True`` reproduces the official behaviour.

The ``meal_v2`` training Method (a :class:`~genforge.kd.hinton.TeacherMethod`: the student and
its frozen teachers as for ``kd``) trains :class:`MealV2Model` (student + discriminator, so the
discriminator's state is checkpointed and resumes with the run); only the student is evaluated
and saved. Recipe keys: ``d_lr`` (1e-4, the discriminator's own parameter group),
``follow_student_lr`` (false; true reproduces issue #9), ``channel_divisor`` (K, 8 as the
official train.py; small class counts need a smaller K), ``relu_last`` (true, the official
quirk) and ``update``: ``joint`` (the official update: one backward pass of L_KD + L_D, so the
student also lowers L_D and the discriminator acts as a regulariser) or ``adversarial`` (the
student receives -dL_D/dz_S through a gradient reversal, the GAN reading of the paper's text).
Weight decay is 0 for both groups, as the official optimiser; start the student from a
checkpoint with ``pretrained_file`` (the paper's initialisation). Use ``train.optimizer: sgd``
and ``train.lr_milestones`` for the official regime.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genforge.config import ConfigError
from genforge.kd.hinton import TeacherMethod, check_number
from genforge.kd.losses import soft_cross_entropy
from genforge.train import register_method

__all__ = ["MealV2Discriminator", "MealV2Loss", "MealV2Method", "MealV2Model", "discriminator_batch",
           "meal_v2_loss", "meal_v2_param_groups"]


class MealV2Discriminator(nn.Module):
    """Three 1x1 convolutions on a logit vector: C -> C//K -> C//K^2 -> 2.

    Args:
        num_classes: C, the length of the logit vectors it judges.
        channel_divisor: K (8 in the official train.py, 2 in the official class default).
        relu_last: apply ReLU to the final 2-channel output too (the official quirk).
    """

    def __init__(
        self, num_classes: int, channel_divisor: int = 8, relu_last: bool = True
    ) -> None:
        super().__init__()
        hidden1 = num_classes // channel_divisor
        hidden2 = hidden1 // channel_divisor
        if channel_divisor < 1 or hidden2 < 1:
            raise ValueError(
                f"num_classes={num_classes} with channel_divisor={channel_divisor} gives hidden "
                f"widths {hidden1} -> {hidden2}; both must be at least 1"
            )
        self.num_classes = num_classes
        self.relu_last = relu_last
        self.conv1 = nn.Conv2d(num_classes, hidden1, kernel_size=1)
        self.conv2 = nn.Conv2d(hidden1, hidden2, kernel_size=1)
        self.conv3 = nn.Conv2d(hidden2, 2, kernel_size=1)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, C) logits -> (N, 2) discriminator logits."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"discriminator expects logits of shape (N, {self.num_classes}), "
                f"got {tuple(logits.shape)}"
            )
        h = logits[:, :, None, None]  # (N, C, 1, 1)
        h = F.relu(self.conv1(h))
        h = F.relu(self.conv2(h))
        h = self.conv3(h)
        if self.relu_last:
            h = F.relu(h)
        return h.flatten(1)  # (N, 2)


def discriminator_batch(
    student_logits: torch.Tensor, ensemble_mean_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [z_S; z̄_T] (2B, C) and targets (2B, 2): [1, 0] for the student half, then [0, 1].

    The student half keeps its gradient (joint training); the teacher half is detached.
    """
    if student_logits.shape != ensemble_mean_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and ensemble_mean_logits "
            f"{tuple(ensemble_mean_logits.shape)} must have the same shape"
        )
    batch = student_logits.shape[0]
    inputs = torch.cat(
        [student_logits, ensemble_mean_logits.detach().to(student_logits.dtype)]
    )
    student_target = torch.tensor([1.0, 0.0], device=student_logits.device).expand(
        batch, 2
    )
    teacher_target = torch.tensor([0.0, 1.0], device=student_logits.device).expand(
        batch, 2
    )
    return inputs, torch.cat([student_target, teacher_target])


@dataclass
class MealV2Loss:
    """L = L_KD + L_D and its parts; ``d_output``/``d_target`` are (2B, 2), student half first."""

    loss: torch.Tensor
    kd_loss: torch.Tensor
    d_loss: torch.Tensor
    d_output: torch.Tensor
    d_target: torch.Tensor


class _GradientReversal(torch.autograd.Function):
    """Identity forward, negated gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


def meal_v2_loss(
    student_logits: torch.Tensor,
    ensemble_probs: torch.Tensor,
    ensemble_mean_logits: torch.Tensor,
    discriminator: nn.Module,
    adversarial: bool = False,
) -> MealV2Loss:
    """The MEAL V2 training loss. It takes no labels: hard labels never enter it.

    ``adversarial=True`` passes the student half to the discriminator through a gradient
    reversal, so the student receives -dL_D/dz_S (it learns to fool D) while D still minimises
    L_D; the default is the official joint update, where both minimise L_D.
    """
    kd = soft_cross_entropy(student_logits, ensemble_probs.detach())
    judged = _GradientReversal.apply(student_logits) if adversarial else student_logits
    d_inputs, d_target = discriminator_batch(judged, ensemble_mean_logits)
    d_output = discriminator(d_inputs)
    d = F.binary_cross_entropy_with_logits(d_output.float(), d_target)
    return MealV2Loss(
        loss=kd + d, kd_loss=kd, d_loss=d, d_output=d_output, d_target=d_target
    )


def meal_v2_param_groups(
    student: nn.Module,
    discriminator: nn.Module,
    lr: float,
    d_lr: float = 1e-4,
    follow_student_lr: bool = False,
) -> list[dict]:
    """Two SGD parameter groups, student then discriminator, both with weight_decay 0.

    ``follow_student_lr=True`` gives the discriminator the student's LR, which is what the
    official code ends up doing once its LR setter has run (issue #9). Use the groups with
    ``torch.optim.SGD(groups, lr=lr, momentum=0.9)``; an LR scheduler then scales each group
    from its own initial LR.
    """
    for name, value in (("lr", lr), ("d_lr", d_lr)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
    student_params = [p for p in student.parameters() if p.requires_grad]
    d_params = [p for p in discriminator.parameters() if p.requires_grad]
    if not student_params or not d_params:
        raise ValueError(
            "both the student and the discriminator need trainable parameters"
        )
    return [
        {"params": student_params, "lr": lr, "weight_decay": 0.0, "name": "student"},
        {
            "params": d_params,
            "lr": lr if follow_student_lr else d_lr,
            "weight_decay": 0.0,
            "name": "discriminator",
        },
    ]


# ----------------------------------------------------------------------------- the training Method


class MealV2Model(nn.Module):
    """The student and MEAL V2's discriminator, trained (and checkpointed) together.

    ``forward`` is the student's, so evaluation sees only the student.
    """

    def __init__(self, student: nn.Module, discriminator: MealV2Discriminator):
        super().__init__()
        self.student = student
        self.discriminator = discriminator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)


@register_method("meal_v2")
class MealV2Method(TeacherMethod):
    """MEAL V2: ensemble soft cross-entropy plus the logit discriminator, no hard labels."""

    teacher_defaults = {"d_lr": 1e-4, "follow_student_lr": False, "channel_divisor": 8,
                        "relu_last": True, "update": "joint"}

    def validate_options(self, options: dict, source: str) -> None:
        check_number(options, "d_lr", source, 0.0, low_open=True)
        divisor = options["channel_divisor"]
        if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
            raise ConfigError(f"{source}: model.channel_divisor must be an integer >= 1, got {divisor!r}")
        for key in ("follow_student_lr", "relu_last"):
            if not isinstance(options[key], bool):
                raise ConfigError(f"{source}: model.{key} must be true or false, got {options[key]!r}")
        if options["update"] not in ("joint", "adversarial"):
            raise ConfigError(f"{source}: model.update must be 'joint' (official) or 'adversarial', "
                              f"got {options['update']!r}")
        if options.get("label_smoothing", 0.0):
            raise ConfigError(f"{source}: model.label_smoothing does not apply: MEAL V2 never reads labels")

    def build_model(self) -> nn.Module:
        student = super().build_model()
        try:
            discriminator = MealV2Discriminator(self.train_set.num_classes, self.options["channel_divisor"],
                                                relu_last=self.options["relu_last"])
        except ValueError as err:
            raise ConfigError(f"{self._source()}: model.channel_divisor: {err}") from None
        return MealV2Model(student, discriminator)

    def parameter_groups(self, model: MealV2Model) -> list[dict]:
        return meal_v2_param_groups(model.student, model.discriminator, lr=self.recipe.train.lr,
                                    d_lr=self.options["d_lr"],
                                    follow_student_lr=self.options["follow_student_lr"])

    def training_step(self, model, batch) -> tuple[torch.Tensor, dict]:
        images, labels = batch  # labels only for the logged accuracy
        probs, mean_logits = self.teacher_outputs(images)
        logits = model(images)
        discriminator = model.module.discriminator if hasattr(model, "module") else model.discriminator
        out = meal_v2_loss(logits, probs, mean_logits, discriminator,
                           adversarial=self.options["update"] == "adversarial")
        return out.loss, {"kd": out.kd_loss.detach(), "d_loss": out.d_loss.detach(),
                          "train_accuracy": (logits.argmax(dim=1) == labels).float().mean()}

    def on_train_end(self, ema_model, accelerator, output_dir):
        """Score and save the student alone (``model_config.json`` as the classifier method)."""
        return super().on_train_end(ema_model.student, accelerator, output_dir)
