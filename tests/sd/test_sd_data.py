"""Distillation on an image-text folder and on a text cache of ``genforge cache-latents --text-encoder``,
with a Stable Diffusion directory as the teacher: a tiny AutoencoderKL, a small CLIPTextModel on the
local word-level tokenizer, a tiny UNet and SD-1.5's PNDM scheduler, saved as a stock pipeline."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextModel

from genforge.cli import main as cli_main
from genforge.config import ConfigError, load_recipe, recipe_from_dict
from genforge.data import build_dataset
from genforge.data.latents import check_text_cache
from genforge.sd.configs import UNET_CONFIGS
from genforge.sd.method import SDDistill, load_text_to_image_pipeline
from genforge.sd.text import encode_prompts, small_text_encoder, word_tokenizer
from genforge.train import train

CAPTIONS = ["a red square", "a blue circle", "a green line", "two red dots"] * 2
PROMPTS = ["a red circle", "a blue square"]
RECIPES = Path(__file__).parents[2] / "recipes" / "asdm"


def tiny_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                         sample_size=16, scaling_factor=0.5)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(SD directory, image-text folder, text cache made with the directory's VAE and text encoder)."""
    root = tmp_path_factory.mktemp("sd")
    folder = root / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 255, (16, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption + "\n")
    tokenizer = word_tokenizer(CAPTIONS + PROMPTS)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**UNET_CONFIGS["sd-like-tiny"], "block_out_channels": [16, 32, 32],
                                   "norm_num_groups": 8, "sample_size": 8})
    StableDiffusionPipeline(vae=tiny_vae(0), text_encoder=small_text_encoder(tokenizer, 32, 1), tokenizer=tokenizer,
                            unet=unet, scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012,
                                                               beta_schedule="scaled_linear", skip_prk_steps=True,
                                                               steps_offset=1, set_alpha_to_one=False),
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(root / "sd")
    sd = root / "sd"
    assert cli_main(["cache-latents", "--vae", str(sd / "vae"), "--text-encoder", str(sd / "text_encoder"),
                     "--tokenizer", str(sd / "tokenizer"), "--images", str(folder), "--out", str(root / "cache"),
                     "--image-size", "16", "--shard-size", "3", "--device", "cpu"]) == 0
    return root / "sd", folder, root / "cache"


def spec(out, teacher, name, root, **model) -> dict:
    return {
        "method": "sd_distill", "seed": 0, "output_dir": str(out),
        "data": {"name": name, "root": str(root), "image_size": 16 if name == "image_text" else 8, "batch_size": 4},
        "model": {"teacher": str(teacher), "plan": "bk-small", "prompt_dropout": 0.0, **model},
        "train": {"max_steps": 2, "lr": 1e-3, "checkpoint_every": 1, "log_every": 1},
        "sample": {"num_per_class": 1, "steps": 1, "guidance_scale": 2.0, "prompts": PROMPTS},
        "eval": {"batch_size": 4}}


def recipe(*args, **model):
    return recipe_from_dict(spec(*args, **model))


def test_the_text_cache_holds_the_vaes_posteriors_and_the_captions_hidden_states(sd):
    teacher, folder, cache = sd
    pipe = load_text_to_image_pipeline(teacher)
    images = build_dataset("image_text", root=str(folder), image_size=16)
    x = torch.stack([images[i][0] for i in range(len(images))])
    with torch.no_grad():
        moments = pipe.vae.encode(x).latent_dist.parameters
        flipped = pipe.vae.encode(x.flip(-1)).latent_dist.parameters
    expected = encode_prompts(pipe.tokenizer, pipe.text_encoder, CAPTIONS)
    parts = [load_file(cache / f"shard_{k:05d}.safetensors") for k in range(3)]
    torch.testing.assert_close(torch.cat([p["moments"] for p in parts]).float(), moments, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(torch.cat([p["moments_flip"] for p in parts]).float(), flipped, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(torch.cat([p["text_embeds"] for p in parts]).float(), expected, atol=5e-3, rtol=2e-3)
    dataset = build_dataset("sd_latents", root=str(cache))
    torch.testing.assert_close(dataset.null_text_embeds, encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])[0])
    torch.testing.assert_close(dataset[5][1], expected[5], atol=5e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="made with --text-encoder .*use data.name sd_latents"):
        build_dataset("latents", root=str(cache))


def test_the_cache_conditions_the_unet_as_the_folder_does_without_running_the_vae_or_text_encoder(sd, tmp_path,
                                                                                               monkeypatch):
    teacher, folder, cache = sd
    on_cache = SDDistill(recipe(tmp_path / "a", teacher, "sd_latents", cache))
    model = on_cache.build_model()
    cached = on_cache.train_dataset()
    on_folder = SDDistill(recipe(tmp_path / "b", teacher, "image_text", folder))
    on_folder.build_model()
    images = on_folder.train_dataset()
    folder_embeds = on_folder.conditioning([images[i][1] for i in range(4)], 0.0, "cpu")
    folder_latents = on_folder.latents(torch.stack([images[i][0] for i in range(4)]))
    assert folder_latents.shape == (4, 4, 8, 8)

    def refuse(*args, **kwargs):
        raise AssertionError("the VAE or the text encoder ran on cached data")

    monkeypatch.setattr(AutoencoderKL, "encode", refuse)
    monkeypatch.setattr(CLIPTextModel, "forward", refuse)
    batch = [torch.stack(column) for column in zip(*(cached[i] for i in range(4)))]
    torch.testing.assert_close(on_cache.conditioning(batch[1], 0.0, "cpu"), folder_embeds, atol=5e-3, rtol=2e-3)
    loss, scalars = on_cache.training_step(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and scalars["loss_feat"] > 0


def test_distillation_on_the_cache_writes_grids_of_the_recipe_prompts_and_a_pipeline_with_the_vae(sd, tmp_path):
    teacher, _, cache = sd
    result = train(recipe(tmp_path / "run", teacher, "sd_latents", cache))
    assert all((result.output_dir / f"samples_step_000000{k}.png").is_file() for k in (1, 2))
    grid = Image.open(result.output_dir / "samples_grid.png")
    assert grid.size[1] == 2 + len(PROMPTS) * (16 * 4 + 2)  # one row of 16 px images (x4) per prompt
    student = load_text_to_image_pipeline(result.output_dir / "pipeline")
    assert student.vae is not None and student.unet.mid_block is None
    image = student(prompt=PROMPTS[:1], num_inference_steps=2, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()


def test_bad_data_is_refused_before_training(sd, tmp_path):
    teacher, folder, cache = sd
    pipe = load_text_to_image_pipeline(teacher)
    with pytest.raises(ValueError, match="made with another VAE"):
        check_text_cache(cache, tiny_vae(1), pipe.tokenizer, pipe.text_encoder)
    other = tmp_path / "other"
    shutil.copytree(teacher, other)
    small_text_encoder(pipe.tokenizer, 32, 1, seed=1).save_pretrained(other / "text_encoder")
    with pytest.raises(ConfigError, match="made with another text encoder / tokenizer"):
        SDDistill(recipe(tmp_path / "x", other, "sd_latents", cache)).train_dataset()
    uncaptioned = tmp_path / "uncaptioned"
    shutil.copytree(folder, uncaptioned)
    (uncaptioned / "3.txt").unlink()
    with pytest.raises(ConfigError, match=r"1 of 8 images have no caption, e.g. .*3.png' needs .*3.txt'"):
        SDDistill(recipe(tmp_path / "y", teacher, "image_text", uncaptioned)).train_dataset()
    on_digits = SDDistill(recipe_from_dict({**spec(tmp_path / "z", teacher, "digits", folder),
                                            "data": {"name": "digits"}}))
    on_digits.build_model()
    with pytest.raises(ConfigError, match="data 'digits' gives 1-channel samples, the UNet takes in_channels=4"):
        on_digits.train_dataset()
    with pytest.raises(ConfigError, match="give the prompts of the sample grids as sample.prompts"):
        SDDistill(recipe_from_dict({**spec(tmp_path / "w", teacher, "image_text", folder), "sample": {"steps": 1}}))


def test_the_sd15_recipe_loads_and_passes_the_data_checks_on_tiny_stand_ins(sd, tmp_path):
    teacher, _, cache = sd
    sd15 = load_recipe(RECIPES / "distill_sd15_cache.yaml", overrides={
        "model.teacher": str(teacher), "data.root": str(cache), "data.image_size": 8, "output_dir": str(tmp_path)})
    method = SDDistill(sd15)
    method.build_model()
    assert len(method.train_dataset()) == len(CAPTIONS)


def test_a_pixel_space_teacher_trains_on_the_folder_with_a_tokenizer_over_its_captions(sd, tmp_path):
    _, folder, _ = sd
    result = train(recipe_from_dict({
        "method": "sd_text_to_image", "seed": 0, "output_dir": str(tmp_path / "teacher"),
        "data": {"name": "image_text", "root": str(folder), "image_size": 8, "batch_size": 4},
        "model": {"unet": {"block_out_channels": [16, 32, 32], "norm_num_groups": 8, "in_channels": 3,
                           "out_channels": 3}},
        "train": {"max_steps": 1, "lr": 1e-3, "log_every": 1},
        "sample": {"num_per_class": 1, "steps": 1, "prompts": PROMPTS}, "eval": {"batch_size": 4}}))
    pipe = load_text_to_image_pipeline(result.output_dir / "pipeline")
    ids = pipe.tokenizer(CAPTIONS + PROMPTS).input_ids
    assert all(pipe.tokenizer.unk_token_id not in row for row in ids)
    assert Image.open(result.output_dir / "samples_grid.png").size[1] == 2 + len(PROMPTS) * (8 * 4 + 2)
    assert set(result.metrics) == {"unet_parameters"}  # no digits judge or FID on captioned data
