"""Class-conditional diffusion training on the bundled digits, through the real loop and CLI."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from genforge.cli import main as cli_main
from genforge.config import ConfigError, recipe_from_dict
from genforge.methods.diffusion import DiMRMethod, DiTMethod, UNet2DMethod
from genforge.methods.sampling import sampling_scheduler
from genforge.models.dimr import multiscale_noise_targets
from genforge.core.embed import null_class_of
from genforge.train import train


def digits_recipe(tmp_path, method="dimr", **train_overrides):
    return recipe_from_dict({
        "method": method, "seed": 0, "output_dir": str(tmp_path / method),
        "data": {"name": "digits", "image_size": 8, "batch_size": 64},
        "model": {"config": "digits", "beta_schedule": "linear"},
        "train": {"max_steps": 40, "lr": 2e-3, "warmup_steps": 5, "checkpoint_every": 20, "log_every": 5,
                  "ema_decay": 0.9, **train_overrides},
        "sample": {"num_per_class": 2, "steps": 3, "guidance_scale": 2.0, "scheduler": "dpm++"},
        "eval": {"num_samples": 40, "batch_size": 100},
    })


@pytest.fixture(scope="module")
def trained_dimr(tmp_path_factory):
    """The smallest run that learns the classes: 700 steps of ``digits_tiny`` (about 30 s on one thread).

    Agreement after it, seeds 0-4: 0.95, 0.99, 1.00, 0.85, 1.00 (the official scaled-linear schedule learns
    the classes in about half the steps of the linear one; 500 steps gave 0.46-0.96).
    """
    tmp_path = tmp_path_factory.mktemp("dimr")
    recipe = recipe_from_dict({
        "method": "dimr", "seed": 0, "output_dir": str(tmp_path / "dimr"),
        "data": {"name": "digits", "image_size": 8, "batch_size": 128},
        "model": {"config": "digits_tiny", "beta_schedule": "scaled_linear"},
        "train": {"max_steps": 700, "lr": 2e-2, "warmup_steps": 50, "checkpoint_every": 700, "log_every": 10,
                  "ema_decay": 0.98},
        "sample": {"num_per_class": 2, "steps": 10, "guidance_scale": 5.0, "scheduler": "dpm++singlestep"},
        "eval": {"num_samples": 100, "batch_size": 100},
    })
    torch.manual_seed(0)
    return train(recipe), tmp_path


@pytest.fixture(scope="module")
def trained_dit(tmp_path_factory):
    """diffusers' DiT from DiT's initialisation on digits: 2 blocks of width 32 on 4x4 patches of 2x2, 150 steps."""
    tmp_path = tmp_path_factory.mktemp("dit")
    recipe = recipe_from_dict({
        "method": "dit", "seed": 0, "output_dir": str(tmp_path / "dit"),
        "data": {"name": "digits", "image_size": 8, "batch_size": 64},
        "model": {"config": "digits", "beta_schedule": "scaled_linear",
                  "args": {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "patch_size": 2}},
        "train": {"max_steps": 150, "lr": 3e-3, "warmup_steps": 20, "checkpoint_every": 150, "log_every": 10,
                  "ema_decay": 0.9},
        "sample": {"num_per_class": 1, "steps": 3, "guidance_scale": 2.0, "scheduler": "dpm++"},
        "eval": {"num_samples": 20, "batch_size": 100},
    })
    torch.manual_seed(0)
    return train(recipe)


def logged_losses(result) -> list[float]:
    return [json.loads(line)["loss"] for line in (result.output_dir / "train_log.jsonl").read_text().splitlines()]


def test_dit_baseline_loss_falls_on_digits(trained_dit):
    losses = logged_losses(trained_dit)
    assert np.mean(losses[-3:]) < 0.3 * np.mean(losses[:2])  # measured: 0.98, 0.75 -> 0.17-0.20


def test_dit_step_drops_the_label_once_to_diffusers_null_class(tmp_path):
    method = DiTMethod(digits_recipe(tmp_path, method="dit"))
    model = method.build_model()
    assert null_class_of(model) == 10
    images, labels = torch.randn(64, 1, 8, 8), torch.arange(64) % 10
    torch.manual_seed(7)
    loss, _ = method.training_step(model, (images, labels))
    torch.manual_seed(7)
    dropped = torch.where(torch.rand(64) < 0.1, torch.full_like(labels, 10), labels)
    noise = torch.randn_like(images)
    timesteps = torch.randint(0, 1000, (64,))
    out = model(method.noise_scheduler.add_noise(images, noise, timesteps), timesteps, dropped).sample
    assert (dropped == 10).any() and torch.equal(loss, torch.mean((out - noise) ** 2))


@pytest.mark.parametrize("run, pipeline_class, network", [
    ("dit", "ClassConditionalPipeline", "DiTTransformer2DModel"),
    ("unet2d", "ClassConditionalPipeline", "UNet2DModel"),
    ("dimr", "DiMRPipeline", "DiMRModel"),
])
def test_each_run_saves_the_pipeline_of_its_network_and_genforge_sample_samples_it(
        run, pipeline_class, network, trained_dit, trained_dimr, tmp_path):
    if run == "dit":
        output_dir = trained_dit.output_dir
    elif run == "dimr":
        output_dir = trained_dimr[0].output_dir
    else:
        recipe = digits_recipe(tmp_path, method="unet2d", max_steps=2, checkpoint_every=2)
        recipe.eval.num_samples, recipe.sample.num_per_class = 10, 1
        output_dir = train(recipe).output_dir
    index = json.loads((output_dir / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == pipeline_class and index["model"][1] == network
    npz = tmp_path / "s.npz"
    assert cli_main(["sample", str(output_dir / "pipeline"), "--classes", "3", "7", "--per-class", "2",
                     "--steps", "2", "--out", str(tmp_path / "grid.png"), "--npz", str(npz)]) == 0
    with np.load(npz) as samples:
        assert samples["labels"].tolist() == [3, 3, 7, 7] and samples["images"].shape == (4, 1, 8, 8)
    assert (tmp_path / "grid.png").is_file()


def test_dimr_loss_falls_on_digits(trained_dimr):
    result, _ = trained_dimr
    losses = [json.loads(line)["loss"] for line in (result.output_dir / "train_log.jsonl").read_text().splitlines()]
    assert np.mean(losses[-2:]) < 0.6 * np.mean(losses[:2])


def test_a_run_leaves_a_grid_a_loadable_pipeline_and_its_metrics(trained_dimr):
    result, _ = trained_dimr
    out = result.output_dir
    assert (out / "samples_grid.png").is_file() and (out / "ema" / "config.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classifier_agreement"] > 0.5  # chance is 0.1
    with np.load(out / "samples.npz") as samples:
        assert samples["images"].shape == (100, 1, 8, 8)
        assert np.array_equal(samples["labels"], np.arange(100) % 10)


def test_cli_samples_a_saved_pipeline_and_scores_it(trained_dimr, tmp_path, capsys):
    result, _ = trained_dimr
    grid, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    assert cli_main(["sample", str(result.output_dir / "pipeline"), "--classes", "3", "7", "--per-class", "2",
                     "--steps", "2", "--out", str(grid), "--npz", str(npz)]) == 0
    with np.load(npz) as samples:
        assert samples["labels"].tolist() == [3, 3, 7, 7]
    assert cli_main(["eval", "--fake", str(npz), "--real", "digits:train"]) == 0
    assert "classifier_agreement" in capsys.readouterr().out


def test_dimr_parameter_groups_keep_td_gates_out_of_weight_decay(tmp_path):
    method = DiMRMethod(digits_recipe(tmp_path, weight_decay=0.03))
    model = method.build_model()
    decay, no_decay = method.parameter_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("nodecay" in names[id(p)] for p in no_decay["params"])
    assert no_decay["params"] and decay["weight_decay"] == 0.03


def test_unet_baseline_uses_its_last_class_row_as_the_null_class(tmp_path):
    method = UNet2DMethod(digits_recipe(tmp_path, method="unet2d"))
    model = method.build_model()
    assert null_class_of(model) == 10
    torch.manual_seed(0)
    batch = (torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    loss, _ = method.training_step(model, batch)
    loss.backward()
    assert model.class_embedding.weight.grad[:4].abs().sum() > 0


def test_dimr_step_uses_the_multiscale_targets(tmp_path):
    method = DiMRMethod(digits_recipe(tmp_path))
    model = method.build_model()
    images, labels = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    torch.manual_seed(7)
    loss, _ = method.training_step(model, (images, labels))
    torch.manual_seed(7)
    dropped = torch.rand(3)  # drop_labels draws first, then noise and timesteps
    noise = torch.randn_like(images)
    timesteps = torch.randint(0, 1000, (3,))
    labels = torch.where(dropped < 0.1, torch.full_like(labels, 10), labels)
    out = model(method.noise_scheduler.add_noise(images, noise, timesteps), timesteps, labels).multiscale
    low, high = multiscale_noise_targets(noise, 2)
    expected = 0.25 * torch.mean((out[0] - low) ** 2) + torch.mean((out[1] - high) ** 2)
    assert torch.allclose(loss, expected, atol=1e-6)


@pytest.mark.parametrize("model_section, match", [
    ({"config": "digits", "clas_dropout": 0.1}, "class_dropout"),
    ({"config": "huge"}, "huge"),
    ({"config": "digits", "args": {"norm_typ": "LN"}}, "norm_type"),
    ({"config": "digits", "beta_schedule": "cosine"}, "beta_schedule"),
])
def test_bad_model_sections_are_refused_before_training(tmp_path, model_section, match):
    raw = {"method": "dimr", "output_dir": str(tmp_path), "model": model_section}
    with pytest.raises(ConfigError, match=match):
        recipe_from_dict(raw)


def test_an_unknown_sampler_is_refused_when_the_recipe_loads_not_after_training(tmp_path):
    raw = {"method": "dimr", "output_dir": str(tmp_path), "sample": {"scheduler": "euler"}}
    with pytest.raises(ConfigError, match="euler"):
        recipe_from_dict(raw)


def test_data_that_does_not_fit_the_model_is_refused(tmp_path):
    recipe = digits_recipe(tmp_path)
    recipe.data.image_size = 16
    with pytest.raises(ConfigError, match="16x16"):
        DiMRMethod(recipe).train_dataset()


def test_a_killed_dimr_run_resumes_to_the_same_weights_as_an_uninterrupted_one(tmp_path):
    def run(name, steps, resume=False):
        recipe = digits_recipe(tmp_path / name, max_steps=steps, checkpoint_every=3)
        recipe.data.batch_size = 16
        recipe.eval.num_samples = 10
        recipe.sample.num_per_class = 1
        return train(recipe, resume=resume)

    straight = run("straight", 6)
    run("killed", 3)
    resumed = run("killed", 6, resume=True)
    assert resumed.resumed_from == 3
    for sub in ("model", "ema"):
        a = DiMRMethod.model_class.from_pretrained(straight.output_dir / sub).state_dict()
        b = DiMRMethod.model_class.from_pretrained(resumed.output_dir / sub).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), sub


def official_fast_orders(steps: int) -> list[int]:
    """Orders of DPM-Solver-fast, order 3 (official dpm_solver.py, get_time_steps_for_dpm_solver_fast)."""
    k = steps // 3 + 1
    return {0: [3] * (k - 2) + [2, 1], 1: [3] * (k - 1) + [1], 2: [3] * (k - 1) + [2]}[steps % 3]


@pytest.mark.parametrize("steps", [25, 26, 27, 250])
def test_the_singlestep_sampler_takes_the_official_dpm_solver_fast_updates(steps):
    train_config = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    scheduler = sampling_scheduler("dpm++singlestep", train_config)
    scheduler.set_timesteps(steps)
    official = official_fast_orders(steps)
    assert sum(official) == steps  # the official update of order k spends k evaluations ...
    # ... which diffusers counts one per step: an order-3 update is the steps of orders 1, 2, 3
    assert scheduler.order_list == [k for order in official for k in range(1, order + 1)]
    # the official time-uniform grid n = linspace(N, 1, steps + 1), i.e. t = n - 1, rounded; it ends at n = 1
    grid = np.linspace(999, 0, steps + 1)
    assert np.abs(scheduler.timesteps.numpy() - grid[:-1]).max() <= 0.5 + 1e-9
    abar = scheduler.alphas_cumprod[0]
    assert scheduler.sigmas[-1].item() == pytest.approx(((1 - abar) / abar).sqrt().item())
