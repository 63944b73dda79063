"""Classic knowledge distillation (``kd``), and the base of every student trained online against frozen teachers.

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", arXiv 1503.02531, Sec. 2:

    L = (1 - alpha) CE(z_S, y) + alpha T^2 KL(p_T^T || softmax(z_S / T)),   p_T^T = mean_k softmax(z_k / T),

with the T^2 soft term of :func:`genforge.kd.losses.kd_kl_loss`. Recipe keys ``alpha`` (0.9) and
``temperature`` (4).

:class:`TeacherMethod` is what ``kd`` and ``meal_v2`` (:mod:`genforge.kd.meal_v2`) share: a
``timm.create_model`` student (the ``classifier`` method's ``model:`` keys: ``name``,
``kwargs``, ``pretrained_file``, ``label_smoothing``) trained against ``model.teachers``: run
directories of the ``classifier`` method or ``{name, file, kwargs}`` mappings
(:mod:`genforge.kd.teachers`), averaged by one :class:`~genforge.kd.ensemble.TeacherEnsemble`
(mean of softmaxes). Teachers are frozen, move to the batch's device and are never in the
optimizer or the checkpoint; a teacher whose class count differs from the dataset's (and so the
student's) is refused before training.
"""

from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from genforge.config import ConfigError
from genforge.kd.ensemble import TeacherEnsemble
from genforge.kd.losses import kd_kl_loss
from genforge.kd.teachers import TeacherError, check_teacher_source, load_teachers, teacher_device
from genforge.methods.classification import MODEL_DEFAULTS, ClassifierMethod
from genforge.train import register_method

__all__ = ["KDMethod", "TeacherMethod", "check_number"]


def check_number(options: dict, key: str, source: str, low: float, high: float | None = None,
                 low_open: bool = False) -> None:
    """ConfigError unless ``options[key]`` is a number >= ``low`` (> with ``low_open``) and <= ``high``."""
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
        check_number(options, "alpha", source, 0.0, 1.0)
        check_number(options, "temperature", source, 0.0, low_open=True)

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
