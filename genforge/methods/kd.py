"""Online distillation from frozen teachers: classic KD (``kd``) and MEAL V2 (``meal_v2``).

Both train a ``timm.create_model`` student (the ``classifier`` method's ``model:`` keys: ``name``,
``kwargs``, ``pretrained_file``, ``label_smoothing``) against ``model.teachers``: run directories
of the ``classifier`` method or ``{name, file, kwargs}`` mappings
(:mod:`genforge.kd.teachers`), averaged by one :class:`~genforge.kd.ensemble.TeacherEnsemble`
(mean of softmaxes). Teachers are frozen, move to the batch's device and are never in the
optimizer or the checkpoint; a teacher whose class count differs from the dataset's (and so the
student's) is refused before training.

- ``kd`` (Hinton et al. 2015, arXiv 1503.02531, Sec. 2):
  L = (1 - alpha) CE(z_S, y) + alpha T^2 KL(p_T^T || softmax(z_S / T)), with
  p_T^T = mean_k softmax(z_k / T). Keys ``alpha`` (0.9) and ``temperature`` (4).
- ``meal_v2`` (Shen & Savvides, arXiv 2009.08453, Sec. 3): L = L_KD + L_D, the soft
  cross-entropy against p_T = mean_k softmax(z_k) plus the BCE of the logit discriminator on
  [z_S; mean_k z_k]; hard labels never enter the loss. The trained model is
  :class:`MealV2Model` (student + discriminator, so the discriminator's state is checkpointed
  and resumes with the run); only the student is evaluated and saved. Keys
  ``d_lr`` (1e-4, the discriminator's own parameter group), ``follow_student_lr`` (false;
  true reproduces the official code, whose LR setter overwrote the discriminator's LR, issue
  #9), ``channel_divisor`` (K, 8 as the official train.py; small class counts need a smaller
  K), ``relu_last`` (true, the official quirk) and ``update``: ``joint`` (the official update:
  one backward pass of L_KD + L_D, so the student also lowers L_D and the discriminator acts as
  a regulariser) or ``adversarial`` (the student receives -dL_D/dz_S through a gradient
  reversal, the GAN reading of the paper's text). Weight decay is 0 for both groups, as the
  official optimiser; start the student from a checkpoint with ``pretrained_file`` (the paper's
  initialisation). Use ``train.optimizer: sgd`` and ``train.lr_milestones`` for the official
  regime.
"""

from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from genforge.config import ConfigError
from genforge.kd.ensemble import TeacherEnsemble
from genforge.kd.losses import kd_kl_loss
from genforge.kd.meal_v2 import MealV2Discriminator, meal_v2_loss, meal_v2_param_groups
from genforge.kd.teachers import TeacherError, check_teacher_source, load_teachers, teacher_device
from genforge.methods.classification import MODEL_DEFAULTS, ClassifierMethod
from genforge.train import register_method

__all__ = ["KDMethod", "MealV2Method", "MealV2Model", "TeacherMethod"]


def _check_number(options: dict, key: str, source: str, low: float, high: float | None = None,
                  low_open: bool = False) -> None:
    value = options[key]
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise ConfigError(f"{source}: model.{key} must be a number {bound}, got {value!r}")


class TeacherMethod(ClassifierMethod):
    """A timm student trained against ``model.teachers`` through one frozen TeacherEnsemble."""

    teacher_defaults: dict = {}
    temperature_key: str | None = None

    def __init__(self, recipe):
        self.model_defaults = {**MODEL_DEFAULTS, "teachers": None, **self.teacher_defaults}
        super().__init__(recipe)

    def validate_model_config(self, model_cfg: dict) -> None:
        super().validate_model_config(model_cfg)
        source = self._source()
        teachers = model_cfg.get("teachers")
        if not isinstance(teachers, list) or not teachers:
            raise ConfigError(f"{source}: model.teachers must be a non-empty list of classifier run "
                              f"directories or {{name, file, kwargs}} mappings, got {teachers!r}")
        for i, teacher in enumerate(teachers):
            try:
                check_teacher_source(teacher)
            except TeacherError as err:
                raise ConfigError(f"{source}: model.teachers[{i}]: {err}") from None
        self.validate_options({**self.teacher_defaults, **model_cfg}, source)

    def validate_options(self, options: dict, source: str) -> None:
        """ConfigError for a bad method-specific option."""

    @cached_property
    def ensemble(self) -> TeacherEnsemble:
        """The frozen teachers; their class count must be the dataset's."""
        try:
            teachers = load_teachers(self.options["teachers"], num_classes=self.train_set.num_classes,
                                     in_chans=self.train_set.channels)
        except TeacherError as err:
            raise ConfigError(f"{self._source()}: model.teachers: {err}") from None
        temperature = self.options[self.temperature_key] if self.temperature_key else 1.0
        return TeacherEnsemble(teachers, temperature=temperature)

    def build_model(self) -> nn.Module:
        self.ensemble  # load (and check) the teachers before the student is trained
        return super().build_model()

    def teacher_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(p_T, mean teacher logits) of a batch, teachers on the batch's device."""
        return teacher_device(self.ensemble, images).probs_and_mean_logits(images)


@register_method("kd")
class KDMethod(TeacherMethod):
    """Classic knowledge distillation from a teacher ensemble (Hinton et al. 2015)."""

    teacher_defaults = {"alpha": 0.9, "temperature": 4.0}
    temperature_key = "temperature"

    def validate_options(self, options: dict, source: str) -> None:
        _check_number(options, "alpha", source, 0.0, 1.0)
        _check_number(options, "temperature", source, 0.0, low_open=True)

    def training_step(self, model, batch) -> tuple[torch.Tensor, dict]:
        images, labels = batch
        probs, _ = self.teacher_outputs(images)
        logits = model(images)
        hard = F.cross_entropy(logits.float(), labels)
        soft = kd_kl_loss(logits, temperature=self.options["temperature"], teacher_probs=probs)
        alpha = self.options["alpha"]
        loss = (1.0 - alpha) * hard + alpha * soft
        return loss, {"ce": hard.detach(), "kd": soft.detach(),
                      "train_accuracy": (logits.argmax(dim=1) == labels).float().mean()}


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
        _check_number(options, "d_lr", source, 0.0, low_open=True)
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
