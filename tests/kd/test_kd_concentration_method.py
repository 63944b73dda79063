"""Knowledge concentration (arXiv 1711.07607) through the training loop: the ``specialists``
and ``concentration`` methods on the bundled digits."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from genforge.config import ConfigError, load_recipe, recipe_from_dict
from genforge.data import build_dataset
from genforge.kd.concentration import (ConcentrationMethod, SpecialistBank, Verticals, load_student, specialist_dir,
                                       specialists_loss)
from genforge.kd.teachers import load_classifier
from genforge.methods.classification import predict_logits
from genforge.train import train

GROUPS = [[0, 4, 7], [1, 2, 3, 5], [6, 8, 9]]  # not contiguous: vertical order != class-id order


def specialists_recipe(out, verticals=GROUPS, steps=25):
    return recipe_from_dict({
        "method": "specialists", "seed": 0, "output_dir": str(out),
        "data": {"name": "digits", "image_size": 8, "batch_size": 48},
        "model": {"name": "test_resnet", "verticals": verticals},
        "train": {"max_steps": steps, "lr": 3e-3, "log_every": 5, "ema_decay": 0.5, "checkpoint_every": 100},
        "eval": {"batch_size": 360},
    })


def concentration_recipe(out, specialists, **model):
    return recipe_from_dict({
        "method": "concentration", "seed": 0, "output_dir": str(out),
        "data": {"name": "digits", "image_size": 8, "batch_size": 48},
        "model": {"name": "test_resnet", "s1": 16, "s2": 8, "top_k": 2, "specialists": str(specialists), **model},
        "train": {"max_steps": 30, "lr": 1e-2, "log_every": 5, "ema_decay": 0.5, "checkpoint_every": 100},
        "eval": {"batch_size": 360},
    })


@pytest.fixture(scope="module")
def specialists_run(tmp_path_factory):
    return train(specialists_recipe(tmp_path_factory.mktemp("kc") / "specialists"))


@pytest.fixture(scope="module")
def concentration_run(specialists_run, tmp_path_factory):
    recipe = concentration_recipe(tmp_path_factory.mktemp("kc") / "student", specialists_run.output_dir)
    method = ConcentrationMethod(recipe)
    return method, train(recipe, method=method)


def _losses(run):
    return [json.loads(line)["loss"] for line in (run.output_dir / "train_log.jsonl").read_text().splitlines()]


def _digits_batch(n=40):
    data = build_dataset("digits", split="train", image_size=8)
    images, labels = zip(*(data[i] for i in range(n)))
    return torch.stack(images), torch.tensor(labels)


# --- specialists -------------------------------------------------------------------------


def test_specialist_loss_is_the_sum_of_per_vertical_mean_sigmoid_ce():
    torch.manual_seed(0)
    verticals = Verticals(GROUPS)
    bank = SpecialistBank([nn.Sequential(nn.Flatten(), nn.Linear(4, n)) for n in verticals.sizes], verticals)
    images, labels = torch.randn(9, 1, 2, 2), torch.tensor([0, 4, 7, 7, 1, 5, 2, 3, 3])  # vertical 2 absent
    expected = 0.0
    for v, group in enumerate(GROUPS):
        rows = [b for b, y in enumerate(labels.tolist()) if y in group]
        if not rows:
            continue
        target = torch.zeros(len(rows), len(group))
        for r, b in enumerate(rows):
            target[r, group.index(int(labels[b]))] = 1.0
        expected = expected + F.binary_cross_entropy_with_logits(bank[v](images[rows]), target)
    torch.testing.assert_close(specialists_loss(bank(images, labels)), expected)


def test_specialists_loss_falls_and_each_beats_chance_in_its_vertical(specialists_run):
    losses = _losses(specialists_run)
    assert np.mean(losses[-2:]) < 0.6 * np.mean(losses[:2])
    metrics = specialists_run.metrics
    for v, group in enumerate(GROUPS):
        assert metrics[f"specialist_{v}_test_accuracy"] > 1 / len(group) + 0.3
    assert json.loads((specialists_run.output_dir / "verticals.json").read_text()) == GROUPS


def test_saved_specialist_reloads_through_load_classifier_to_its_reported_accuracy(specialists_run):
    test_set = build_dataset("digits", split="test", image_size=8)
    for v, group in enumerate(GROUPS):
        config = json.loads((specialist_dir(specialists_run.output_dir, v) / "model_config.json").read_text())
        assert config == {"model_name": "test_resnet", "num_classes": len(group), "in_chans": 1}
        model = load_classifier(specialist_dir(specialists_run.output_dir, v), num_classes=len(group), in_chans=1)
        rows = [i for i in range(len(test_set)) if test_set[i][1] in group]
        logits, labels = predict_logits(model, torch.utils.data.Subset(test_set, rows), batch_size=100)
        within = torch.tensor([group.index(int(y)) for y in labels])
        accuracy = float((logits.argmax(1) == within).float().mean())
        assert accuracy == pytest.approx(specialists_run.metrics[f"specialist_{v}_test_accuracy"])


@pytest.mark.parametrize("verticals, message", [
    ([[0, 1, 2], [2, 3, 4, 5, 6], [7, 8, 9]], "disjoint"),
    ([[0, 1, 2], [3, 4, 5, 6], [7, 9]], "cover"),
    ([[0, 1, 2], "3456", [7, 8, 9]], "list of lists"),
])
def test_bad_verticals_are_config_errors(tmp_path, verticals, message):
    with pytest.raises(ConfigError, match=f"model.verticals.*{message}"):
        specialists_recipe(tmp_path / "run", verticals=verticals)


@pytest.mark.parametrize("verticals", [[[0, 1], [2, 3, 4]], [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9, 10]]])
def test_verticals_that_do_not_match_the_dataset_classes_fail_before_training(tmp_path, verticals):
    recipe = specialists_recipe(tmp_path / "run", verticals=verticals)  # a partition, but of 0..4 / 0..10
    with pytest.raises(ConfigError, match="dataset has 10 classes"):
        train(recipe)
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- the student -------------------------------------------------------------------------


def test_target_comes_from_the_label_verticals_specialist_and_is_zero_elsewhere(specialists_run, tmp_path):
    method = ConcentrationMethod(concentration_recipe(tmp_path / "run", specialists_run.output_dir))
    method.build_model()
    images, labels = _digits_batch()
    z = method.targets(images, labels)
    teachers = [load_classifier(specialist_dir(specialists_run.output_dir, v)) for v in range(len(GROUPS))]
    for b, y in enumerate(labels.tolist()):
        v = next(i for i, g in enumerate(GROUPS) if y in g)
        with torch.no_grad():
            p = torch.sigmoid(teachers[v](images[b:b + 1]))[0]  # this sample alone, its vertical's teacher
        top = set(p.topk(2).indices.tolist())
        expected = torch.zeros(10)
        for j, c in enumerate(GROUPS[v]):
            expected[c] = p[j] if j in top else 0.0
        torch.testing.assert_close(z[b], expected)


def test_specialists_stay_frozen_outside_the_optimizer_and_the_checkpoint(concentration_run, specialists_run):
    method, run = concentration_run
    saved = set(load_file(str(run.output_dir / "model.safetensors")))
    assert saved and all(key.startswith(("backbone.", "head.")) for key in saved)
    student = load_student(run.output_dir)
    optimized = {id(p) for group in method.parameter_groups(student) for p in group["params"]}
    for v, teacher in enumerate(method.specialists):
        on_disk = load_file(str(specialist_dir(specialists_run.output_dir, v) / "model.safetensors"))
        for name, tensor in teacher.state_dict().items():
            assert torch.equal(tensor.cpu(), on_disk[name]), name
        assert not teacher.training
        assert not any(p.requires_grad or id(p) in optimized for p in teacher.parameters())


def test_concentration_loss_falls_and_the_student_reloads_to_its_metrics(concentration_run):
    _, run = concentration_run
    losses = _losses(run)
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    assert run.metrics["test_accuracy"] > 0.3  # chance is 0.1
    test_set = build_dataset("digits", split="test", image_size=8)
    logits, labels = predict_logits(load_student(run.output_dir), test_set, batch_size=360)
    assert float((logits.argmax(1) == labels).float().mean()) == pytest.approx(run.metrics["test_accuracy"])


def test_trained_students_sc_blocks_reach_only_their_own_verticals_logits(concentration_run):
    _, run = concentration_run
    student = load_student(run.output_dir)
    head = student.head
    classifier = head.classifier.weight()  # (N, M * s2), rows and columns in vertical order
    start = 0
    for v, size in enumerate(head.verticals.sizes):
        block = classifier[start:start + size]
        assert torch.all(block[:, :v * 8] == 0) and torch.all(block[:, (v + 1) * 8:] == 0)
        start += size
    images, _ = _digits_batch(16)
    with torch.no_grad():
        before = student(images)
        head.sc.weights[1].add_(torch.randn_like(head.sc.weights[1]))
        after = student(images)
    inside = GROUPS[1]
    outside = [c for c in range(10) if c not in inside]
    assert torch.equal(before[:, outside], after[:, outside])
    assert not torch.allclose(before[:, inside], after[:, inside])


def test_missing_or_misfit_specialists_are_config_errors(specialists_run, tmp_path):
    with pytest.raises(ConfigError, match="verticals.json"):
        concentration_recipe(tmp_path / "a", tmp_path / "nowhere")
    bad = tmp_path / "bad"
    shutil.copytree(specialists_run.output_dir, bad, ignore=shutil.ignore_patterns("checkpoints", "model", "ema"))
    (bad / "verticals.json").write_text(json.dumps([[0, 4, 7, 1], [2, 3, 5], [6, 8, 9]]))
    with pytest.raises(ConfigError, match="specialist 0 predicts 3 classes.*has 4"):
        concentration_recipe(tmp_path / "b", bad)
    # consistent files but weights of another shape: refused when the specialists load, before training
    (bad / "verticals.json").write_text(json.dumps([[0, 4, 7], [1, 2, 3], [5, 6, 8, 9]]))
    for v, n in ((1, 3), (2, 4)):
        path = specialist_dir(bad, v) / "model_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "num_classes": n}))
    recipe = concentration_recipe(tmp_path / "c", bad)
    with pytest.raises(ConfigError, match="teacher weights"):
        train(recipe)
    assert not (tmp_path / "c" / "checkpoints").exists()


@pytest.mark.parametrize("model, message", [({"s1": 0}, "model.s1"), ({"top_k": 1.5}, "model.top_k"),
                                            ({"learn_gamma": "yes"}, "model.learn_gamma"),
                                            ({"kwargs": {"num_classes": 3}}, "model.kwargs.num_classes")])
def test_bad_student_settings_are_config_errors(specialists_run, tmp_path, model, message):
    with pytest.raises(ConfigError, match=message):
        concentration_recipe(tmp_path / "run", specialists_run.output_dir, **model)


def test_data_channels_that_the_specialists_do_not_read_fail_before_training(specialists_run, tmp_path):
    recipe = concentration_recipe(tmp_path / "run", specialists_run.output_dir)
    recipe.data.channels = 3
    with pytest.raises(ConfigError, match="reads 1 input channels, the data has 3"):
        train(recipe)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_digits_recipes_validate(specialists_run):
    assert load_recipe("recipes/kd/specialists_digits.yaml").model["verticals"] == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]
    recipe = load_recipe("recipes/kd/concentration_digits.yaml",
                         overrides={"model.specialists": str(specialists_run.output_dir)})
    assert recipe.method == "concentration" and recipe.model["top_k"] == 2
