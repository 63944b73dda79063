"""m2mKD in the training loop: ``m2mkd`` teaches student modules inside the frozen meta model against
the frozen, split teacher; ``modular_student`` trains the assembled MoE student end to end."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, load_model

from genforge.config import ConfigError, recipe_from_dict
from genforge.kd.m2mkd import M2MKDMethod, ModularStudent, ModularStudentMethod, split_vit, student_module
from genforge.kd.m2mkd.method import HybridNetwork, module_path
from genforge.kd.teachers import load_classifier
from genforge.methods.classification import classification_metrics, predict_logits
from genforge.train import train

VIT = {"img_size": 8, "patch_size": 4, "num_heads": 2}
STUDENT = {"depths": [1, 1, 1], "embed_dim": 8, "num_heads": 2, "num_experts": 2, "top_k": 1, "mlp_ratio": 2.0}


def train_vit(out, depth):
    """A classifier run of a tiny ViT on the 8x8 digits (Deep Incubation pretrains the meta model too)."""
    return str(train(recipe_from_dict({
        "method": "classifier", "seed": 0, "output_dir": str(out),
        "data": {"name": "digits", "image_size": 8, "batch_size": 64},
        "model": {"name": "vit_tiny_patch16_224", "kwargs": {"embed_dim": 16, "depth": depth, **VIT}},
        "train": {"max_steps": 40, "lr": 5e-3, "log_every": 40, "ema_decay": 0.5, "checkpoint_every": 100},
        "eval": {"batch_size": 360}})).output_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("m2mkd_runs")
    return {"teacher": train_vit(root / "teacher", depth=4), "meta": train_vit(root / "meta", depth=3), "root": root}


def m2mkd_recipe(runs, out, **model):
    return recipe_from_dict({
        "method": "m2mkd", "seed": 0, "output_dir": str(out),
        "data": {"name": "digits", "image_size": 8, "batch_size": 32},
        "model": {"teacher": runs["teacher"], "meta": runs["meta"], "teacher_depths": [1, 2, 1],
                  "student": dict(STUDENT), **model},
        "train": {"max_steps": 40, "lr": 5e-3, "log_every": 5, "ema_decay": 0.5, "checkpoint_every": 100},
        "eval": {"batch_size": 360},
    })


def modular_recipe(out, **model):
    return recipe_from_dict({
        "method": "modular_student", "seed": 0, "output_dir": str(out),
        "data": {"name": "digits", "image_size": 8, "batch_size": 32},
        "model": model,
        "train": {"max_steps": 0, "lr": 3e-3, "log_every": 5, "checkpoint_every": 100},
        "eval": {"batch_size": 360},
    })


@pytest.fixture(scope="module")
def taught(runs):
    return train(m2mkd_recipe(runs, runs["root"] / "m2mkd"))


def frozen_state(method):
    return {k: v.clone() for k, v in {**method.frozen.teacher.state_dict(prefix="teacher."),
                                      **method.frozen.meta.state_dict(prefix="meta.")}.items()}


def test_only_student_modules_and_stitches_learn_while_teacher_and_meta_stay_frozen(runs, tmp_path):
    method = M2MKDMethod(m2mkd_recipe(runs, tmp_path / "run"))
    model = method.build_model()
    optimizer = torch.optim.AdamW(method.parameter_groups(model), lr=1e-2)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    frozen_params = list(method.frozen.teacher.parameters()) + list(method.frozen.meta.parameters())
    assert optimized == {id(p) for p in model.parameters()}
    assert optimized.isdisjoint(id(p) for p in frozen_params)
    before_frozen = frozen_state(method)
    before_student = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = next(iter(torch.utils.data.DataLoader(method.train_set, batch_size=32)))
    for _ in range(3):
        loss, scalars = method.training_step(model, (images, labels))
        loss.backward()
        assert all(p.grad is None and not p.requires_grad for p in frozen_params)
        for i, module in enumerate(model):
            stitches = [s for s in (module.pre_stitch, module.post_stitch) if s is not None]
            assert len(stitches) == (1 if i in (0, 2) else 2)
            for p in [p for s in stitches for p in s.parameters()] + list(module.module.blocks[0].attn.parameters()):
                assert p.grad is not None and p.grad.abs().sum() > 0
        torch.testing.assert_close(loss, sum(scalars[f"loss_{i}"] for i in range(3)))
        optimizer.step()
        optimizer.zero_grad()
    after_frozen = frozen_state(method)
    assert all(torch.equal(v, after_frozen[k]) for k, v in before_frozen.items())
    after_student = model.state_dict()
    for i in range(3):
        assert not torch.equal(before_student[f"{i}.module.blocks.0.attn.qkv.weight"],
                               after_student[f"{i}.module.blocks.0.attn.qkv.weight"])


def test_each_pair_loss_falls_on_digits_and_only_the_students_are_checkpointed(taught, runs):
    rows = [json.loads(line) for line in (taught.output_dir / "train_log.jsonl").read_text().splitlines()]
    for key in ("loss", "loss_0", "loss_1", "loss_2"):
        series = [row[key] for row in rows]
        assert np.mean(series[-2:]) < 0.85 * np.mean(series[:2]), key
    saved = load_file(str(taught.output_dir / "ema" / "model.safetensors"))
    assert {key.split(".")[0] for key in saved} == {"0", "1", "2"}
    method = M2MKDMethod(m2mkd_recipe(runs, taught.output_dir))
    assert saved.keys() == method.build_model().state_dict().keys()


def test_the_frozen_teacher_and_meta_are_those_on_disk_after_training(taught, runs):
    method = M2MKDMethod(m2mkd_recipe(runs, taught.output_dir))
    for key in ("teacher", "meta"):
        on_disk = load_classifier(runs[key]).state_dict()
        loaded = getattr(method.frozen, key).state_dict()
        assert all(torch.equal(v, loaded[k]) for k, v in on_disk.items())


def test_saved_modules_assemble_strictly_into_the_student_that_runs_them_in_sequence(taught, runs):
    out, metrics = taught.output_dir, taught.metrics
    config = json.loads((out / "student_config.json").read_text())
    assert config == {**STUDENT, "meta_dim": 16, "img_size": 8, "patch_size": 4, "in_chans": 1, "num_classes": 10}
    modules = []
    for i in range(3):
        module = student_module(i, **config)
        load_model(module, str(module_path(out, i)), strict=True)
        modules.append(module.eval())
    student = ModularStudent(**config)
    student.load_modules([load_file(str(module_path(out, i))) for i in range(3)])
    student.eval()
    images = torch.randn(5, 1, 8, 8)
    x = images
    for module in modules:
        x = module(x)
    torch.testing.assert_close(student(images), x)
    test_set = M2MKDMethod(m2mkd_recipe(runs, out)).test_set
    again = classification_metrics(*predict_logits(student, test_set, 360))["test_accuracy"]
    assert again == pytest.approx(metrics["student_test_accuracy"])
    meta_stages = split_vit(load_classifier(runs["meta"]), [1, 1, 1])
    hybrid = HybridNetwork(meta_stages, 1, modules[1])
    again = classification_metrics(*predict_logits(hybrid, test_set, 360))["test_accuracy"]
    assert again == pytest.approx(metrics["hybrid_1_test_accuracy"])
    assert metrics["hybrid_1_test_accuracy"] > 0.3  # chance is 0.1


def test_modular_student_starts_from_exactly_the_taught_modules(taught, tmp_path):
    recipe = modular_recipe(tmp_path / "ft", m2mkd_run=str(taught.output_dir))
    start = ModularStudentMethod(recipe).build_model()
    assembled = ModularStudent(**json.loads((taught.output_dir / "student_config.json").read_text()))
    assembled.load_modules([load_file(str(module_path(taught.output_dir, i))) for i in range(3)])
    assert start.state_dict().keys() == assembled.state_dict().keys()
    assert all(torch.equal(v, start.state_dict()[k]) for k, v in assembled.state_dict().items())
    step0 = train(recipe)
    assert step0.metrics["test_accuracy"] == pytest.approx(taught.metrics["student_test_accuracy"])


def test_the_scratch_baseline_is_the_same_network_as_the_taught_one(taught, tmp_path):
    config = json.loads((taught.output_dir / "student_config.json").read_text())
    scratch = {k: config[k] for k in (*STUDENT, "meta_dim", "patch_size")}
    method = ModularStudentMethod(modular_recipe(tmp_path / "scratch", student=scratch))
    model = method.build_model()
    taught_shapes = {k: v.shape for k, v in ModularStudent(**config).state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == taught_shapes
    decay_of = {id(p): g["weight_decay"] for g in method.parameter_groups(model) for p in g["params"]}
    assert decay_of[id(model.stages[0].module.stem.pos_embed)] == 0.0


def test_modular_student_without_stitches_learns_from_scratch_on_digits(tmp_path):
    student = {**STUDENT, "embed_dim": 16, "meta_dim": 16, "patch_size": 4}
    recipe = modular_recipe(tmp_path / "scratch", student=student, keep_stitches=False)
    recipe.train.max_steps, recipe.train.lr = 40, 5e-3
    result = train(recipe)
    losses = [json.loads(line)["loss"] for line in (result.output_dir / "train_log.jsonl").read_text().splitlines()]
    assert np.mean(losses[-2:]) < 0.85 * np.mean(losses[:2])
    reloaded = ModularStudent(**json.loads((result.output_dir / "student_config.json").read_text()))
    assert not reloaded.keep_stitches
    load_model(reloaded, str(result.output_dir / "model.safetensors"))
    test_set = ModularStudentMethod(recipe).test_set
    again = classification_metrics(*predict_logits(reloaded, test_set, 360))["test_accuracy"]
    assert again == pytest.approx(result.metrics["test_accuracy"])


def test_a_subset_of_indices_teaches_only_those_modules(runs, tmp_path):
    method = M2MKDMethod(m2mkd_recipe(runs, tmp_path / "run", indices=[-1]))
    model = method.build_model()
    assert len(model) == 1 and model.indices == [2]
    assert model[0].state_dict().keys() == student_module(-1, **method.student_kwargs()).state_dict().keys()
    images, labels = next(iter(torch.utils.data.DataLoader(method.train_set, batch_size=8)))
    _, scalars = method.training_step(model, (images, labels))
    assert set(scalars) == {"loss_2"}


@pytest.mark.parametrize("change, message", [
    ({"teacher_depths": [1, 1, 1]}, r"teacher_depths \[1, 1, 1\] sum to 3, but the teacher has 4 blocks"),
    ({"teacher_depths": [2, 2], "student": {**STUDENT, "depths": [1, 1]}},
     "the meta model has 3 blocks .one per module., but model.teacher_depths"),
    ({"teacher": "/nonexistent/run"}, "model.teacher: teacher /nonexistent/run: not a classifier run directory"),
    ({"meta": "/nonexistent/run"}, "model.meta: .*not a classifier run directory"),
])
def test_misfitting_teacher_or_meta_is_a_config_error_before_training(runs, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        M2MKDMethod(m2mkd_recipe(runs, tmp_path / "run", **change)).build_model()


def test_a_teacher_that_is_not_a_vit_is_a_config_error(runs, tmp_path, classifier_run):
    resnet = str(classifier_run(tmp_path / "resnet", name="test_resnet"))
    with pytest.raises(ConfigError, match="is a ResNet, not a timm VisionTransformer"):
        M2MKDMethod(m2mkd_recipe(runs, tmp_path / "run", teacher=resnet)).build_model()


def test_teacher_and_meta_of_other_widths_are_a_config_error(runs, tmp_path, classifier_run):
    wide = str(classifier_run(tmp_path / "wide", "vit_tiny_patch16_224", embed_dim=32, depth=3, **VIT))
    with pytest.raises(ConfigError, match=r"differ in embed_dim \(16 vs 32\)"):
        M2MKDMethod(m2mkd_recipe(runs, tmp_path / "run", meta=wide)).build_model()


@pytest.mark.parametrize("change, message", [
    ({"student": {**STUDENT, "depths": [1, 1]}}, "differ in module count"),
    ({"indices": [0, -3]}, r"indices \[0, -3\] name a module twice"),
    ({"indices": [3]}, r"list of module indices in \[-3, 3\)"),
    ({"alpha": 1.5}, r"alpha must be a number in \[0, 1\]"),
    ({"distillation_type": "medium"}, "distillation_type must be 'soft' or 'hard'"),
    ({"student": {**STUDENT, "top_k": 3}}, r"top_k must be in 1..num_experts \(2\)"),
    ({"student": {**STUDENT, "meta_dim": 16}}, "unknown key 'model.student.meta_dim'"),
    ({"teacher_depths": None}, "model.teacher_depths is required"),
])
def test_bad_m2mkd_model_sections_are_refused_when_the_recipe_loads(runs, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        m2mkd_recipe(runs, tmp_path / "run", **change)


def test_bad_modular_student_sections_are_refused(taught, tmp_path):
    with pytest.raises(ConfigError, match="exactly one of model.student"):
        modular_recipe(tmp_path / "a", m2mkd_run=str(taught.output_dir), student=dict(STUDENT))
    with pytest.raises(ConfigError, match=r"model.student needs \['meta_dim', 'patch_size'\]"):
        modular_recipe(tmp_path / "b", student=dict(STUDENT))
    with pytest.raises(ConfigError, match="not an m2mkd run directory"):
        ModularStudentMethod(modular_recipe(tmp_path / "c", m2mkd_run=str(tmp_path))).build_model()
    partial = tmp_path / "partial"
    (partial / "modules").mkdir(parents=True)
    (partial / "student_config.json").write_text((taught.output_dir / "student_config.json").read_text())
    (partial / "modules" / "module_0.safetensors").write_bytes(module_path(taught.output_dir, 0).read_bytes())
    with pytest.raises(ConfigError, match="lacks the student modules .*module_1.safetensors"):
        ModularStudentMethod(modular_recipe(tmp_path / "d", m2mkd_run=str(partial))).build_model()


def test_damaged_module_teacher_and_config_files_are_config_errors_naming_them(runs, taught, tmp_path):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(runs["teacher"], teacher)
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(ConfigError, match=f"model.teacher: {weights} is not a readable safetensors file"):
        M2MKDMethod(m2mkd_recipe(runs, tmp_path / "run", teacher=str(teacher))).build_model()

    damaged = tmp_path / "damaged"
    shutil.copytree(taught.output_dir, damaged)
    module = module_path(damaged, 1)
    module.write_bytes(b"\x00" * 16)
    with pytest.raises(ConfigError, match=f"student module {module} is not a readable safetensors file"):
        ModularStudentMethod(modular_recipe(tmp_path / "a", m2mkd_run=str(damaged))).build_model()
    (damaged / "student_config.json").write_text("{")
    with pytest.raises(ConfigError, match="student_config.json is not readable JSON"):
        ModularStudentMethod(modular_recipe(tmp_path / "b", m2mkd_run=str(damaged))).build_model()
