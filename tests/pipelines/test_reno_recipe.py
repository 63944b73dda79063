"""`genforge reno RECIPE --prompts FILE`: ReNO over a prompt file, from saved pipelines and
reward directories, writing images, per-prompt rewards and the initial-vs-optimised PNG."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny_reno_models import tiny_clip_model, tiny_sd_pipeline
from diffusers import DDIMScheduler, UNet2DModel
from PIL import Image

from genforge.cli import main
from genforge.pipelines import ClassConditionalPipeline
from genforge.pipelines.reno import latent_shape
from genforge.pipelines.reno_recipe import load_reno_recipe
from genforge.rewards import load

RECIPES = Path(__file__).parents[2] / "recipes" / "reno"


def write_recipe(tmp_path, pipeline, rewards, **extra):
    recipe = {"pipeline": str(pipeline), "rewards": rewards, "output_dir": str(tmp_path / "out"),
              "optimize": {"n_iters": 4, "num_inference_steps": 2, "grad_clip": 1.0}, **extra}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path / "recipe.yaml"


def test_digits_prompts_give_images_rewards_and_a_side_by_side_png(tmp_path):
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=8,
                        num_class_embeds=11)
    ClassConditionalPipeline(model=model, scheduler=DDIMScheduler(clip_sample=False)).save_pretrained(tmp_path / "pipeline")
    (tmp_path / "prompts.txt").write_text("3\n7\n\n1\n")
    recipe = write_recipe(tmp_path, tmp_path / "pipeline", {"digits-cnn": 1.0}, batch_size=2)
    assert main(["reno", str(recipe), "--prompts", str(tmp_path / "prompts.txt"), "--no-progress"]) == 0
    out = tmp_path / "out"
    records = json.loads((out / "rewards.json").read_text())
    assert [r["prompt"] for r in records] == [3, 7, 1]
    assert all(r["best"]["total"] <= r["initial"]["total"] for r in records)
    assert Image.open(out / "images" / "0002.png").size == (8, 8)
    assert Image.open(out / "side_by_side.png").size == (2 * 64 + 3 * 2, 3 * 64 + 4 * 2)  # 3 rows: initial | best


def test_unconditional_renders_the_null_class_and_rewards_the_prompt_class(tmp_path, clip_tokenizer):
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=8,
                        num_class_embeds=11)
    pipe = ClassConditionalPipeline(model=model, scheduler=DDIMScheduler(clip_sample=False))
    pipe.save_pretrained(tmp_path / "pipeline")
    (tmp_path / "prompts.txt").write_text("3\n7\n")
    recipe = write_recipe(tmp_path, tmp_path / "pipeline", {"digits-cnn": 1.0}, batch_size=2, unconditional=True)
    assert main(["reno", str(recipe), "--prompts", str(tmp_path / "prompts.txt"), "--no-progress"]) == 0
    records = json.loads((tmp_path / "out" / "rewards.json").read_text())
    z = torch.randn(latent_shape(pipe, 2), generator=torch.Generator().manual_seed(0))  # the recipe's seed 0
    null = pipe(class_labels=[10, 10], latents=z, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="pt", return_dict=False)[0]
    with torch.no_grad():
        expected = load("digits-cnn").loss(null, [3, 7])
    assert [r["initial"]["total"] for r in records] == pytest.approx(expected.tolist(), abs=1e-5)
    tiny_sd_pipeline(clip_tokenizer).save_pretrained(tmp_path / "sd")
    recipe = write_recipe(tmp_path, tmp_path / "sd", {"digits-cnn": 1.0}, unconditional=True)
    assert main(["reno", str(recipe), "--prompts", str(tmp_path / "prompts.txt"), "--no-progress"]) == 2


def test_a_saved_text_to_image_pipeline_runs_with_rewards_from_a_weights_dir(tmp_path, clip_tokenizer):
    tiny_sd_pipeline(clip_tokenizer).save_pretrained(tmp_path / "sd")
    model = tiny_clip_model()
    model.save_pretrained(tmp_path / "rewards" / "clip")
    clip_tokenizer.save_pretrained(tmp_path / "rewards" / "clip")
    (tmp_path / "prompts.txt").write_text("a red cat\n")
    recipe = write_recipe(tmp_path, tmp_path / "sd", {"clip": 1.0}, weights_dir=str(tmp_path / "rewards"))
    assert main(["reno", str(recipe), "--prompts", str(tmp_path / "prompts.txt"), "--no-progress"]) == 0
    (record,) = json.loads((tmp_path / "out" / "rewards.json").read_text())
    assert record["prompt"] == "a red cat" and record["best"]["clip"] <= record["initial"]["clip"]


def test_a_missing_pipeline_is_trained_first_by_the_named_train_recipe(tmp_path, capsys):
    train = {"method": "dimr", "seed": 0, "output_dir": "ignored: reno sets it",
             "data": {"name": "digits", "image_size": 8, "batch_size": 16},
             "model": {"config": "digits_tiny"},
             "train": {"max_steps": 2, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1},
             "sample": {"num_per_class": 1, "steps": 2}, "eval": {"num_samples": 10}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    (tmp_path / "prompts.txt").write_text("5\n")
    run_dir = tmp_path / "runs" / "dimr"
    recipe = write_recipe(tmp_path, run_dir / "pipeline", {"digits-cnn": 1.0}, train_recipe=str(tmp_path / "train.yaml"))
    assert main(["reno", str(recipe), "--prompts", str(tmp_path / "prompts.txt"), "--no-progress"]) == 0
    assert f"{run_dir / 'pipeline'} not found: training it with" in capsys.readouterr().out
    assert (run_dir / "checkpoints" / "step_0000002").is_dir()  # the training run, 2 steps, wrote the pipeline ...
    assert json.loads((run_dir / "pipeline" / "model_index.json").read_text())["_class_name"] == "DiMRPipeline"
    (record,) = json.loads((tmp_path / "out" / "rewards.json").read_text())  # ... and ReNO ran on it
    assert record["prompt"] == 5 and record["best"]["total"] <= record["initial"]["total"]
    train["model"]["config"] = "no-such-size"  # a training run that fails stops the ReNO run with one line
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    recipe = write_recipe(tmp_path, tmp_path / "other" / "pipeline", {"digits-cnn": 1.0},
                          train_recipe=str(tmp_path / "train.yaml"))
    assert main(["reno", str(recipe), "--prompts", str(tmp_path / "prompts.txt"), "--no-progress"]) == 2
    assert f"training {tmp_path / 'train.yaml'} failed" in capsys.readouterr().err


def test_the_shipped_recipes_load_and_bad_ones_fail_in_one_line(tmp_path, capsys):
    for path in RECIPES.glob("*.yaml"):
        load_reno_recipe(path)
    recipe = write_recipe(tmp_path, tmp_path / "nowhere" / "pipeline", {"hps": 1.0})
    assert main(["reno", str(recipe), "--prompts", "x.txt"]) == 2
    assert "rewards must map registered reward names" in capsys.readouterr().err
    recipe = write_recipe(tmp_path, tmp_path / "nowhere" / "pipeline", {"digits-cnn": 1.0})
    assert main(["reno", str(recipe), "--prompts", "x.txt"]) == 2
    assert "has no model_index.json" in capsys.readouterr().err
