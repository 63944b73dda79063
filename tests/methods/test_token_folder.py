"""The MaskGIT VQGAN (taming layout, random tiny weights) as the tokenizer of the token pipelines and
of token caching, on an ImageNet-style class folder: tokens cached once in resumable shards, ENAT
trained on them, its samples decoded by the VQGAN and scored with FID on (local, random) Inception."""

from pathlib import Path

import numpy as np
import pytest
import torch
from image_folders import write_random_image_folder

from genforge.config import ConfigError, load_recipe, recipe_from_dict
from genforge.data import ImageFolderDataset
from genforge.data import tokens as token_module
from genforge.data.tokens import TokenShards, write_token_shards
from genforge.models.enat import ENATModel
from genforge.models.maskgit_vqgan import MaskGITVQGAN
from genforge.models.tokenizers import as_tokenizer
from genforge.pipelines import load_saved_pipeline
from genforge.pipelines.enat import ENATPipeline
from genforge.train import train

RECIPES = Path(__file__).parents[2] / "recipes" / "enat"
VQGAN = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, n_embed=32)  # f = 2: 8x8 px -> 4x4 codes


def tiny_vqgan() -> MaskGITVQGAN:
    torch.manual_seed(0)
    return MaskGITVQGAN(**VQGAN).eval()


@pytest.fixture(scope="module")
def vqgan_dir(tmp_path_factory):
    """A tiny random VQGAN saved as a converted official one is (save_pretrained)."""
    directory = tmp_path_factory.mktemp("vqgan")
    tiny_vqgan().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 class folders of 4 random RGB PNGs (12 x 10 px: resized and center-cropped to 8 x 8)."""
    return write_random_image_folder(tmp_path_factory.mktemp("images"), ("ant", "bee", "cow"), 4, 12, 10)


def test_the_vqgan_tokenizes_and_decodes_for_the_enat_pipeline_and_round_trips(tmp_path):
    vqgan = tiny_vqgan()
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():  # the interface is the official [0, 1] maps in genforge's [-1, 1] range
        assert torch.equal(as_tokenizer(vqgan).encode_to_ids(images), vqgan.encode((images + 1) / 2))
    torch.manual_seed(0)
    model = ENATModel(codebook_size=32, num_tokens=16, num_classes=3, width=64, encoder_depth=2, decoder_depth=1,
                      num_heads=4).eval()
    pipe = ENATPipeline(model=model, vqvae=vqgan)
    ids = pipe.generate_tokens([0, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(1))
    out = pipe([0, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="pt").images
    with torch.no_grad():
        torch.testing.assert_close(out, vqgan.decode(ids, 4, 4).clamp(0, 1))  # the official decoding, clamped
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = load_saved_pipeline(tmp_path / "pipe")
    assert isinstance(loaded.vqvae, MaskGITVQGAN)
    again = loaded([0, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert torch.equal(again, out)


def test_shards_written_by_several_processes_are_those_of_one(tmp_path):
    data = torch.utils.data.TensorDataset(torch.arange(70.0).reshape(10, 1, 7), torch.arange(10) % 3)
    encode = lambda x: x.flatten(1).long()  # noqa: E731
    write_token_shards(encode, data, tmp_path / "one", shard_size=3)
    write_token_shards(encode, data, tmp_path / "two", shard_size=3, rank=1, world=2)  # shards 1 and 3
    with pytest.raises(ValueError, match="incomplete .shard_00000.safetensors is missing"):
        TokenShards(tmp_path / "two")
    write_token_shards(encode, data, tmp_path / "two", shard_size=3, rank=0, world=2)
    one, two = TokenShards(tmp_path / "one"), TokenShards(tmp_path / "two")
    assert torch.equal(one.tokens, two.tokens) and torch.equal(one.labels, two.labels)
    assert torch.equal(one.tokens, encode(data.tensors[0]))
    assert one.tokens.dtype == torch.int16 and one[4][0].dtype == torch.int64  # held narrow, served as int64 ids
    with pytest.raises(ValueError, match=r"rank must lie in \[0, 1\] for world=2; got 2"):
        write_token_shards(encode, data, tmp_path / "x", rank=2, world=2)
    # flip: each batch's images, then their horizontal flips, as items of their own (the official extraction)
    write_token_shards(encode, data, tmp_path / "flip", shard_size=3, batch_size=2, flip=True)
    flipped = TokenShards(tmp_path / "flip")
    images = data.tensors[0]
    assert torch.equal(flipped.tokens[:4], encode(torch.cat([images[:2], images[:2].flip(-1)])))
    assert flipped.labels[:4].tolist() == [0, 1, 0, 1] and len(flipped) == 2 * len(data)
    assert sorted(flipped.tokens.tolist()) == sorted(encode(torch.cat([images, images.flip(-1)])).tolist())


def caching_recipe(vqgan_dir, folder, out, **overrides):
    return recipe_from_dict({
        "method": "vq_tokenizer", "seed": 0, "output_dir": str(out),
        "data": {"name": "image_folder", "root": str(folder), "image_size": 8, "batch_size": 4},
        "model": {"tokenizer": {"path": str(vqgan_dir)}, "shard_size": 5},
        "train": {"max_steps": 0}, "eval": {"num_samples": 6, "batch_size": 6}}, overrides=overrides)


def test_folder_tokens_are_cached_once_resume_after_a_kill_and_train_enat(vqgan_dir, folder, inception_weights_file,
                                                                         tmp_path, monkeypatch):
    out = tmp_path / "tokens_run"
    real_save, saved = token_module.save_file, []

    def killed_after_one_shard(tensors, path):
        if saved:
            raise KeyboardInterrupt("killed")
        saved.append(path)
        real_save(tensors, path)

    monkeypatch.setattr(token_module, "save_file", killed_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        train(caching_recipe(vqgan_dir, folder, out))
    first = out / "tokens" / "shard_00000.safetensors"
    written = first.stat().st_mtime_ns
    monkeypatch.setattr(token_module, "save_file", real_save)
    result = train(caching_recipe(vqgan_dir, folder, out))  # the same command again
    assert first.stat().st_mtime_ns == written  # the shard of the killed run is kept
    assert sorted(p.name for p in (out / "tokens").glob("shard_*")) == [f"shard_0000{i}.safetensors" for i in range(3)]
    dataset = ImageFolderDataset(folder, image_size=8)
    images = torch.stack([x for x, _ in dataset])
    cached = TokenShards(out / "tokens")
    with torch.no_grad():
        assert torch.equal(cached.tokens, tiny_vqgan().encode((images + 1) / 2))  # every image once, in order
    assert cached.labels.tolist() == [label for _, label in dataset] == [0] * 4 + [1] * 4 + [2] * 4
    assert "reconstruction_mse_test" not in result.metrics and result.metrics["reconstruction_mse_train"] > 0

    enat = recipe_from_dict({
        "method": "enat", "seed": 0, "output_dir": str(tmp_path / "enat"),
        "data": {"name": "image_folder", "root": str(folder), "image_size": 8, "batch_size": 4},
        "model": {"tokenizer": str(out), "config": "tiny"},
        "train": {"max_steps": 2, "lr": 1e-3, "checkpoint_every": 2, "log_every": 1},
        "sample": {"num_per_class": 1, "steps": 3, "guidance_scale": 1.0},
        "eval": {"num_samples": 6, "batch_size": 6, "feature_extractor": "inception-v3-compat",
                 "inception_weights": inception_weights_file, "feature_layer": "64"}})
    metrics = train(enat).metrics
    assert metrics["fid"] > 0 and "classifier_agreement" not in metrics  # a folder has no judge
    pipe = load_saved_pipeline(tmp_path / "enat" / "pipeline")
    assert isinstance(pipe.vqvae, MaskGITVQGAN)
    with np.load(tmp_path / "enat" / "samples.npz") as npz:
        samples, labels = npz["images"], npz["labels"]
    expected = pipe(labels.tolist(), num_inference_steps=3, guidance_scale=1.0,
                    generator=torch.Generator().manual_seed(enat.seed + 1), output_type="pt").images
    assert samples.shape == (6, 3, 8, 8)  # the run's samples are its saved pipeline's, decoded by the VQGAN
    assert np.abs(samples.astype(int) - (expected * 255).round().numpy().astype(int)).max() <= 1
    assert (tmp_path / "enat" / "samples_grid.png").is_file()


def test_a_saved_tokenizer_is_used_as_it_is(vqgan_dir, folder, tmp_path):
    with pytest.raises(ConfigError, match="train.max_steps must be 0, got 5"):
        caching_recipe(vqgan_dir, folder, tmp_path, **{"train.max_steps": 5})
    with pytest.raises(ConfigError, match=r"model.tokenizer must be \{path: DIR\}"):
        caching_recipe(vqgan_dir, folder, tmp_path, **{"model.tokenizer": str(vqgan_dir)})
    with pytest.raises(ValueError, match="not a saved tokenizer directory"):
        train(caching_recipe(tmp_path, folder, tmp_path / "run"))
    with pytest.raises(ConfigError, match="gives 1-channel images but the tokenizer takes 3 channels"):
        train(caching_recipe(vqgan_dir, folder, tmp_path / "grey", **{"data.channels": 1}))


def test_the_shipped_imagenet_recipes_chain_token_caching_into_enat(inception_weights_file):
    tokens = load_recipe(RECIPES / "imagenet_vqgan.yaml")
    enat = load_recipe(RECIPES / "imagenet_tokens.yaml", overrides={"eval.inception_weights": inception_weights_file})
    assert enat.model["tokenizer"] == tokens.output_dir  # ENAT reads the caching run's tokens and VQGAN
    assert (enat.data.name, enat.data.root, enat.data.image_size) == (tokens.data.name, tokens.data.root,
                                                                        tokens.data.image_size)
