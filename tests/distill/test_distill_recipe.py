"""`genforge distill RECIPE`: recipes load strictly, runs write their outputs and resume."""

import json
from pathlib import Path

import pytest
import yaml

from genforge.cli import main
from genforge.config import ConfigError
from genforge.distill import SyntheticSet
from genforge.distill.recipe import load_distill_recipe, recipe_from_mapping

RECIPES = sorted(Path(__file__).parents[2].joinpath("recipes", "distill").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    recipe = load_distill_recipe(path)
    recipe.engine_options().check()


def _tiny(tmp_path, method, **distill):
    options = {"dwa": {"iterations": 3, "teacher_width": 8, "teacher_epochs": 2, "jitter": 1}}.get(
        method, {"iterations": 3, "net_width": 8, "net_depth": 2, "batch_real": 8})
    if method == "random":
        options = {}
    raw = {"method": method, "seed": 0, "output_dir": str(tmp_path / method),
           "distill": {"ipc": 1, "options": options, **distill},
           "eval": {"num_eval": 2, "epochs": 3, "net_width": 8, "soft": "teacher" if method == "dwa" else "none"}}
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("method", ["datadam", "dwa"])
def test_cli_distils_saves_draws_and_evaluates(tmp_path, capsys, method):
    assert main(["distill", str(_tiny(tmp_path, method)), "--no-progress"]) == 0
    out = tmp_path / method
    syn = SyntheticSet.load(out / "synthetic_set.safetensors")
    assert syn.method == method and syn.images.shape == (10, 1, 8, 8)
    assert (syn.soft_labels is not None) == (method == "dwa")
    assert (out / "synthetic_grid.png").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["accuracies"]) == 2
    assert "test accuracy" in capsys.readouterr().out


def test_cli_resume_continues_a_run(tmp_path):
    path = _tiny(tmp_path, "dm")
    assert main(["distill", str(path), "--no-progress"]) == 0
    assert main(["distill", str(path), "--no-progress", "--resume", "--set", "distill.options.iterations=5"]) == 0
    first = SyntheticSet.load(tmp_path / "dm" / "synthetic_set.safetensors")
    assert first.extra["options"]["iterations"] == 5


@pytest.mark.parametrize("raw, message", [
    ({"method": "dataddam"}, "unknown method 'dataddam'"),
    ({"method": "dm", "distill": {"ipcs": 1}}, "unknown key 'distill.ipcs'"),
    ({"method": "dm", "distill": {"options": {"powr": 4}}}, "unknown key 'distill.options.powr'"),
    ({"method": "datadam", "distill": {"options": {"power": "four"}}}, "'distill.options.power' must be float"),
    ({"method": "dm", "eval": {"soft": "teacher"}}, "relabels with DWA's teacher"),
    ({"method": "dm", "data": {"name": "mnist"}}, "unknown dataset"),
    ({"method": "dm", "distill": {"ipc": 0}}, "'distill.ipc' must be >= 1"),
])
def test_bad_recipes_are_refused_at_load(raw, message):
    with pytest.raises(ConfigError, match=message):
        recipe_from_mapping(raw)


def test_two_processes_split_the_classes_and_reproduce_one_process(tmp_path):
    """torchrun with 2 CPU processes (what accelerate does on 2 GPUs) gives the single-process set."""
    import os
    import subprocess
    import sys

    import torch

    path = _tiny(tmp_path, "datadam")
    assert main(["distill", str(path), "--no-progress", "--output-dir", str(tmp_path / "one")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "genforge.distill",
                    str(path), "--no-progress", "--output-dir", str(tmp_path / "two")],
                   check=True, env=env, capture_output=True, timeout=300)
    one = SyntheticSet.load(tmp_path / "one" / "synthetic_set.safetensors")
    two = SyntheticSet.load(tmp_path / "two" / "synthetic_set.safetensors")
    assert sorted(p.name for p in (tmp_path / "two" / "parts").iterdir()) == ["part_0.safetensors", "part_1.safetensors"]
    assert torch.equal(one.labels, two.labels)
    torch.testing.assert_close(one.images, two.images)
