"""Teachers of the online students (``kd``, ``meal_v2``): loaded frozen and exact, checked before training."""

import pytest
import timm
import torch

from genforge.config import ConfigError
from genforge.kd.meal_v2 import MealV2Method
from genforge.kd.teachers import TeacherError, load_classifier


def test_teacher_round_trip_is_frozen_and_exact(teachers):
    model = load_classifier(teachers[0], num_classes=10, in_chans=1)
    again = timm.create_model("test_efficientnet", num_classes=10, in_chans=1)
    again.load_state_dict(dict(model.state_dict()))
    x = torch.randn(4, 1, 16, 16)
    again.eval()
    assert torch.equal(model(x), again(x))
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_teacher_with_other_class_count_is_refused_before_training(tmp_path, teachers, kd_recipe, classifier_run):
    five = classifier_run(tmp_path / "five", num_classes=5)
    with pytest.raises(TeacherError, match="predicts 5 classes but 10"):
        load_classifier(five, num_classes=10)
    method = MealV2Method(kd_recipe(tmp_path, "meal_v2", [teachers[0], five], channel_divisor=2))
    with pytest.raises(ConfigError, match="predicts 5 classes"):
        method.build_model()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_teacher_entries_are_config_errors(tmp_path, teachers, kd_recipe):
    with pytest.raises(ConfigError, match="model.teachers must be a non-empty list"):
        kd_recipe(tmp_path, "kd", [])
    with pytest.raises(ConfigError, match=r"teachers\[1\].*not a classifier run directory"):
        kd_recipe(tmp_path, "kd", [teachers[0], tmp_path / "nowhere"])
    with pytest.raises(ConfigError, match="model.alpha"):
        kd_recipe(tmp_path, "kd", teachers, alpha=1.5)
    with pytest.raises(ConfigError, match="model.update"):
        kd_recipe(tmp_path, "meal_v2", teachers, update="gan")
    with pytest.raises(ConfigError, match="never reads labels"):
        kd_recipe(tmp_path, "meal_v2", teachers, label_smoothing=0.1)
