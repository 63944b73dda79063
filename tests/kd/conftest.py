"""Shared fixtures of the knowledge-transfer tests."""

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_model


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
