"""The training loop: loss falls, resume is exact, accumulation is a bigger batch, budgets hold.

The toy method regresses a fixed random smooth target with a small MLP; it perturbs the
inputs with noise from torch's global RNG, so a resume that failed to restore the RNG (or
the data order) would change the weights.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from genforge.config import ConfigError, check_known_keys, recipe_from_dict
from genforge.train import CheckpointError, Method, list_checkpoints, register_method, train
from genforge.train.loop import _lr_factor

TOY = "toy_regression_train_loop_tests"


@register_method(TOY)
class ToyRegression(Method):
    def validate_model_config(self, model_cfg):
        check_known_keys(model_cfg, ["hidden", "noise_std"], "model", "toy recipe")

    def build_model(self):
        hidden = self.recipe.model.get("hidden", 16)
        return torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(),
                                   torch.nn.Linear(hidden, 2))

    def train_dataset(self):
        gen = torch.Generator().manual_seed(1234)
        x = torch.randn(40, 4, generator=gen)
        y = torch.sin(0.5 * x @ torch.randn(4, 2, generator=gen))
        return torch.utils.data.TensorDataset(x, y)

    def training_step(self, model, batch):
        x, y = batch
        noise_std = self.recipe.model.get("noise_std", 0.1)
        if noise_std:
            x = x + noise_std * torch.randn_like(x)
        loss = F.mse_loss(model(x), y)
        return loss, {"mse": loss.detach()}

    def on_train_end(self, ema_model, accelerator, output_dir):
        x, y = self.train_dataset().tensors
        with torch.no_grad():
            return {"ema_mse": F.mse_loss(ema_model(x), y).item()}


def make_recipe(output_dir, batch_size=6, model=None, **train):
    settings = {"max_steps": 10, "lr": 1e-2, "log_every": 5, "checkpoint_every": 100,
                "ema_decay": 0.9, **train}
    return recipe_from_dict({"method": TOY, "seed": 7, "output_dir": str(output_dir),
                             "data": {"batch_size": batch_size}, "model": model or {},
                             "train": settings}, source="test recipe")


def final_weights(output_dir):
    return (load_file(str(output_dir / "model" / "model.safetensors")),
            load_file(str(output_dir / "ema" / "model.safetensors")))


def test_loss_falls_and_run_dir_records_everything(tmp_path):
    result = train(make_recipe(tmp_path, batch_size=8, max_steps=60, log_every=10))
    rows = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert all(r["images_per_s"] > 0 and "mse" in r for r in rows)
    assert result.steps == 60 and isinstance(result.final_loss, float)
    assert json.loads((tmp_path / "metrics.json").read_text()) == result.metrics
    assert result.metrics["ema_mse"] < rows[0]["loss"]
    assert (tmp_path / "recipe.yaml").is_file()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000060"]


def test_resume_after_kill_is_bitwise_identical_to_uninterrupted_run(tmp_path):
    # 40 items / batch 6 -> 6 micro-batches per epoch; grad_accum 2 -> 3 steps per epoch.
    # The kill lands mid-epoch (after step 4 = micro-batch 8) and the run crosses epochs.
    common = dict(grad_accum=2, warmup_steps=3, weight_decay=0.01, grad_clip=1.0,
                  checkpoint_every=4, keep_checkpoints=3)
    straight = train(make_recipe(tmp_path / "straight", max_steps=10, **common))

    killed_dir = tmp_path / "killed"
    train(make_recipe(killed_dir, max_steps=7, **common))
    assert [p.name for p in list_checkpoints(killed_dir)] == ["step_0000004", "step_0000007"]
    for lost in list_checkpoints(killed_dir)[1:]:  # the kill came after checkpoint 4
        for f in lost.iterdir():
            f.unlink()
        lost.rmdir()
    resumed = train(make_recipe(killed_dir, max_steps=10, **common), resume=True)

    assert resumed.resumed_from == 4 and resumed.steps == straight.steps == 10
    assert resumed.final_loss == straight.final_loss
    model_a, ema_a = final_weights(tmp_path / "straight")
    model_b, ema_b = final_weights(killed_dir)
    for name in model_a:
        assert torch.equal(model_a[name], model_b[name]), name
        assert torch.equal(ema_a[name], ema_b[name]), name
    assert not all(torch.equal(model_a[n], ema_a[n]) for n in model_a)
    log_lines = (killed_dir / "train_log.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in log_lines]
    assert steps == [5, 10]  # the killed run's lines after step 4 were dropped


def test_two_micro_batches_of_b_equal_one_batch_of_2b(tmp_path):
    kwargs = dict(max_steps=3, warmup_steps=1, model={"noise_std": 0.0})
    train(make_recipe(tmp_path / "big", batch_size=8, grad_accum=1, **kwargs))
    train(make_recipe(tmp_path / "accum", batch_size=4, grad_accum=2, **kwargs))
    model_a, ema_a = final_weights(tmp_path / "big")
    model_b, ema_b = final_weights(tmp_path / "accum")
    for name in model_a:
        torch.testing.assert_close(model_a[name], model_b[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ema_a[name], ema_b[name], rtol=1e-5, atol=1e-6)


def test_wall_time_cap_stops_checkpoints_and_says_loudly_that_it_cut_training(tmp_path, capsys):
    with pytest.warns(UserWarning, match="CUT TRAINING SHORT at step 1 of 1000"):
        result = train(make_recipe(tmp_path, max_steps=1000, max_minutes=0.0))
    assert result.stopped_by_time and result.steps == 1
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000001"]
    assert "WARNING: train.max_minutes=0.0 CUT TRAINING SHORT" in capsys.readouterr().out
    recorded = json.loads((tmp_path / "metrics.json").read_text())["stopped_by_time"]
    assert recorded == {"step": 1, "max_steps": 1000, "max_minutes": 0.0}


def test_a_run_that_finishes_its_steps_records_no_cut(tmp_path):
    result = train(make_recipe(tmp_path, max_steps=3, max_minutes=60.0))
    assert not result.stopped_by_time and result.steps == 3
    assert "stopped_by_time" not in json.loads((tmp_path / "metrics.json").read_text())


def test_resume_skips_a_damaged_newest_checkpoint_and_resume_from_names_one(tmp_path):
    from genforge.train.__main__ import main

    common = dict(checkpoint_every=2, keep_checkpoints=3)
    straight = train(make_recipe(tmp_path / "straight", max_steps=6, **common))
    run = tmp_path / "run"
    train(make_recipe(run, max_steps=4, **common))
    newest = list_checkpoints(run)[-1]
    (newest / "ema.safetensors").write_bytes(b"torn")
    resumed = train(make_recipe(run, max_steps=6, **common), resume=True)
    assert resumed.resumed_from == 2 and resumed.final_loss == straight.final_loss

    # --resume-from: an explicit checkpoint, used as is (a damaged one is an error, not skipped)
    from_ckpt = tmp_path / "from"
    train(make_recipe(from_ckpt, max_steps=4, **common))
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(json.dumps({"method": TOY, "seed": 7, "output_dir": str(from_ckpt),
                                       "data": {"batch_size": 6},
                                       "train": {"max_steps": 6, "lr": 1e-2, "log_every": 5,
                                                 "ema_decay": 0.9, **common}}))
    step2 = list_checkpoints(from_ckpt)[0]
    assert main([str(recipe_file), "--resume-from", str(step2)]) == 0
    assert final_weights(from_ckpt)[0].keys() == final_weights(tmp_path / "straight")[0].keys()
    for name, tensor in final_weights(tmp_path / "straight")[0].items():
        assert torch.equal(final_weights(from_ckpt)[0][name], tensor), name
    (step2 / "manifest.json").unlink()
    assert main([str(recipe_file), "--resume-from", str(step2)]) == 2
    assert main([str(recipe_file), "--resume-from", str(tmp_path / "nowhere")]) == 2


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found in"):
        train(make_recipe(tmp_path), resume=True)


def test_fresh_run_refuses_to_mix_with_an_existing_run_but_auto_resume_continues(tmp_path):
    train(make_recipe(tmp_path, max_steps=2))
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(make_recipe(tmp_path, max_steps=4))
    result = train(make_recipe(tmp_path, max_steps=4), resume="auto")
    assert result.resumed_from == 2 and result.steps == 4
    assert train(make_recipe(tmp_path / "new", max_steps=1), resume="auto").resumed_from is None


def test_resume_refuses_changed_settings_that_alter_the_result_naming_each_key(tmp_path):
    train(make_recipe(tmp_path, max_steps=2, checkpoint_every=1))
    recorded = (tmp_path / "recipe.yaml").read_text()
    changed = make_recipe(tmp_path, batch_size=4, max_steps=4, lr=0.5, model={"hidden": 8})
    with pytest.raises(ConfigError) as err:
        train(changed, resume=True)
    message = str(err.value)
    for key in ("data.batch_size: 6 -> 4", "train.lr: 0.01 -> 0.5", "model.hidden: None -> 8"):
        assert key in message
    assert "train.max_steps" not in message.split("Keys a resume may change")[0]
    assert (tmp_path / "recipe.yaml").read_text() == recorded  # still describes the run
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000001", "step_0000002"]


def test_resume_records_the_harmless_changes_it_allows(tmp_path):
    train(make_recipe(tmp_path, max_steps=2))
    result = train(make_recipe(tmp_path, max_steps=4, log_every=1), resume=True)
    assert result.steps == 4
    rows = [json.loads(line) for line in (tmp_path / "resumes.jsonl").read_text().splitlines()]
    assert rows == [{"resumed_at_step": 2, "changed": {"train.log_every": [5, 1],
                                                       "train.max_steps": [2, 4]}}]
    assert "log_every: 1" in (tmp_path / "recipe.yaml").read_text()


def test_resume_reads_a_setting_the_recorded_recipe_predates_at_its_default(tmp_path):
    """A run recorded before a setting existed (here sample.prompts, added later) resumes unchanged."""
    import yaml

    train(make_recipe(tmp_path, max_steps=2))
    recorded = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert recorded["sample"].pop("prompts") == []
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recorded))
    assert train(make_recipe(tmp_path, max_steps=3), resume=True).steps == 3
    assert "prompts" not in (tmp_path / "resumes.jsonl").read_text()


@pytest.mark.parametrize("as_file", ["", "checkpoints"])
def test_an_output_or_checkpoint_path_that_is_a_file_is_refused_before_training(tmp_path, as_file):
    out = tmp_path / "run"
    target = out / as_file if as_file else out
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("not a folder")
    with pytest.raises(CheckpointError, match=f"{target} is a file"):
        train(make_recipe(out, max_steps=2))
    if as_file:  # the run folder exists: nothing was trained or logged into it
        assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]


def test_lr_factor_warms_up_then_steps_down_at_each_milestone():
    factor = _lr_factor(2, milestones=[5, 8], gamma=0.1)
    values = [factor(s) for s in range(10)]
    assert values[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert values[4] == 1.0 and values[5] == pytest.approx(0.1) and values[8] == pytest.approx(0.01)
