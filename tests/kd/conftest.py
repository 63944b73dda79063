"""Shared fixtures of the knowledge-transfer tests."""

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_model

from genforge.config import recipe_from_dict


def write_classifier_run(directory: Path, name: str = "test_efficientnet", seed: int = 0, num_classes: int = 10,
                         **kwargs) -> Path:
    """A ``classifier`` run directory (model_config.json + model.safetensors) of a random 1-channel timm model."""
    torch.manual_seed(seed)
    config = {"model_name": name, "num_classes": num_classes, "in_chans": 1, **kwargs}
    model = timm.create_model(**config)
    directory.mkdir(parents=True)
    save_model(model, str(directory / "model.safetensors"))
    (directory / "model_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="session")
def classifier_run():
    """:func:`write_classifier_run`, for tests and module-scoped fixtures."""
    return write_classifier_run


def _kd_recipe(tmp_path, method, teachers, steps=2, **model):
    """A digits recipe of an online distillation ``method`` (``kd``, ``meal_v2``) with a test_efficientnet student."""
    return recipe_from_dict({
        "method": method, "seed": 0, "output_dir": str(tmp_path / "run"),
        "data": {"name": "digits", "image_size": 16, "batch_size": 16},
        "model": {"name": "test_efficientnet", "teachers": [str(t) for t in teachers], **model},
        "train": {"max_steps": steps, "lr": 1e-3, "checkpoint_every": 100, "log_every": 100, "ema_decay": 0.0},
        "eval": {"batch_size": 360}})


@pytest.fixture(scope="session")
def kd_recipe():
    """``kd_recipe(tmp_path, method, teachers, steps=2, **model)``: a validated recipe of an online student."""
    return _kd_recipe


@pytest.fixture(scope="session")
def teachers(tmp_path_factory):
    """Two random 10-class digits teachers of different architectures (classifier run directories)."""
    root = tmp_path_factory.mktemp("teachers")
    return [write_classifier_run(root / "a", "test_efficientnet", seed=1),
            write_classifier_run(root / "b", "test_resnet", seed=2)]


def first_batch(method, size=8):
    """The first ``size`` (images, labels) of a method's train split."""
    images = torch.stack([method.train_set[i][0] for i in range(size)])
    labels = torch.tensor([method.train_set[i][1] for i in range(size)])
    return images, labels


@pytest.fixture(scope="session")
def batch_of():
    """``batch_of(method, size=8)``: the first ``size`` (images, labels) of a method's train split."""
    return first_batch
