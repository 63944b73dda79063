"""Classic knowledge distillation (Hinton et al., arXiv 1503.02531) as the ``kd`` method, and the one-call
Python API ``genforge.kd.train_student``."""

import pytest
import torch
import torch.nn.functional as F

import genforge.kd
from genforge.config import ConfigError, recipe_from_dict
from genforge.kd.hinton import KDMethod
from genforge.kd.teachers import load_classifier
from genforge.train import train


def test_kd_step_equals_hinton_loss_with_the_ensemble_mean(tmp_path, teachers, kd_recipe, batch_of):
    method = KDMethod(kd_recipe(tmp_path, "kd", teachers, alpha=0.7, temperature=3.0))
    student = method.build_model()
    images, labels = batch_of(method)
    loss, _ = method.training_step(student, (images, labels))
    t = 3.0
    members = [load_classifier(s, num_classes=10) for s in teachers]
    p_t = torch.stack([F.softmax(m(images) / t, dim=-1) for m in members]).mean(0)
    z = student(images)
    naive = 0.3 * F.cross_entropy(z, labels) + 0.7 * t * t * (
        p_t * (p_t.log() - F.log_softmax(z / t, dim=-1))).sum(-1).mean()
    assert loss.item() == pytest.approx(naive.item(), rel=1e-5)


def test_kd_student_learns_digits_from_a_trained_teacher(tmp_path, kd_recipe):
    teacher_recipe = recipe_from_dict({
        "method": "classifier", "seed": 0, "output_dir": str(tmp_path / "teacher"),
        "data": {"name": "digits", "image_size": 16, "batch_size": 64},
        "model": {"name": "test_resnet"},
        "train": {"max_steps": 60, "lr": 3e-3, "checkpoint_every": 100, "log_every": 100, "ema_decay": 0.0},
        "eval": {"batch_size": 360}})
    assert train(teacher_recipe).metrics["test_accuracy"] > 0.8
    result = train(kd_recipe(tmp_path / "kd", "kd", [tmp_path / "teacher"], steps=60, alpha=1.0, temperature=2.0,
                             kwargs={}))
    assert result.metrics["test_accuracy"] > 0.6  # alpha = 1: it learns from the teacher alone


def test_python_api_runs_the_recipe_and_rejects_bad_input(tmp_path, teachers):
    result = genforge.kd.train_student(teachers=teachers, student="test_efficientnet", method="meal_v2",
                                       steps=2, batch_size=16, output_dir=tmp_path / "api", channel_divisor=2,
                                       train_options={"optimizer": "sgd", "lr": 0.01, "log_every": 1})
    assert result.steps == 2 and "test_accuracy" in result.metrics
    assert (tmp_path / "api" / "recipe.yaml").is_file() and (tmp_path / "api" / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="did you mean 'temperature'"):
        genforge.kd.train_student(teachers=teachers, student="test_efficientnet", method="kd", tempreature=2.0,
                                  output_dir=tmp_path / "bad")
