"""`genforge cache-latents` and the latents dataset: a tiny AutoencoderKL saved by the test, a tiny
image folder, shards that match direct encoding, a killed run that resumes, and clear errors; and
runs of the shipped latent recipes (ARFlow, DiMR) on such a cache: decoded grid, samples.npz and
an Inception FID against the cached images, and missing end-of-run inputs refused before training."""


import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel
from PIL import Image
from safetensors.torch import load_file

import genforge.data.latents as latents_mod
from genforge.cli import main as cli_main
from genforge.data import build_dataset
from genforge.data.folder import ImageFolderDataset
from genforge.data.grid import save_class_grid
from genforge.data.latents import LatentsDataset, cache_latents, read_manifest
from genforge.data.transforms import signed_to_uint8
from genforge.metrics import compute_fidelity
from genforge.train import train

RECIPES = Path(__file__).parents[2] / "recipes"


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=16, scaling_factor=0.5)
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "emu"):
        (root / c).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def shards(out):
    return {p.name: load_file(p) for p in sorted(out.glob("shard_*.safetensors"))}


def test_cli_caches_posteriors_of_images_and_flips_with_labels(vae_dir, images_dir, tmp_path, capsys):
    out = tmp_path / "cache"
    status = cli_main(["cache-latents", "--vae", str(vae_dir), "--images", str(images_dir), "--out", str(out),
                       "--image-size", "16", "--shard-size", "4", "--batch-size", "3"])
    assert status == 0 and "wrote" in capsys.readouterr().out
    assert sorted(shards(out)) == ["shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"]
    folder = ImageFolderDataset(images_dir, image_size=16)
    x = torch.stack([folder[i][0] for i in range(9)])
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.no_grad():
        expected, expected_flip = (vae.encode(v).latent_dist.parameters for v in (x, x.flip(-1)))
    stored = shards(out)
    cat = lambda name: torch.cat([s[name] for s in stored.values()])  # noqa: E731
    torch.testing.assert_close(cat("moments").float(), expected, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(cat("moments_flip").float(), expected_flip, atol=2e-3, rtol=2e-3)
    assert cat("labels").tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    manifest = read_manifest(out)  # where a run finds its VAE and its FID reference, wherever it starts
    assert (manifest["vae"], manifest["images"]) == (str(vae_dir.resolve()), str(images_dir.resolve()))

    data = build_dataset("latents", root=str(out), image_size=8)
    assert (len(data), data.channels, data.image_size, data.num_classes) == (9, 4, 8, 3)
    with torch.no_grad():
        posterior, posterior_flip = (vae.encode(v[4:5]).latent_dist for v in (x, x.flip(-1)))
    for seed in range(6):  # z = scaling_factor * (mean + std * eps) of the image or its flip, 1/2 each
        torch.manual_seed(seed)
        flip = bool(torch.rand(()) < 0.5)
        eps = torch.randn(4, 8, 8)
        chosen = posterior_flip if flip else posterior
        torch.manual_seed(seed)
        torch.testing.assert_close(data[4][0], 0.5 * (chosen.mean[0] + chosen.std[0] * eps), atol=5e-3, rtol=5e-3)
    assert data[4][1] == 1


def test_a_killed_run_resumes_and_gives_the_uninterrupted_cache(vae_dir, images_dir, tmp_path, monkeypatch):
    whole = cache_latents(vae_dir, images_dir, tmp_path / "whole", image_size=16, shard_size=2, progress=False)
    real_save, saved = latents_mod.save_file, []

    def killed_on_third_shard(tensors, path):
        if len(saved) == 2:
            raise KeyboardInterrupt  # the process dies while the third shard is being written
        saved.append(path)
        real_save(tensors, path)

    monkeypatch.setattr(latents_mod, "save_file", killed_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        cache_latents(vae_dir, images_dir, tmp_path / "resumed", image_size=16, shard_size=2, progress=False)
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == [
        "latents.json", "shard_00000.safetensors", "shard_00001.safetensors"]  # no partial file left
    with pytest.raises(FileNotFoundError, match="incomplete: 3 of 5 shards missing"):
        LatentsDataset(tmp_path / "resumed")
    monkeypatch.setattr(latents_mod, "save_file", real_save)
    encoded = []
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, _e=AutoencoderKL.encode: encoded.append(len(x))
                        or _e(self, x))
    cache_latents(vae_dir, images_dir, tmp_path / "resumed", image_size=16, shard_size=2, progress=False)
    assert sum(encoded) == 2 * 5  # only the 5 images of the 3 missing shards, each with its flip
    a, b = shards(whole), shards(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name in a:
        for key in a[name]:
            torch.testing.assert_close(a[name][key], b[name][key], atol=0, rtol=0)


def test_resuming_with_other_settings_is_refused(vae_dir, images_dir, tmp_path):
    cache_latents(vae_dir, images_dir, tmp_path / "c", image_size=16, shard_size=4, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(image_size differ"):
        cache_latents(vae_dir, images_dir, tmp_path / "c", image_size=32, shard_size=4, progress=False)


def test_a_directory_that_is_not_an_autoencoder_kl_is_refused_before_any_work(images_dir, tmp_path, capsys):
    UNet2DModel(block_out_channels=(8, 8), norm_num_groups=8, down_block_types=("DownBlock2D",) * 2,
                up_block_types=("UpBlock2D",) * 2).save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="describes a 'UNet2DModel', not an 'AutoencoderKL'"):
        cache_latents(tmp_path / "unet", images_dir, tmp_path / "out")
    status = cli_main(["cache-latents", "--vae", str(tmp_path), "--images", str(images_dir), "--out",
                       str(tmp_path / "out")])
    assert status == 2 and "not a diffusers AutoencoderKL directory (no config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def latent_run(recipe_file, cache, run, weights, **overrides):
    """A shipped latent recipe cut to 2 steps of a tiny network on ``cache``; eval on Inception's 64-d layer."""
    from genforge.config import load_recipe

    return load_recipe(recipe_file, overrides={
        "output_dir": str(run), "data.root": str(cache), "data.image_size": 8, "data.batch_size": 2,
        "data.num_workers": 0, "model.config": "tiny", "model.args": {"num_classes": 3}, "train.max_steps": 2,
        "train.mixed_precision": "no", "train.checkpoint_every": 2, "train.warmup_steps": 0,
        "sample.num_per_class": 1, "sample.steps": 3, "eval.num_samples": 4, "eval.batch_size": 4,
        "eval.inception_weights": weights, "eval.feature_layer": "64", **overrides})


def decoded_pipeline_samples(run, vae_dir, labels, seed, **call):
    """The run's saved pipeline sampled as one batch from ``seed`` and decoded by hand with the VAE."""
    from genforge.pipelines import load_saved_pipeline

    pipe = load_saved_pipeline(run / "pipeline")
    latents = pipe(class_labels=labels, generator=torch.Generator().manual_seed(seed), output_type="latent",
                   **call).images
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.no_grad():
        return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)


def check_latent_run_outputs(run, vae_dir, recipe, **call):
    """samples.npz and the grid hold the saved pipeline's samples decoded with the cache's VAE (RGB at
    16 px, twice the 8x8 latents); returns the run's metrics and the decoded metric samples."""
    with np.load(run / "samples.npz") as npz:
        images, labels = npz["images"], npz["labels"]
    assert images.dtype == np.uint8 and images.shape == (4, 3, 16, 16) and labels.tolist() == [0, 1, 2, 0]
    decoded = decoded_pipeline_samples(run, vae_dir, labels.tolist(), recipe.seed + 1, **call)
    assert np.abs(images.astype(int) - signed_to_uint8(decoded).numpy().astype(int)).max() <= 1
    grid = decoded_pipeline_samples(run, vae_dir, [0, 1, 2], recipe.seed, **call)
    save_class_grid(grid, 1, run / "expected_grid.png")  # one row per class, drawn as the run draws it
    drawn, expected = (np.asarray(Image.open(run / name)).astype(int)
                       for name in ("samples_grid.png", "expected_grid.png"))
    assert drawn.shape == expected.shape == (3 * 66 + 2, 68, 3) and np.abs(drawn - expected).max() <= 1  # 4x
    return json.loads((run / "sample_metrics.json").read_text()), decoded


def test_an_arflow_latent_run_decodes_its_samples_and_scores_them_against_the_cached_images(
        vae_dir, images_dir, inception_weights_file, tmp_path):
    cache = cache_latents(vae_dir, images_dir, tmp_path / "cache", image_size=16, shard_size=4, progress=False)
    recipe = latent_run(RECIPES / "arflow/imagenet_latents.yaml", cache, tmp_path / "run", inception_weights_file,
                        **{"model.sequence_length": 3})
    result = train(recipe)
    assert result.steps == 2 and result.final_loss > 0
    metrics, decoded = check_latent_run_outputs(tmp_path / "run", vae_dir, recipe, guidance_scale=1.5,
                                                num_inference_steps=3)
    reference = ImageFolderDataset(images_dir, image_size=16)  # the folder the cache was made from
    expected = compute_fidelity(reference, decoded, feature_extractor="inception-v3-compat",
                                inception_weights=inception_weights_file, feature_layer="64")["fid"]
    assert metrics["fid"] == pytest.approx(expected, rel=1e-3, abs=1e-3) and metrics["fid"] > 0
    assert "classifier_agreement" not in metrics  # latents have no judge


def test_a_dimr_latent_run_decodes_its_samples_and_a_judge_gives_no_fid_on_latents(vae_dir, images_dir, tmp_path):
    cache = cache_latents(vae_dir, images_dir, tmp_path / "cache", image_size=16, shard_size=4, progress=False)
    recipe = latent_run(RECIPES / "dimr/imagenet_latents.yaml", cache, tmp_path / "run", None,
                        **{"eval.feature_extractor": "digits-cnn", "eval.feature_layer": None})
    assert train(recipe).steps == 2
    metrics, _ = check_latent_run_outputs(tmp_path / "run", vae_dir, recipe, guidance_scale=1.4,
                                          num_inference_steps=3)
    assert metrics == {"num_samples": 4}  # the recipe comments say so: no FID, no agreement on latents


@pytest.mark.parametrize("recipe_file", [RECIPES / "arflow" / "imagenet_latents.yaml",
                                         RECIPES / "dimr" / "imagenet_latents.yaml"], ids=["arflow", "dimr"])
def test_a_shipped_latent_recipe_loads_only_with_an_existing_inception_weights_file(recipe_file, inception_weights_file,
                                                                                    tmp_path, capsys):
    from genforge.config import load_recipe

    load_recipe(recipe_file, overrides={"eval.inception_weights": inception_weights_file})  # its model section is valid
    for weights in (None, "missing/pt_inception.pth"):
        status = cli_main(["train", str(recipe_file), "--set", f"eval.inception_weights={weights or 'null'}",
                           "--output-dir", str(tmp_path / "run")])
        err = capsys.readouterr().err.strip()
        assert status == 2 and len(err.splitlines()) == 1
        assert f"eval.inception_weights {weights!r} is not a file" in err
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("gone", ["vae", "images"])
def test_a_cache_whose_vae_or_image_folder_is_gone_is_refused_before_training(gone, vae_dir, images_dir,
                                                                             inception_weights_file, tmp_path):
    from genforge.config import ConfigError

    copies = {"vae": shutil.copytree(vae_dir, tmp_path / "vae"), "images": shutil.copytree(images_dir, tmp_path / "im")}
    cache = cache_latents(copies["vae"], copies["images"], tmp_path / "cache", image_size=16, shard_size=4,
                          progress=False)
    recipe = latent_run(RECIPES / "dimr/imagenet_latents.yaml", cache, tmp_path / "run", inception_weights_file)
    shutil.rmtree(copies[gone])
    missing = repr(str(copies[gone].resolve()))
    with pytest.raises(ConfigError, match=re.escape(missing) + " that the latent cache .* does not exist"):
        train(recipe)  # a recipe validated while the folder was there
    assert not (tmp_path / "run").exists()
