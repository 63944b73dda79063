"""Reruns never lose a distillation run's state, and bad input is one line before any work (issue 12).

- a rerun without --resume over a run's saved state is refused (`--overwrite` starts again);
- DWA's cached teacher is keyed on the settings that made it; DWA batches and the matching
  state record theirs, and a resume with other settings is refused, naming the keys;
- a missing image folder, an ipc above the class count, damaged weight or state files: exit
  status 2, one stderr line naming the value, and no work done.
"""

import json
import os
import pickle

import pytest
import torch
import yaml
from safetensors.torch import save_file

from genforge.cli import main
from genforge.distill import SyntheticSet, distill_dataset, load_real
from genforge.distill.api import resolve_teacher, teacher_settings
from genforge.distill.dwa import DWAOptions
from genforge.distill.state import settings_digest

SMALL = dict(net_width=8, net_depth=2, batch_real=8, dsa_strategy="color_crop_cutout_scale_rotate")
DWA = dict(iterations=2, teacher_width=8, teacher_epochs=1, jitter=1)


def recipe(tmp_path, method="dm", data=None, **distill):
    options = dict(DWA) if method == "dwa" else {"iterations": 4, "checkpoint_every": 2, **SMALL}
    options.update(distill.pop("options", {}))
    raw = {"method": method, "seed": 0, "output_dir": str(tmp_path / "run"), "data": data or {"name": "digits"},
           "distill": {"ipc": 1, "options": options, **distill}, "eval": {"num_eval": 1, "epochs": 1, "net_width": 8}}
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def one_line_error(capsys, status) -> str:
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def test_a_rerun_over_a_killed_run_is_refused_and_overwrite_starts_again(digits, tmp_path, capsys):
    real, _ = digits
    run = tmp_path / "run"
    kwargs = dict(ipc=1, seed=0, progress=False, checkpoint_every=2, **SMALL)
    distill_dataset("dm", real, iterations=2, output_dir=run, **kwargs)  # what a run killed at iteration 2 leaves
    state = (run / "distill_state.safetensors").read_bytes()

    err = one_line_error(capsys, main(["distill", recipe(tmp_path), "--no-progress"]))
    assert "already holds a distillation run's saved state (distill_state.safetensors)" in err
    assert "--resume" in err and "--overwrite" in err
    assert (run / "distill_state.safetensors").read_bytes() == state and not (run / "metrics.json").exists()
    with pytest.raises(ValueError, match="already holds"):  # the python API refuses the same way
        distill_dataset("dm", real, iterations=4, output_dir=run, **kwargs)

    assert main(["distill", recipe(tmp_path), "--no-progress", "--overwrite"]) == 0
    fresh = distill_dataset("dm", real, iterations=4, **kwargs)
    assert torch.equal(SyntheticSet.load(run / "synthetic_set.safetensors").images, fresh.images)
    err = one_line_error(capsys, main(["distill", recipe(tmp_path), "--no-progress"]))  # a finished run too
    assert "synthetic_set.safetensors" in err and "metrics.json" in err


def test_auto_resume_continues_a_saved_run_and_starts_an_empty_one(digits, tmp_path):
    real, _ = digits
    kwargs = dict(ipc=1, seed=0, progress=False, checkpoint_every=2, **SMALL)
    straight = distill_dataset("dm", real, iterations=4, **kwargs)
    distill_dataset("dm", real, iterations=2, output_dir=tmp_path / "a", resume="auto", **kwargs)
    resumed = distill_dataset("dm", real, iterations=4, output_dir=tmp_path / "a", resume="auto", **kwargs)
    assert torch.equal(resumed.images, straight.images)
    with pytest.raises(ValueError, match="exclude each other"):
        distill_dataset("dm", real, iterations=4, output_dir=tmp_path / "a", resume=True, overwrite=True, **kwargs)


def test_the_dwa_teacher_cache_is_keyed_on_the_settings_that_made_it(digits, tmp_path):
    real, _ = digits
    one, two = DWAOptions(**DWA), DWAOptions(**{**DWA, "teacher_epochs": 2})
    first = resolve_teacher(None, real, one, 0, tmp_path, False)
    second = resolve_teacher(None, real, two, 0, tmp_path, False)  # trained anew, not the 1-epoch one
    files = {p.name for p in tmp_path.glob("teacher-*.safetensors")}
    assert files == {f"teacher-{settings_digest(teacher_settings(real, o, 0))}.safetensors" for o in (one, two)}
    assert not torch.equal(first.classifier.weight, second.classifier.weight)
    again = resolve_teacher(None, real, one, 0, tmp_path, False)  # the same settings reuse their teacher
    assert torch.equal(again.classifier.weight, first.classifier.weight)

    cached = tmp_path / f"teacher-{settings_digest(teacher_settings(real, one, 0))}.safetensors"
    settings = dict(teacher_settings(real, one, 0), seed=5)  # a file whose recorded settings do not match
    save_file({k: v.contiguous() for k, v in first.state_dict().items()}, str(cached),
              metadata={"settings": json.dumps(settings)})
    with pytest.raises(ValueError, match=r"differing settings \(saved -> now\): seed: 5 -> 0"):
        resolve_teacher(None, real, one, 0, tmp_path, False)


def test_dwa_batches_made_with_other_settings_are_refused_on_resume(digits, tmp_path):
    real, _ = digits
    kwargs = dict(ipc=2, seed=0, progress=False, **DWA)
    teacher = resolve_teacher(None, real, DWAOptions(**DWA), 0, None, False)
    straight = distill_dataset("dwa", real, teacher=teacher, **kwargs)
    distill_dataset("dwa", real, teacher=teacher, output_dir=tmp_path, **{**kwargs, "ipc": 1})
    with pytest.raises(ValueError, match=r"ipc_0.safetensors belongs to a different run.*options: .*'rho': 0.015"):
        distill_dataset("dwa", real, teacher=teacher, output_dir=tmp_path, resume=True, **{**kwargs, "rho": 0.0})
    other = resolve_teacher(None, real, DWAOptions(**DWA), 1, None, False)
    with pytest.raises(ValueError, match="differing settings .*teacher: "):
        distill_dataset("dwa", real, teacher=other, output_dir=tmp_path, resume=True, **kwargs)
    resumed = distill_dataset("dwa", real, teacher=teacher, output_dir=tmp_path, resume=True, **kwargs)
    assert torch.equal(resumed.images, straight.images)


def test_a_matching_state_of_other_data_is_refused_on_resume(digits, tmp_path):
    real, _ = digits
    kwargs = dict(ipc=1, seed=0, progress=False, checkpoint_every=2, iterations=2, **SMALL)
    distill_dataset("dm", real, output_dir=tmp_path, **kwargs)
    other = load_real("digits", zca=True)[0]  # same shapes, whitened pixels
    with pytest.raises(ValueError, match="differing settings .*data: "):
        distill_dataset("dm", other, output_dir=tmp_path, resume=True, **kwargs)


@pytest.mark.parametrize("key", ["root", "test_root"])
def test_a_missing_image_folder_is_named(tmp_path, capsys, key):
    data = {"name": "image_folder", "root": str(tmp_path), key: "/no/such/folder"}
    err = one_line_error(capsys, main(["distill", recipe(tmp_path, data=data), "--no-progress"]))
    assert f"data.{key}: dataset 'image_folder': root '/no/such/folder' does not exist" in err
    assert not (tmp_path / "run").exists()


def test_dwa_refuses_an_ipc_above_the_class_count_before_training_its_teacher(tmp_path, capsys):
    err = one_line_error(capsys, main(["distill", recipe(tmp_path, "dwa", ipc=200), "--no-progress"]))
    assert "ipc=200 is larger than the number of real images of class(es)" in err
    assert not list(tmp_path.glob("run/teacher-*"))


def test_dwa_refuses_zca_when_the_recipe_loads(tmp_path, capsys):
    err = one_line_error(capsys, main(["distill", recipe(tmp_path, "dwa", data={"name": "digits", "zca": True})]))
    assert "data.zca: DWA clips pixels" in err


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _damage(tmp_path, what):
    """A damaged file on one of distill's loading paths; returns (the file, the extra CLI arguments)."""
    if what == "teacher file (pickled code)":
        path = tmp_path / "teacher.pt"
        path.write_bytes(pickle.dumps({"weight": _Payload(str(tmp_path / "ran"))}))
        return path, ["--set", f"distill.teacher={path}"]
    if what == "teacher file (truncated)":
        path = tmp_path / "teacher.safetensors"
        save_file({"w": torch.zeros(100)}, str(path))
        path.write_bytes(path.read_bytes()[:-50])
        return path, ["--set", f"distill.teacher={path}"]
    if what == "teacher file (other network)":
        path = tmp_path / "teacher.safetensors"
        save_file({"w": torch.zeros(3)}, str(path))
        return path, ["--set", f"distill.teacher={path}"]
    if what == "cached teacher":
        real = load_real("digits")[0]
        name = f"teacher-{settings_digest(teacher_settings(real, DWAOptions(**DWA), 0))}.safetensors"
        path = tmp_path / "run" / name
        path.parent.mkdir()
        path.write_bytes(b"\x00" * 40)
        return path, []
    path = tmp_path / "run" / ("distill_state.safetensors" if what == "matching state" else "dwa_batches/ipc_0.safetensors")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00" * 40)
    return path, ["--resume"]


@pytest.mark.parametrize("what", ["teacher file (pickled code)", "teacher file (truncated)",
                                  "teacher file (other network)", "matching state", "DWA batch", "cached teacher"])
def test_damaged_files_are_one_line_errors_naming_them(tmp_path, capsys, what):
    path, extra = _damage(tmp_path, what)
    method = "dm" if what == "matching state" else "dwa"
    err = one_line_error(capsys, main(["distill", recipe(tmp_path, method), "--no-progress", *extra]))
    assert str(path) in err
    assert not (tmp_path / "ran").exists()  # the pickled code never ran
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_an_output_dir_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "run").write_text("")
    err = one_line_error(capsys, main(["distill", recipe(tmp_path), "--no-progress"]))
    assert f"output_dir '{tmp_path / 'run'}' is a file" in err


def test_resume_with_nothing_saved_is_refused(tmp_path, capsys):
    err = one_line_error(capsys, main(["distill", recipe(tmp_path, "dwa"), "--no-progress", "--resume"]))
    assert "resume=True but there is no distillation state in" in err
    assert not (tmp_path / "run").exists()


def test_a_damaged_synthetic_set_is_named(tmp_path):
    path = tmp_path / "synthetic_set.safetensors"
    path.write_bytes(b"{}")
    with pytest.raises(ValueError, match=f"synthetic set {path} is not a readable safetensors file"):
        SyntheticSet.load(path)
