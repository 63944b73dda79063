"""The ``classifier`` method: any timm model trained with cross-entropy on a genforge dataset."""

import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, load_model, save_model

from genforge.config import ConfigError, load_recipe, recipe_from_dict
from genforge.data import build_dataset
from genforge.methods.classification import (ClassifierMethod, classification_metrics, predict_logits,
                                             recalibrate_batchnorm)
from genforge.train import latest_checkpoint, train


def classifier_recipe(tmp_path, **model):
    return recipe_from_dict({
        "method": "classifier", "seed": 0, "output_dir": str(tmp_path / "run"),
        "data": {"name": "digits", "image_size": 8, "batch_size": 32},
        "model": {"name": "test_resnet", **model},
        "train": {"max_steps": 30, "lr": 3e-3, "log_every": 5, "ema_decay": 0.5, "checkpoint_every": 100},
        "eval": {"batch_size": 360},
    })


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train(classifier_recipe(tmp_path_factory.mktemp("classifier"), label_smoothing=0.1))


def test_cross_entropy_falls_on_digits(trained):
    rows = [json.loads(line) for line in (trained.output_dir / "train_log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows]
    assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2])
    assert rows[-1]["train_accuracy"] > rows[0]["train_accuracy"]


def test_saved_ema_weights_reload_to_the_reported_test_metrics(trained):
    out = trained.output_dir
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.3  # chance is 0.1
    config = json.loads((out / "model_config.json").read_text())
    assert config == {"model_name": "test_resnet", "num_classes": 10, "in_chans": 1}
    model = timm.create_model(**config)
    load_model(model, str(out / "model.safetensors"))
    assert metrics["num_params"] == sum(p.numel() for p in model.parameters())
    test_set = build_dataset("digits", split="test", image_size=8)
    again = classification_metrics(*predict_logits(model, test_set, batch_size=100))
    assert again["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert again["test_ece"] == pytest.approx(metrics["test_ece"], abs=1e-6)


def test_saved_model_holds_the_emas_batchnorm_statistics_not_the_raw_models(trained):
    # The EMA averages buffers too: scoring EMA weights with the raw model's running
    # statistics mixed two different networks.
    out = trained.output_dir
    checkpoint = latest_checkpoint(out)
    ema = load_file(str(checkpoint / "ema.safetensors"))
    raw = load_file(str(checkpoint / "model.safetensors"))
    saved = load_file(str(out / "model.safetensors"))
    stats = [k for k in saved if k.endswith(("running_mean", "running_var"))]
    assert stats
    assert all(torch.equal(saved[k], ema[k]) for k in stats)
    assert all(not torch.allclose(raw[k], ema[k]) for k in stats)


def test_channels_and_classes_follow_the_dataset(tmp_path):
    model = ClassifierMethod(classifier_recipe(tmp_path)).build_model()
    assert model.num_classes == 10 and model.conv1[0].in_channels == 1


def test_no_weight_decay_for_1d_params_and_the_models_own_list(tmp_path):
    recipe = classifier_recipe(tmp_path, name="test_vit", kwargs={"img_size": 8, "patch_size": 2})
    recipe.train.weight_decay = 0.05
    method = ClassifierMethod(recipe)
    model = method.build_model()
    decay_of = {id(p): g["weight_decay"] for g in method.parameter_groups(model) for p in g["params"]}
    for name, param in model.named_parameters():
        exempt = param.ndim <= 1 or name in model.no_weight_decay()
        assert decay_of[id(param)] == (0.0 if exempt else 0.05), name
    assert decay_of[id(model.pos_embed)] == 0.0 and decay_of[id(model.cls_token)] == 0.0


def test_pretrained_file_is_loaded_through_timm_with_its_head_when_the_classes_match(tmp_path):
    source = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    save_model(source, str(tmp_path / "weights.safetensors"))
    recipe = classifier_recipe(tmp_path, pretrained_file=str(tmp_path / "weights.safetensors"))
    loaded = ClassifierMethod(recipe).build_model().state_dict()
    assert loaded.keys() == source.state_dict().keys()
    for name, tensor in source.state_dict().items():
        assert torch.equal(tensor, loaded[name]), name


def test_a_pretrained_head_for_other_classes_is_replaced_and_the_stem_adapted(tmp_path):
    source = timm.create_model("test_resnet", num_classes=1000, in_chans=3)
    save_model(source, str(tmp_path / "imagenet.safetensors"))
    recipe = classifier_recipe(tmp_path, pretrained_file=str(tmp_path / "imagenet.safetensors"))
    model = ClassifierMethod(recipe).build_model()
    assert model.fc.out_features == 10
    torch.testing.assert_close(model.conv1[0].weight, source.conv1[0].weight.sum(1, keepdim=True))
    torch.testing.assert_close(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


@pytest.mark.parametrize("model, message", [
    ({"label_smothing": 0.1}, "did you mean 'label_smoothing'"),
    ({"name": "resnet18x"}, "'resnet18x' is not a timm model; did you mean 'resnet18'"),
    ({"kwargs": {"num_classes": 3}}, "kwargs.num_classes is set by the method"),
    ({"pretrained_file": "/nonexistent/w.safetensors"}, "is not a file"),
    ({"label_smoothing": 1.0}, r"label_smoothing must be a number in \[0, 1\)"),
    ({"bn_recalibration_batch": 0}, "bn_recalibration_batch must be a batch size >= 1"),
])
def test_bad_model_sections_are_refused_when_the_recipe_loads(tmp_path, model, message):
    with pytest.raises(ConfigError, match=message):
        classifier_recipe(tmp_path, **model)


def test_a_kwarg_the_timm_model_lacks_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="do not fit timm model 'test_resnet'"):
        ClassifierMethod(classifier_recipe(tmp_path, kwargs={"bogus": 1})).build_model()


def test_shipped_recipe_loads():
    recipe = load_recipe("recipes/backbones/resnet18_digits.yaml")
    assert recipe.model["name"] == "resnet18" and recipe.data.image_size == 32 and recipe.data.resize == "resize"


def test_batchnorm_recalibration_averages_the_statistics_of_shuffled_batches_with_dropout_off():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.3),
                                torch.nn.ReLU(), torch.nn.BatchNorm2d(4)).train()
    images = build_dataset("digits", split="train", image_size=8).images[:96]
    data = torch.utils.data.TensorDataset(images, torch.zeros(96, dtype=torch.long))
    assert recalibrate_batchnorm(model, data, batch_size=32) == 2
    with torch.no_grad():
        order = torch.randperm(96, generator=torch.Generator().manual_seed(0))  # the fixed shuffle
        features = [model[1](chunk) for chunk in images[order].split(32)]  # dropout off: the conv's exact output
    norm = model[2]
    torch.testing.assert_close(norm.running_mean, torch.stack([f.mean((0, 2, 3)) for f in features]).mean(0))
    torch.testing.assert_close(norm.running_var, torch.stack([f.var((0, 2, 3)) for f in features]).mean(0))
    assert int(norm.num_batches_tracked) == 3 and norm.momentum == 0.3 and model.training


def test_a_run_with_bn_recalibration_saves_the_population_statistics_of_the_training_split(tmp_path):
    train_images = build_dataset("digits", split="train", image_size=8).images
    recipe = classifier_recipe(tmp_path, bn_recalibration_batch=len(train_images))
    recipe.train.max_steps = 2
    result = train(recipe)
    model = timm.create_model(**json.loads((result.output_dir / "model_config.json").read_text()))
    load_model(model, str(result.output_dir / "model.safetensors"))
    first = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    inputs = []
    first.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    with torch.no_grad():
        model.eval()(train_images)
    torch.testing.assert_close(first.running_mean, inputs[0].mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first.running_var, inputs[0].var((0, 2, 3)), rtol=1e-4, atol=1e-5)
