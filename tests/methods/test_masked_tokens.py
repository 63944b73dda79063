"""Token-based generation on the bundled digits through the real loop: the VQ tokenizer, its token
shards, then ENAT trained on them; and the pipelines that sample the token generators."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import AmusedScheduler, VQModel

from genforge.config import ConfigError, load_recipe, recipe_from_dict
from genforge.data import build_dataset
from genforge.data.tokens import TokenShards, write_token_shards
from genforge.models.amused_class import AmusedClassModel
from genforge.models.enat import ENATModel
from genforge.models.maskgit import MaskGITModel
from genforge.models.tokenizers import as_tokenizer
from genforge.pipelines import load_saved_pipeline
from genforge.pipelines.enat import AmusedClassPipeline, ENATPipeline, MaskGITPipeline
from genforge.train import train

TINY_VQ = {"block_out_channels": [16, 32], "latent_channels": 8, "vq_embed_dim": 8, "num_vq_embeddings": 32,
           "norm_num_groups": 8}


def recipe(tmp_path, method, model, max_steps, lr, **extra):
    return recipe_from_dict({
        "method": method, "seed": 0, "output_dir": str(tmp_path / method),
        "data": {"name": "digits", "image_size": 8, "batch_size": 64},
        "model": model,
        "train": {"max_steps": max_steps, "lr": lr, "warmup_steps": 5, "checkpoint_every": max_steps,
                  "log_every": 5, "ema_decay": 0.9},
        "sample": {"num_per_class": 1, "steps": 4, "guidance_scale": 1.0},
        "eval": {"num_samples": 20, "batch_size": 20}, **extra})


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory):
    """A tiny VQModel (16/32 channels, 32 codes) trained 60 steps on the digits, with its token shards."""
    tmp_path = tmp_path_factory.mktemp("vq")
    torch.manual_seed(0)
    result = train(recipe(tmp_path, "vq_tokenizer", {"config": "digits", "args": TINY_VQ, "shard_size": 1000},
                          60, 3e-3))
    return result, tmp_path / "vq_tokenizer"


def encode_to_ids(vq, images):
    return as_tokenizer(vq).encode_to_ids(images)


def logged_losses(output_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


def test_tokenizer_reconstructs_digits_within_the_stated_error(tokenizer_run):
    result, run = tokenizer_run
    vq = VQModel.from_pretrained(run / "tokenizer").eval()
    test = build_dataset("digits", split="test", image_size=8)
    images = test.images
    with torch.no_grad():
        recon = as_tokenizer(vq).decode_ids(encode_to_ids(vq, images), (4, 4)).clamp(-1, 1)
    mse = float(F.mse_loss(recon, images))
    mean_image_mse = float(F.mse_loss(images.mean(0, keepdim=True).expand_as(images), images))
    # stated error after 60 steps of this tiny tokenizer: MSE below 0.6x the mean image's (0.30 on
    # the test split); the shipped 700-step recipe reaches 0.019 (docs/benchmarks.md)
    assert mse < 0.6 * mean_image_mse, (mse, mean_image_mse)
    # the run scores the first eval.num_samples (20) test digits
    assert result.metrics["reconstruction_mse_test"] == pytest.approx(float(F.mse_loss(recon[:20], images[:20])),
                                                                      rel=1e-5)


def test_every_training_digit_is_cached_once_in_resumable_shards(tokenizer_run, tmp_path):
    _, run = tokenizer_run
    shards = sorted((run / "tokens").glob("shard_*.safetensors"))
    train_split = build_dataset("digits", split="train", image_size=8)
    data = TokenShards(run / "tokens")
    assert len(shards) == 2 and len(data) == len(train_split)
    assert torch.equal(data.labels, train_split.labels)
    vq = VQModel.from_pretrained(run / "tokenizer").eval()
    with torch.no_grad():
        assert torch.equal(data.tokens[:50], encode_to_ids(vq, train_split.images[:50]))
    # a killed extraction resumes: the existing shard is kept, the missing one written
    (tmp_path / "tokens").mkdir()
    kept = tmp_path / "tokens" / shards[0].name
    kept.write_bytes(shards[0].read_bytes())
    before = kept.stat().st_mtime_ns
    calls = []
    write_token_shards(lambda x: calls.append(len(x)) or encode_to_ids(vq, x), train_split, tmp_path / "tokens",
                       shard_size=1000)
    assert kept.stat().st_mtime_ns == before and sum(calls) == len(train_split) - 1000
    assert torch.equal(TokenShards(tmp_path / "tokens").tokens, data.tokens)


def test_enat_loss_falls_on_digit_tokens_and_the_run_samples_and_scores(tokenizer_run, tmp_path):
    _, run = tokenizer_run
    torch.manual_seed(0)
    result = train(recipe(tmp_path, "enat", {"tokenizer": str(run), "config": "tiny"}, 40, 3e-3))
    losses = logged_losses(tmp_path / "enat")
    assert sum(losses[-2:]) / 2 < 0.92 * sum(losses[:2]) / 2, losses
    assert {"fid", "classifier_agreement"} <= set(result.metrics)
    pipe = load_saved_pipeline(tmp_path / "enat" / "pipeline")
    assert isinstance(pipe, ENATPipeline) and (tmp_path / "enat" / "samples.npz").is_file()


def test_token_recipes_refuse_bad_model_sections(tmp_path):
    with pytest.raises(ConfigError, match="model.tokenizer"):
        recipe(tmp_path, "enat", {"config": "tiny"}, 1, 1e-3)
    with pytest.raises(ConfigError, match="unknown key 'model.sampling.temperature'"):
        recipe(tmp_path, "maskgit", {"tokenizer": "x", "sampling": {"temperature": 1.0}}, 1, 1e-3)
    with pytest.raises(ConfigError, match="unknown key 'model.reuse_prob'"):
        recipe(tmp_path, "maskgit", {"tokenizer": "x", "reuse_prob": 0.5}, 1, 1e-3)


def tiny_vq() -> VQModel:
    torch.manual_seed(0)
    return VQModel(in_channels=1, out_channels=1, down_block_types=["DownEncoderBlock2D"] * 2,
                   up_block_types=["UpDecoderBlock2D"] * 2, sample_size=8, lookup_from_codebook=True,
                   **TINY_VQ).eval()


NETWORK = dict(codebook_size=32, num_tokens=16, num_classes=10)


def encoder_tokens(model: ENATModel) -> list[int]:
    seen = []
    model.encoder_blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    return seen


def test_enat_pipeline_with_reuse_encodes_only_revealed_tokens_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = ENATModel(**NETWORK, width=64, encoder_depth=2, decoder_depth=1, num_heads=4).eval()
    pipe = ENATPipeline(model=model, vqvae=tiny_vq())
    seen = encoder_tokens(model)
    reused = pipe.generate_tokens([1, 2], num_inference_steps=4, guidance_scale=2.5,
                                  generator=torch.Generator().manual_seed(0))
    # T = 4, L = 16: inputs have 0, 2, 5, 10 visible tokens; with reuse only 2, 3, 5 are new (two branches)
    assert seen == [2, 2, 3, 3, 5, 5]
    seen.clear()
    pipe.reuse = False
    pipe.generate_tokens([1, 2], num_inference_steps=4, guidance_scale=2.5, generator=torch.Generator().manual_seed(0))
    assert seen == [2, 2, 5, 5, 10, 10]
    assert reused.max() < 32
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = load_saved_pipeline(tmp_path / "pipe")
    images = [p([3, 4], num_inference_steps=4, generator=torch.Generator().manual_seed(1), output_type="pt").images
              for p in (pipe, loaded)]
    assert torch.equal(images[0], images[1])
    with pytest.raises(ValueError, match="num_inference_steps must be an integer >= 1; got 0"):
        pipe([1], num_inference_steps=0)
    with pytest.raises(ValueError, match="class labels"):
        pipe([11])


def test_decoded_images_are_the_tokenizers_decoding_of_the_generated_ids():
    torch.manual_seed(0)
    vq = tiny_vq()
    pipe = MaskGITPipeline(model=MaskGITModel(**NETWORK, width=64, depth=2, num_heads=4).eval(), vqvae=vq)
    images = build_dataset("digits", split="test", image_size=8).images[:4]
    with torch.no_grad():
        ids = encode_to_ids(vq, images)
        expected = vq(images).sample  # encode -> nearest code -> decode, in diffusers' own forward
    torch.testing.assert_close(pipe.decode_tokens(ids), (expected / 2 + 0.5).clamp(0, 1))


def test_amused_peer_samples_with_diffusers_scheduler_to_a_full_grid():
    torch.manual_seed(0)
    model = AmusedClassModel(**NETWORK, hidden_size=64, block_out_channels=32, num_res_blocks=1, block_num_heads=2,
                             num_hidden_layers=2, num_attention_heads=4, intermediate_size=128).eval()
    pipe = AmusedClassPipeline(model=model, vqvae=tiny_vq(), scheduler=AmusedScheduler(mask_token_id=32))
    counts = []
    ids = pipe.generate_tokens([0, 9], num_inference_steps=4, guidance_scale=1.0,
                               generator=torch.Generator().manual_seed(0),
                               callback=lambda s, x, w: counts.append((x == 32).sum(1).tolist()))
    assert counts[-1] == [0, 0] and ids.max() < 32
    assert all(a >= b for a, b in zip([c[0] for c in counts], [c[0] for c in counts[1:]]))


@pytest.mark.parametrize("name", ["vq_digits", "digits", "maskgit_digits", "amused_digits"])
def test_shipped_token_recipes_load_and_validate(name):
    recipe = load_recipe(Path(__file__).parents[2] / "recipes" / "enat" / f"{name}.yaml")
    assert recipe.method == {"vq_digits": "vq_tokenizer", "digits": "enat", "maskgit_digits": "maskgit",
                             "amused_digits": "amused"}[name]
