"""Diffusion features for classification (Mukhopadhyay et al., arXiv 2307.08702)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file

from genforge.config import ConfigError, load_recipe, read_yaml, recipe_from_dict
from genforge.data import build_dataset
from genforge.methods.diffusion_probe import (DiffusionClassifier, DiffusionProbeMethod, PixelProbe,
                                              default_scheduler, pool_tokens)
from genforge.models.dimr import DiMRModel, dimr_config, timestep_to_tau
from genforge.pipelines.dimr import DiMRPipeline
from genforge.train import train

UNET = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [16, 32], "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 8, "num_class_embeds": 11}


def tiny_dimr() -> DiMRModel:
    torch.manual_seed(0)
    return DiMRModel(**dimr_config("tiny", in_channels=1))  # 4x4 tokens (dim 32), then 8x8 ConvNeXt (dim 16)


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(**UNET)


BACKBONES = {"dimr": (tiny_dimr, "stages.0.blocks.1"), "unet": (tiny_unet, "mid_block")}


@pytest.fixture(scope="module")
def digits():
    data = build_dataset("digits", split="train", image_size=8)
    return data.images[:256], data.labels[:256]


@pytest.mark.parametrize("kind", sorted(BACKBONES))
@pytest.mark.parametrize("head", ["linear", "attention"])
def test_a_training_step_moves_only_the_head(kind, head, digits):
    make, layer = BACKBONES[kind]
    model = DiffusionClassifier(make(), 10, layer, t=50, head=head, pool_size=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    assert model.training and not model.backbone.training
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    F.cross_entropy(model(digits[0][:32]), digits[1][:32]).backward()
    optimizer.step()
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    assert all(not torch.equal(before[k], after[k]) for k in before if k.startswith("head."))


def test_features_are_fixed_by_the_seed_and_move_with_t(digits):
    backbone, x = tiny_dimr(), digits[0][:8]
    features = DiffusionClassifier(backbone, 10, "stages.1.blocks.1", t=50, pool_size=2).features
    torch.testing.assert_close(features(x), features(x), rtol=0, atol=0)
    torch.testing.assert_close(features(x[:3]), features(x)[:3])  # an image's features ignore its batch
    same_seed = DiffusionClassifier(backbone, 10, "stages.1.blocks.1", t=50, pool_size=2).features(x)
    torch.testing.assert_close(features(x), same_seed, rtol=0, atol=0)
    other_seed = DiffusionClassifier(backbone, 10, "stages.1.blocks.1", t=50, pool_size=2, noise_seed=1).features(x)
    later = DiffusionClassifier(backbone, 10, "stages.1.blocks.1", t=400, pool_size=2).features(x)
    assert (features(x) - other_seed).abs().max() > 1e-3 and (features(x) - later).abs().max() > 1e-3


def test_images_are_noised_by_the_ddpm_forward_process(digits):
    model, x0 = DiffusionClassifier(tiny_dimr(), 10, "stages.0.blocks.1", t=300), digits[0][:4]
    eps = model.noise(x0).expand_as(x0)
    expected = default_scheduler().add_noise(x0, eps, torch.full((4,), 300))
    torch.testing.assert_close(model.noised(x0), expected)
    trained_with = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    other = DiffusionClassifier(model.backbone, 10, "stages.0.blocks.1", t=300, scheduler=trained_with)
    assert other.alpha_bar == pytest.approx(float(trained_with.alphas_cumprod[300]))


@torch.no_grad()
def test_the_hooked_block_output_equals_a_manual_forward_of_dimr(digits):
    model, x0 = DiffusionClassifier(tiny_dimr(), 10, "stages.0.blocks.1", t=120), digits[0][:4]
    stage, x_t = model.backbone.stages[0], model.noised(x0)
    tau = timestep_to_tau(torch.full((4,), 120))
    tokens = torch.flatten(stage.embed(x_t), 1, 2)  # (B, 16, D)
    tokens = torch.cat([stage.class_embed(torch.full((4,), 10))[:, None], tokens], dim=1)  # null class token first
    manual = stage.blocks[1](stage.blocks[0](tokens, tau), tau)
    torch.testing.assert_close(model.activation(x0), manual)


@torch.no_grad()
def test_the_hooked_block_output_equals_the_unet_full_forward_activation(digits):
    model, x0 = DiffusionClassifier(tiny_unet(), 10, "down_blocks.0", t=120), digits[0][:4]
    seen = []
    handle = model.backbone.down_blocks[0].register_forward_hook(lambda m, a, out: seen.append(out[0]))
    model.backbone(model.noised(x0), torch.full((4,), 120), class_labels=torch.full((4,), 10))
    handle.remove()
    torch.testing.assert_close(model.activation(x0), seen[0])
    assert model.class_label == 10


def test_pooling_reads_maps_tokens_and_channel_last_maps_alike():
    torch.manual_seed(0)
    grid = torch.randn(2, 6, 4, 4)
    expected = F.adaptive_avg_pool2d(grid, 2).flatten(2).transpose(1, 2)  # (B, 4, 6)
    torch.testing.assert_close(pool_tokens(grid, 2), expected)
    torch.testing.assert_close(pool_tokens(grid.permute(0, 2, 3, 1), 2, channels_last=True), expected)
    tokens = grid.flatten(2).transpose(1, 2)  # (B, 16, 6), row-major
    torch.testing.assert_close(pool_tokens(tokens, 2), expected)
    with_class_token = torch.cat([torch.full((2, 1, 6), 1e3), tokens], dim=1)
    torch.testing.assert_close(pool_tokens(with_class_token, 2), expected)
    torch.testing.assert_close(pool_tokens(grid, None), tokens)
    with pytest.raises(ValueError, match="more positions"):
        pool_tokens(grid, 5)


def test_an_unknown_layer_is_refused_with_the_candidate_blocks():
    listing = r"did you mean 'stages\.0\.blocks\.1'.*candidate blocks: .*stages\.1\.blocks\.2"
    with pytest.raises(ValueError, match=listing):
        DiffusionClassifier(tiny_dimr(), 10, "stages.0.block.1", t=10)
    with pytest.raises(ValueError, match=r"t=1000 must be an int timestep in \[0, 1000\)"):
        DiffusionClassifier(tiny_dimr(), 10, "stages.0.blocks.1", t=1000)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 8, 8\)"):
        DiffusionClassifier(tiny_dimr(), 10, "stages.0.blocks.1", t=10).features(torch.zeros(2, 1, 16, 16))


@pytest.mark.parametrize("make", [lambda: DiffusionClassifier(tiny_dimr(), 10, "stages.1.blocks.1", t=50, pool_size=4,
                                                              head="attention"),
                                  lambda: PixelProbe((1, 8, 8), 10)])
def test_the_head_learns_digits(make, digits):
    torch.manual_seed(0)
    model, (images, labels) = make(), digits
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(60):
        batch = slice(step % 4 * 64, step % 4 * 64 + 64)
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4])


def test_pixel_probe_features_are_the_pixels(digits):
    x = digits[0][:3]
    torch.testing.assert_close(PixelProbe((1, 8, 8), 10).features(x).flatten(1), x.flatten(1))


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "pipeline"
    DiMRPipeline(model=tiny_dimr(), scheduler=default_scheduler()).save_pretrained(path)
    return path


def probe_recipe(tmp_path, **model):
    return recipe_from_dict({
        "method": "diffusion_probe", "seed": 0, "output_dir": str(tmp_path / "run"),
        "data": {"name": "digits", "image_size": 8, "batch_size": 64},
        "model": model, "eval": {"batch_size": 360},
        "train": {"max_steps": 60, "lr": 3e-2, "log_every": 10, "ema_decay": 0.5, "checkpoint_every": 100},
    })


def test_the_method_trains_a_head_on_a_saved_pipeline(saved_pipeline, tmp_path):
    recipe = probe_recipe(tmp_path, pipeline=str(saved_pipeline), layer="stages.0.blocks.1", t=50, head="linear",
                          pool_size=2)
    result = train(recipe)
    losses = [json.loads(line)["loss"] for line in (result.output_dir / "train_log.jsonl").read_text().splitlines()]
    assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2])
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.3
    assert metrics["num_trainable_params"] == 4 * 32 * 10 + 10  # a linear probe on 2x2 pooled 32-d tokens
    saved = load_file(str(result.output_dir / "model.safetensors"))
    pipe = DiMRPipeline.from_pretrained(saved_pipeline)
    assert all(torch.equal(saved[f"backbone.{k}"], v) for k, v in pipe.model.state_dict().items())


def test_the_method_probes_raw_pixels_without_a_pipeline(tmp_path):
    method = DiffusionProbeMethod(probe_recipe(tmp_path, layer="pixels"))
    model = method.build_model()
    assert isinstance(model, PixelProbe) and model.head.fc.in_features == 64


@pytest.mark.parametrize("model, message", [
    ({"layer": "stages.0.blocks.1", "pipline": "x"}, "did you mean 'pipeline'"),
    ({"layer": "stages.0.blocks.1", "pipeline": "/nonexistent"}, "is not a saved pipeline directory"),
    ({"layer": "pixels", "head": "mlp"}, r"model.head 'mlp' is not one of \['linear', 'attention'\]"),
    ({"layer": "pixels", "pool_size": 0}, "pool_size must be a positive int"),
])
def test_bad_model_sections_are_refused_when_the_recipe_loads(tmp_path, model, message):
    with pytest.raises(ConfigError, match=message):
        probe_recipe(tmp_path, **model)


def test_a_bad_layer_or_image_size_is_refused_before_training(saved_pipeline, tmp_path):
    method = DiffusionProbeMethod(probe_recipe(tmp_path, pipeline=str(saved_pipeline), layer="stages.9"))
    with pytest.raises(ConfigError, match="candidate blocks"):
        method.build_model()
    recipe = probe_recipe(tmp_path, pipeline=str(saved_pipeline), layer="stages.0.blocks.1")
    recipe.data.image_size = 16
    with pytest.raises(ConfigError, match=r"data gives \(1, 16, 16\) images but .* expects \(1, 8, 8\)"):
        DiffusionProbeMethod(recipe).build_model()


def test_shipped_recipe_builds_on_a_saved_pipeline(saved_pipeline):
    path = "recipes/backbones/diffusion_probe_digits.yaml"
    assert read_yaml(path)["model"]["pipeline"] == "runs/dimr_digits/pipeline"
    recipe = load_recipe(path, overrides={"model.pipeline": str(saved_pipeline)})
    model = DiffusionProbeMethod(recipe).build_model()
    assert model.layer == recipe.model["layer"] and model.t == recipe.model["t"]
