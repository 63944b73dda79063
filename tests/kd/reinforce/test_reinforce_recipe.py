"""``genforge reinforce`` recipes and the ``reinforced`` student method (Faghri et al., arXiv 2303.08983)."""

import hashlib
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_model

import genforge.kd.ensemble
import genforge.kd.reinforce.recipe
import genforge.kd.teachers
from genforge.cli import main as cli_main
from genforge.config import ConfigError, recipe_from_dict
from genforge.data import build_dataset
from genforge.kd.reinforce import ReinforcedDataset, ReinforcedMethod, load_reinforce_recipe, run_reinforce_recipe
from genforge.kd.reinforce.recipe import reinforce_recipe_from_mapping
from genforge.kd.teachers import TeacherError, load_classifier
from genforge.train import train

TAG = "digits:train:8:pad:1ch"


def _teacher_dir(directory, num_classes=10, steps=25):
    """A classifier-run-like directory: test_resnet trained briefly on the digits (8x8)."""
    directory.mkdir(parents=True)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=num_classes, in_chans=1)
    if num_classes == 10:
        data = build_dataset("digits", split="train", image_size=8)
        images = torch.stack([data[i][0] for i in range(len(data))])
        labels = torch.tensor([data[i][1] for i in range(len(data))])
        opt = torch.optim.Adam(model.parameters(), lr=5e-3)
        for step in range(steps):
            idx = torch.randint(len(data), (64,))
            loss = torch.nn.functional.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    save_model(model, str(directory / "model.safetensors"))
    config = {"model_name": "test_resnet", "num_classes": num_classes, "in_chans": 1}
    (directory / "model_config.json").write_text(json.dumps(config))
    return directory


def _mapping(teacher, out, **changes):
    raw = {
        "seed": 3,
        "output_dir": str(out),
        "data": {"name": "digits", "image_size": 8, "batch_size": 600},
        "teachers": [str(teacher)],
        "num_samples": 1,
        "top_k": 3,
        "shard_size": 512,
        "device": "cpu",
        "transforms": [["random_resized_crop", {"size": 8, "scale": [0.6, 1.0]}], ["rand_augment", {"p": 0.5}]],
    }
    raw.update(changes)
    return raw


def _recipe(teacher, out, **changes):
    return reinforce_recipe_from_mapping(_mapping(teacher, out, **changes))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A trained tiny teacher and one uninterrupted reinforce run of the 1,437 training digits."""
    root = tmp_path_factory.mktemp("reinforce")
    teacher = _teacher_dir(root / "teacher")
    summary = run_reinforce_recipe(_recipe(teacher, root / "full"), progress=False)
    return teacher, root / "full", summary


def test_bad_keys_and_transforms_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'num_sample'.*did you mean 'num_samples'"):
        reinforce_recipe_from_mapping({**_mapping("t", tmp_path), "num_sample": 2})
    with pytest.raises(ConfigError, match="unknown transform 'rand_augmnt'.*did you mean 'rand_augment'"):
        _recipe("t", tmp_path, transforms=[["rand_augmnt", {}]])
    with pytest.raises(ConfigError, match=r"transforms\[0\]' \(rand_augment\).*magnitude"):
        _recipe("t", tmp_path, transforms={"rand_augment": {"magnitude": 40}})
    with pytest.raises(ConfigError, match="unexpected keyword argument 'sise'"):
        _recipe("t", tmp_path, transforms=[["random_resized_crop", {"sise": 8}]])
    with pytest.raises(ConfigError, match="appear once"):
        _recipe("t", tmp_path, transforms=["mixup", "mixup"])
    with pytest.raises(ConfigError, match="must equal data.image_size 8"):
        _recipe("t", tmp_path, transforms=[["random_resized_crop", {"size": 16}]])
    with pytest.raises(ConfigError, match="'transforms' is required"):
        reinforce_recipe_from_mapping({k: v for k, v in _mapping("t", tmp_path).items() if k != "transforms"})
    with pytest.raises(ConfigError, match="at least one teacher"):
        _recipe("t", tmp_path, teachers=[])
    with pytest.raises(ConfigError, match="'device' must be one of"):
        _recipe("t", tmp_path, device="tpu")


def test_the_digits_recipe_loads_with_the_registry_order():
    recipe = load_reinforce_recipe("recipes/kd/reinforce_digits.yaml")
    names = [t.name for t in recipe.pipeline().transforms]
    assert names == ["random_resized_crop", "rand_augment", "random_erasing", "mixup", "cutmix"]
    assert (recipe.num_samples, recipe.top_k, recipe.data.image_size) == (8, 3, 32)


def test_run_writes_shards_holding_the_teachers_topk_on_replayed_images(built):
    teacher, out, summary = built
    assert summary["complete"] and summary["shards"] == summary["shards_written"] == 3
    assert summary["dataset_name"] == TAG and summary["bytes"] > 0
    assert (out / "reinforced_grid.png").is_file() and (out / "reinforce_recipe.yaml").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset_name"] == TAG and manifest["dataset_size"] == 1437
    assert [name for name, _ in manifest["pipeline"]] == ["random_resized_crop", "rand_augment"]
    replay = ReinforcedDataset(build_dataset("digits", image_size=8), out, dataset_name=TAG)
    model = load_classifier(str(teacher), num_classes=10, in_chans=1)
    for idx in (0, 700, 1436):
        image, _ = replay.replay(idx, 0)
        probs = torch.softmax(model(image[None]), dim=-1)[0]
        entry = replay.entries(idx)[0]
        torch.testing.assert_close(entry["values"], probs.topk(3).values)
        assert set(entry["ids"].tolist()) == set(probs.topk(3).indices.tolist())


def test_killed_run_resumes_to_byte_identical_shards(built, tmp_path):
    teacher, full, _ = built
    recipe = _recipe(teacher, tmp_path / "killed")
    first = run_reinforce_recipe(recipe, progress=False, max_shards=1)
    assert not first["complete"] and first["shards_written"] == 1
    assert not (tmp_path / "killed" / "reinforced_grid.png").exists()
    second = run_reinforce_recipe(recipe, progress=False)
    assert second["complete"] and second["shards_written"] == 2
    for shard in full.glob("shard_*.safetensors"):
        assert (tmp_path / "killed" / shard.name).read_bytes() == shard.read_bytes()


def test_teacher_with_another_class_count_is_refused_before_work(tmp_path):
    teacher = _teacher_dir(tmp_path / "five", num_classes=5)
    with pytest.raises(TeacherError, match="predicts 5 classes but 10 are expected"):
        run_reinforce_recipe(_recipe(teacher, tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_directory_of_another_dataset_is_refused(built, tmp_path):
    teacher, full, _ = built
    other = tmp_path / "other"
    shutil.copytree(full, other)
    recipe = _recipe(teacher, other, data={"name": "digits", "image_size": 8, "resize": "resize"})
    with pytest.raises(ValueError, match="dataset_name: 'digits:train:8:pad:1ch' -> 'digits:train:8:resize:1ch'"):
        run_reinforce_recipe(recipe, progress=False)


def test_every_shard_records_the_full_provenance(built):
    teacher, full, _ = built
    manifest = json.loads((full / "manifest.json").read_text())
    digest = hashlib.sha256((teacher / "model.safetensors").read_bytes()).hexdigest()
    assert manifest["teachers"] == [{"name": "test_resnet", "kwargs": {"num_classes": 10, "in_chans": 1},
                                     "sha256": digest}]
    assert (manifest["temperature"], manifest["seed"], manifest["num_samples"], manifest["top_k"]) == (1.0, 3, 1, 3)
    assert manifest["dataset_name"] == TAG and [n for n, _ in manifest["pipeline"]] == ["random_resized_crop",
                                                                                         "rand_augment"]
    for shard in sorted(full.glob("shard_*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            assert json.loads(f.metadata()["genforge_reinforce"]) == manifest


def _refuse_teachers(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a directory of another run must be refused before a teacher is loaded")

    monkeypatch.setattr(genforge.kd.reinforce.recipe, "load_classifier", refuse)


def test_a_rerun_with_other_settings_is_refused_naming_every_differing_key(built, tmp_path, monkeypatch):
    teacher, full, _ = built
    other_teacher = _teacher_dir(tmp_path / "other_teacher", steps=1)
    copy = tmp_path / "copy"
    shutil.copytree(full, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    _refuse_teachers(monkeypatch)
    with pytest.raises(ValueError, match=r"other settings \(num_samples: 1 -> 2; seed: 3 -> 4; "
                                         r"temperature: 1.0 -> 2.0; recorded -> this run\)"):
        run_reinforce_recipe(_recipe(teacher, copy, seed=4, temperature=2.0, num_samples=2), progress=False)
    with pytest.raises(ValueError, match=r"teachers: \[\{'kwargs'.*'sha256': '[0-9a-f]{64}'\}\] -> "):
        run_reinforce_recipe(_recipe(other_teacher, copy), progress=False)
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before  # nothing written


@pytest.mark.parametrize("change, key", [({"num_samples": 2}, "num_samples: 2 -> 1"), ({"seed": 4}, "seed: 4 -> 3")])
def test_a_foreign_shard_is_refused_when_building_and_before_a_student_trains(built, tmp_path, monkeypatch,
                                                                             change, key):
    """A shard of a run with another NS used to pass until an IndexError inside training."""
    teacher, full, _ = built
    run_reinforce_recipe(_recipe(teacher, tmp_path / "foreign", **change), progress=False, max_shards=1)
    mixed = tmp_path / "mixed"
    shutil.copytree(full, mixed)
    shutil.copy(tmp_path / "foreign" / "shard_00000.safetensors", mixed / "shard_00000.safetensors")
    with pytest.raises(ConfigError, match=f"shard_00000.safetensors comes from another run .*{key}"):
        ReinforcedMethod(_student(tmp_path / "student", mixed)).train_dataset()
    _refuse_teachers(monkeypatch)
    with pytest.raises(ValueError, match=f"shard_00000.safetensors comes from another run .*{key}"):
        run_reinforce_recipe(_recipe(teacher, mixed), progress=False)


def test_an_output_dir_that_is_a_file_is_refused_before_work(built, tmp_path, monkeypatch):
    (tmp_path / "out").write_text("")
    _refuse_teachers(monkeypatch)
    with pytest.raises(ValueError, match="output directory .*out' is a file"):
        run_reinforce_recipe(_recipe(built[0], tmp_path / "out"), progress=False)


def test_a_damaged_shard_is_named_before_a_student_trains(built, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(built[1], damaged)
    (damaged / "shard_00002.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ConfigError, match="shard .*shard_00002.safetensors is not a readable safetensors file"):
        ReinforcedMethod(_student(tmp_path / "student", damaged)).train_dataset()


def test_cli_reports_and_exits_2_on_errors(built, tmp_path, capsys):
    teacher, _, _ = built
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(_mapping(teacher, tmp_path / "cli")))
    assert cli_main(["reinforce", str(path), "--no-progress", "--max-shards", "0", "--set", "top_k=2"]) == 0
    assert "0/3 shards incomplete" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "manifest.json").read_text())["top_k"] == 2
    assert cli_main(["reinforce", str(path), "--set", "top_k=11", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "top_k=11 exceeds the 10 classes" in err and err.count("\n") == 1


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("damage", ["truncated weights", "pickled code", "config not JSON", "kwargs that do not fit"])
def test_damaged_teachers_are_one_line_errors_naming_them(tmp_path, capsys, damage):
    run = _teacher_dir(tmp_path / "teacher", steps=0)
    weights, named = run / "model.safetensors", run / "model.safetensors"
    teacher = str(run)
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "pickled code":
        named = tmp_path / "teacher.pt"
        named.write_bytes(pickle.dumps({"weight": _Payload(str(tmp_path / "ran"))}))
        teacher = {"name": "test_resnet", "file": str(named)}
    elif damage == "config not JSON":
        named = run / "model_config.json"
        named.write_text("{")
    else:
        teacher = {"name": "test_resnet", "file": str(weights), "kwargs": {"bogus": 1}}
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(_mapping("t", tmp_path / "out", teachers=[teacher])))
    status = cli_main(["reinforce", str(path), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("error: ") and "\n" not in err, err
    assert str(named) in err and ("bogus" in err) == (damage == "kwargs that do not fit")
    assert not (tmp_path / "ran").exists()  # the pickled code never ran
    assert not (tmp_path / "out").exists()


def _student(out_dir, reinforced_dir, **model):
    return recipe_from_dict({
        "method": "reinforced", "seed": 0, "output_dir": str(out_dir),
        "data": {"name": "digits", "image_size": 8, "batch_size": 32},
        "model": {"name": "test_resnet", "reinforced_dir": str(reinforced_dir), **model},
        "train": {"max_steps": 30, "lr": 3e-3, "log_every": 5, "ema_decay": 0.5, "checkpoint_every": 100},
        "eval": {"batch_size": 360},
    })


def test_student_trains_from_the_directory_without_any_teacher(built, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("no teacher may be built or called when training a reinforced student")

    for module in (genforge.kd.teachers, genforge.kd.reinforce.recipe):
        monkeypatch.setattr(module, "load_classifier", refuse)
    monkeypatch.setattr(genforge.kd.ensemble.TeacherEnsemble, "forward", refuse)
    result = train(_student(tmp_path / "student", built[1]))
    rows = [json.loads(line) for line in (result.output_dir / "train_log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows]
    assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2])
    assert result.metrics["test_accuracy"] > 0.3  # chance is 0.1
    config = json.loads((result.output_dir / "model_config.json").read_text())
    assert config == {"model_name": "test_resnet", "num_classes": 10, "in_chans": 1}


def test_student_items_are_replays_with_densified_targets(built, tmp_path):
    data = ReinforcedMethod(_student(tmp_path, built[1], p_replay=1.0)).train_dataset()
    image, target = data[5]
    assert image.shape == (1, 8, 8) and target.sum() == pytest.approx(1.0)
    assert (target > 0).all()  # 'smooth': the leftover mass covers the other classes
    onehot = ReinforcedMethod(_student(tmp_path, built[1], p_replay=0.0)).train_dataset()
    assert torch.equal(onehot[5][1], torch.nn.functional.one_hot(torch.tensor(onehot.dataset[5][1]), 10).float())
    raw = onehot.dataset[5][0]
    torch.manual_seed(0)
    assert not all(torch.equal(onehot[5][0], raw) for _ in range(4))  # augmented afresh, as ml-dr
    plain = ReinforcedMethod(_student(tmp_path, built[1], p_replay=0.0, augment_original=False)).train_dataset()
    assert all(torch.equal(plain[5][0], raw) for _ in range(4))


def test_student_recipe_errors(built, tmp_path):
    with pytest.raises(ConfigError, match="model.reinforced_dir is required"):
        recipe_from_dict({"method": "reinforced", "model": {"name": "test_resnet"}})
    with pytest.raises(ConfigError, match="holds no manifest.json"):
        _student(tmp_path, tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="unknown key 'model.label_smoothing'"):
        _student(tmp_path, built[1], label_smoothing=0.1)
    with pytest.raises(ConfigError, match="model.densify must be"):
        _student(tmp_path, built[1], densify="dense")
    with pytest.raises(ConfigError, match="model.augment_original must be true or false, got 'yes'"):
        _student(tmp_path, built[1], augment_original="yes")
    other = _student(tmp_path, built[1])
    other.data.resize = "resize"
    with pytest.raises(ConfigError, match="data section must match"):
        ReinforcedMethod(other).train_dataset()


def test_a_missing_shard_is_a_clear_file_not_found_error(built, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(built[1], copy)
    method = ReinforcedMethod(_student(tmp_path, copy))
    lazy = method.train_dataset()
    (copy / "shard_00001.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"model.reinforced_dir: .*shards \[1\] of 3 are missing"):
        method.train_dataset()
    with pytest.raises(FileNotFoundError, match="shard 1 .* is missing or unfinished"):
        lazy.replay(600, 0)
