"""ReNO (arXiv 2406.04312): the properties of its noise-optimisation loop, on a tiny stock
diffusers StableDiffusionPipeline and on genforge's class-conditional digits pipelines."""

import math

import pytest
import torch
from tiny_reno_models import tiny_clip_model, tiny_clip_text, tiny_sd_pipeline, tiny_vae
from diffusers import (DDIMScheduler, DDPMPipeline, DDPMScheduler, EulerAncestralDiscreteScheduler, PixArtAlphaPipeline,
                       PixArtTransformer2DModel, StableDiffusionXLPipeline, UNet2DConditionModel, UNet2DModel)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

from genforge.models.dimr import DiMRModel, dimr_config
from genforge.pipelines import ClassConditionalPipeline, DiMRPipeline
from genforge.pipelines.reno import (best_of_n, clip_grad_norm_per_sample_, norm_prior, optimize, render)
from genforge.rewards import CLIPReward, Reward, load


class Brightness(Reward):
    """A toy differentiable reward: mean pixel value (offset 1)."""

    offset = 1.0

    def __init__(self):
        super().__init__(image_size=None, mean=None)
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.freeze()

    def score_inputs(self, pixels, prompts):
        return self.scale * pixels.mean(dim=(1, 2, 3))


def sdxl_pipe(clip_tokenizer):
    """Tiny SDXL-Turbo-shaped pipeline (diffusers' fast-test sizes), trailing Euler-ancestral."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                                cross_attention_dim=64, norm_num_groups=1)
    scheduler = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                timestep_spacing="trailing", steps_offset=1)
    return StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=tiny_clip_text(), tokenizer=clip_tokenizer,
                                     text_encoder_2=tiny_clip_text(projection=True), tokenizer_2=clip_tokenizer,
                                     unet=unet, scheduler=scheduler)


def pixart_pipe(_):
    """Tiny PixArt-alpha-DMD-shaped pipeline: a 2-layer PixArt transformer, a 1-layer T5 with a
    letter-level tokenizer built in memory, DDPM."""
    letters = ["<pad>", "</s>", "<unk>"] + [chr(c) for c in range(97, 123)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(letters)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                extra_ids=0)
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=3, caption_channels=32, in_channels=4,
                                           cross_attention_dim=24, out_channels=8, attention_bias=True,
                                           activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                           norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    text = T5EncoderModel(T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4))
    return PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text, vae=tiny_vae(), transformer=transformer,
                               scheduler=DDPMScheduler())


@pytest.fixture(scope="module")
def sd_pipe(clip_tokenizer):
    return tiny_sd_pipeline(clip_tokenizer)


@pytest.fixture(scope="module")
def clip_reward(clip_tokenizer):
    return CLIPReward(tiny_clip_model(), clip_tokenizer, offset=100.0)


def digits_pipe(kind: str):
    torch.manual_seed(0)
    if kind == "dimr":
        return DiMRPipeline(model=DiMRModel(**dimr_config("digits_tiny")), scheduler=DDIMScheduler(clip_sample=False))
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                        norm_num_groups=8, num_class_embeds=11)
    return ClassConditionalPipeline(model=model, scheduler=DDIMScheduler(clip_sample=False))


def run(pipe, reward, n_iters=3, prompt="a red cat", **kwargs):
    return optimize(pipe, prompt, {"clip": 1.0}, models={"clip": reward}, n_iters=n_iters, **kwargs)


def test_norm_prior_gradient_vanishes_at_sqrt_d_minus_1_and_descent_moves_the_norm_there():
    z = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    d = z[0].numel()
    at_mode = (z / z.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * math.sqrt(d - 1)).requires_grad_()
    norm_prior(at_mode, 0.01).sum().backward()
    assert at_mode.grad.abs().max() < 1e-6
    for start in (0.5, 2.0):  # below and above the mode
        x = (at_mode.detach() * start).requires_grad_()
        for _ in range(20):
            (grad,) = torch.autograd.grad(norm_prior(x, 0.01).sum(), x)
            x = (x - 5.0 * grad).detach().requires_grad_()
        assert abs(x[0].norm() - math.sqrt(d - 1)) < abs(start - 1) * math.sqrt(d - 1) / 2


def test_clipped_gradient_norms_never_exceed_the_bound_and_match_torch_for_one_sample():
    scales = torch.tensor([1e-4, 1e-3, 0.1, 1.0, 10.0, 1e4]).view(-1, 1, 1, 1)
    grads = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * scales
    before = grads.flatten(1).norm(dim=1)
    clipped = grads.clone()
    clip_grad_norm_per_sample_(clipped, 0.1)
    assert (clipped.flatten(1).norm(dim=1) <= 0.1 * (1 + 1e-6)).all()  # up to fp32 rounding of the norm
    assert torch.equal(clipped[:2], grads[:2])  # already within the bound: untouched
    for i in range(6):
        z = torch.zeros(1, 4, 8, 8, requires_grad=True)
        z.grad = grads[i:i + 1].clone()
        torch.nn.utils.clip_grad_norm_([z], 0.1)
        assert torch.allclose(z.grad, clipped[i:i + 1], rtol=1e-6, atol=0), before[i]


def test_no_step_is_taken_on_the_last_iteration(sd_pipe, clip_reward):
    once = run(sd_pipe, clip_reward, n_iters=1)
    assert torch.equal(once.latents, once.initial_latents)
    assert torch.equal(once.initial_latents, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert "grad_norm" not in once.history[0]
    three = run(sd_pipe, clip_reward, n_iters=3)
    assert ["grad_norm" in h for h in three.history] == [True, True, False]


def test_only_the_latent_receives_gradients(sd_pipe, clip_reward):
    result = run(sd_pipe, clip_reward, n_iters=2)
    grad_norm = result.history[0]["grad_norm"]
    assert torch.isfinite(grad_norm).all() and (grad_norm > 0).all()
    for module in (sd_pipe.unet, sd_pipe.vae, sd_pipe.text_encoder, clip_reward):
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    assert not torch.equal(result.history[1]["norm"], result.history[0]["norm"])  # the latent moved
    assert torch.allclose(result.initial_latents.flatten(1).norm(dim=1), result.history[0]["norm"])  # kept as drawn


def test_best_is_the_minimum_logged_loss_and_initial_rewards_are_iteration_zeros(sd_pipe, clip_reward):
    result = run(sd_pipe, clip_reward, n_iters=5, prompt=["a red cat", "a blue dog"], lr=50.0)
    totals = torch.stack([h["total"] for h in result.history])  # (iterations, B)
    assert torch.equal(result.best_rewards["total"], totals.min(dim=0).values)
    assert torch.equal(result.best_iteration, totals.argmin(dim=0))
    assert all(torch.equal(result.initial_rewards[k], result.history[0][k]) for k in ("clip", "total"))
    assert (result.best_rewards["total"] <= result.initial_rewards["total"]).all()
    assert result.images.shape == (2, 3, 16, 16) and 0 <= result.images.min() and result.images.max() <= 1
    with torch.no_grad():  # the best image is the render of the best latent
        again = render(sd_pipe, result.latents, ["a red cat", "a blue dog"], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(again, result.images, atol=1e-5)


def test_the_same_seed_gives_the_same_result(sd_pipe, clip_reward):
    a, b = run(sd_pipe, clip_reward, seed=3), run(sd_pipe, clip_reward, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.latents, b.latents)
    assert not torch.equal(a.initial_latents, run(sd_pipe, clip_reward, n_iters=1, seed=4).initial_latents)


def test_weights_multiply_the_losses_and_a_zero_weight_removes_a_reward(sd_pipe, clip_reward):
    bright = Brightness()
    alone = optimize(sd_pipe, "a red cat", {"clip": 0.5}, models={"clip": clip_reward}, n_iters=3)
    both = optimize(sd_pipe, "a red cat", {"clip": 0.5, "bright": 0.0}, models={"clip": clip_reward, "bright": bright},
                    n_iters=3)
    assert "bright" not in both.history[0]
    assert torch.equal(alone.latents, both.latents)
    mixed = optimize(sd_pipe, "a red cat", {"clip": 0.5, "bright": 3.0}, models={"clip": clip_reward, "bright": bright},
                     n_iters=2)
    h = mixed.history[1]
    assert torch.allclose(h["total"], 0.5 * h["clip"] + 3.0 * h["bright"])


@pytest.mark.parametrize("kind", ["unet", "dimr"])
def test_on_a_digits_pipeline_the_classifier_reward_rises(kind):
    pipe, labels = digits_pipe(kind), [3, 8]
    result = optimize(pipe, labels, {"digits-cnn": 1.0}, n_iters=12, num_inference_steps=2, lr=5.0, grad_clip=1.0)
    log_p = -torch.stack([h["digits-cnn"] for h in result.history])  # (iterations, B)
    assert (log_p[-3:].mean(0) > log_p[0] + 0.5).all(), log_p[:, 0]
    assert result.images.shape == (2, 1, 8, 8)
    assert all(p.grad is None for p in pipe.model.parameters())


def test_a_reward_prompt_scores_an_unconditional_render_against_the_wanted_class():
    pipe, reward = digits_pipe("unet"), load("digits-cnn")
    null = [10, 10]  # the pipeline's unconditional label; the reward wants 3 and 8
    result = optimize(pipe, null, {"digits-cnn": 1.0}, n_iters=2, num_inference_steps=2, reward_prompt=[3, 8])
    generator = torch.Generator().manual_seed(0)
    unconditional = pipe(class_labels=null, latents=result.initial_latents, num_inference_steps=2, generator=generator,
                         output_type="pt", return_dict=False)[0]
    assert torch.allclose(result.initial_images, unconditional, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(result.initial_rewards["digits-cnn"], reward.loss(unconditional, [3, 8]), atol=1e-5)
        assert not torch.allclose(result.initial_rewards["digits-cnn"], reward.loss(unconditional, [8, 3]), atol=1e-3)
    select = best_of_n(pipe, null, {"digits-cnn": 1.0}, n=2, num_inference_steps=2, reward_prompt=[3, 8])
    assert torch.allclose(select.initial_rewards["total"], result.initial_rewards["total"], atol=1e-6)
    with pytest.raises(ValueError, match="one target per prompt"):
        optimize(pipe, null, {"digits-cnn": 1.0}, n_iters=1, reward_prompt=[3])
    with pytest.raises(ValueError, match=r"labels in \[0, 10\)"):  # the null label is no class for the reward
        optimize(pipe, null, {"digits-cnn": 1.0}, n_iters=1)


@pytest.mark.parametrize("build, call_kwargs", [(sdxl_pipe, {}),
                                                (pixart_pipe, {"use_resolution_binning": False, "clean_caption": False,
                                                               "max_sequence_length": 16})])
def test_sdxl_and_pixart_render_differentiably_through_their_own_call(clip_tokenizer, clip_reward, build, call_kwargs):
    pipe = build(clip_tokenizer)
    first = optimize(pipe, "a red cat", {"clip": 1.0}, models={"clip": clip_reward}, n_iters=3, call_kwargs=call_kwargs)
    again = optimize(pipe, "a red cat", {"clip": 1.0}, models={"clip": clip_reward}, n_iters=3, call_kwargs=call_kwargs)
    assert torch.isfinite(first.history[0]["grad_norm"]).all() and (first.history[0]["grad_norm"] > 0).all()
    assert first.best_rewards["total"] < first.initial_rewards["total"]
    assert torch.equal(first.images, again.images)  # re-seeded generator: an ancestral step repeats its noise


def test_best_of_n_starts_from_renos_initial_latent_and_keeps_the_lowest_loss(sd_pipe, clip_reward):
    reno = run(sd_pipe, clip_reward, n_iters=1)
    select = best_of_n(sd_pipe, "a red cat", {"clip": 1.0}, n=4, models={"clip": clip_reward})
    assert torch.allclose(select.initial_images, reno.initial_images, atol=1e-6)
    totals = torch.stack([h["total"] for h in select.history])
    assert torch.equal(select.best_rewards["total"], totals.min(dim=0).values)
    assert len(set(totals[:, 0].tolist())) == 4  # four different latents


def test_bad_input_is_refused_before_any_rendering(sd_pipe, clip_reward):
    with pytest.raises(TypeError, match="cannot render through a DDPMPipeline; supported pipelines: StableDiffusion"):
        unet = UNet2DModel(sample_size=8, block_out_channels=(32, 64), down_block_types=("DownBlock2D",) * 2,
                           up_block_types=("UpBlock2D",) * 2, norm_num_groups=8)
        optimize(DDPMPipeline(unet=unet, scheduler=DDIMScheduler()), "x", {"clip": 1.0}, models={"clip": clip_reward})
    with pytest.raises(ValueError, match="every reward weight is 0"):
        optimize(sd_pipe, "x", {"clip": 0.0}, models={"clip": clip_reward})
    with pytest.raises(FileNotFoundError, match="needs a local path"):
        optimize(sd_pipe, "x", {"pickscore": 1.0})
    with pytest.raises(ValueError, match="latents must have shape"):
        run(sd_pipe, clip_reward, latents=torch.zeros(1, 4, 4, 4))
    assert load("digits-cnn").offset == 0.0


def test_a_bfloat16_generator_optimises_an_fp32_latent_and_offloading_rewards_changes_nothing():
    pipe = digits_pipe("unet")
    fp32 = optimize(pipe, [3], {"digits-cnn": 1.0}, n_iters=3, num_inference_steps=2)
    offloaded = optimize(pipe, [3], {"digits-cnn": 1.0}, n_iters=3, num_inference_steps=2, offload_rewards=True)
    assert torch.equal(fp32.latents, offloaded.latents)
    low = optimize(pipe.to(dtype=torch.bfloat16), [3], {"digits-cnn": 1.0}, n_iters=3, num_inference_steps=2)
    assert low.latents.dtype == torch.float32 and torch.isfinite(low.history[0]["grad_norm"]).all()
    assert torch.equal(low.initial_latents, fp32.initial_latents)
    assert torch.allclose(low.initial_rewards["total"], fp32.initial_rewards["total"], rtol=0.1)
