"""Sampling DiMR through diffusers schedulers, with the official CFG forms."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

import genforge
from genforge.methods.sampling import sampling_scheduler
from genforge.models.dimr import DiMRModel, dimr_config
from genforge.pipelines.dimr import DiMRPipeline, guidance_weight


def tiny_pipeline() -> DiMRPipeline:
    torch.manual_seed(0)
    model = DiMRModel(**dimr_config("tiny"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("param0"):
                param.add_(torch.randn_like(param))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False)
    pipe = DiMRPipeline(model=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, **kwargs):
    return pipe(class_labels=[1, 7], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                output_type="pt", **kwargs).images


def test_guidance_scale_one_is_the_conditional_model_alone():
    pipe = tiny_pipeline()
    calls = []
    original = pipe.model.forward
    pipe.model.forward = lambda *a, **k: calls.append(k["class_labels"].tolist()) or original(*a, **k)
    sample(pipe, guidance_scale=1.0)
    assert calls and all(labels == [1, 7] for labels in calls)


def test_guided_prediction_is_official_eps_c_plus_s_times_difference():
    pipe = tiny_pipeline()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor(500), torch.tensor([1, 7])
    s = 0.4
    cond = pipe.model(x, t, class_labels=y).sample
    uncond = pipe.model(x, t, class_labels=torch.tensor([10, 10])).sample
    guided = pipe._noise_prediction(x, t, y, 1 + s, None)
    assert torch.allclose(guided, cond + s * (cond - uncond), atol=1e-5)


def test_cfg_decay_is_the_official_formula_at_the_official_time_n_equal_t_plus_one():
    # official eval.py: w(n) = (w - 1) * (1 - cos((1 - n/1000)^p * pi)) / 2 + 1, n = diffusers t + 1
    # t = 499: n = 500, (1 - 0.5)^2 = 0.25, cos(pi/4) = 0.70710678, w = 1 + 2 * 0.29289322 / 2
    assert guidance_weight(3.0, torch.tensor(499), 1000, 2.0) == pytest.approx(1.29289322, abs=1e-8)
    assert guidance_weight(3.0, torch.tensor(999), 1000, 2.0) == 1.0  # n = N: no guidance at all
    assert guidance_weight(3.0, torch.tensor(0), 1000, 1.0) == pytest.approx(1 + (1 - math.cos(0.999 * math.pi)))
    assert guidance_weight(3.0, torch.tensor(500), 1000, None) == 3.0


def test_same_generator_same_images_and_output_types_agree():
    pipe = tiny_pipeline()
    a, b = sample(pipe, guidance_scale=1.5), sample(pipe, guidance_scale=1.5)
    assert torch.equal(a, b)
    arr = pipe(class_labels=[1, 7], num_inference_steps=3, guidance_scale=1.5,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.allclose(arr, a.permute(0, 2, 3, 1).numpy())


def test_pipeline_round_trips_through_save_pretrained(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path)
    loaded = DiMRPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.model, genforge.DiMRModel)
    assert torch.equal(sample(loaded), sample(pipe))


def test_out_of_range_labels_are_refused():
    with pytest.raises(ValueError, match="class_labels"):
        tiny_pipeline()(class_labels=[11])


class PointMassOracle(ModelMixin, ConfigMixin):
    """The exact noise predictor when each class's data is one fixed image x0[y]:
    eps(x_t, t, y) = (x_t - sqrt(abar_t) x0[y]) / sqrt(1 - abar_t)."""

    @register_to_config
    def __init__(self, in_channels: int = 1, sample_size: list[int] = (4, 6), num_classes: int = 10):
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.register_buffer("x0", torch.rand(num_classes + 1, in_channels, *sample_size, generator=generator) * 1.6 - 0.8)
        self.register_buffer("alphas_cumprod", DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                             beta_end=0.012).alphas_cumprod)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def forward(self, x, t, class_labels):
        abar = self.alphas_cumprod[t.long()]
        return SimpleNamespace(sample=(x - abar.sqrt() * self.x0[class_labels]) / (1 - abar).sqrt())


@pytest.mark.parametrize("name, ends_at_n_equal_one", [
    ("ddim", False), ("ddpm", False), ("dpm++", False), ("dpm++singlestep", True)])
def test_exact_noise_of_a_point_mass_takes_every_sampler_to_that_point_on_a_non_square_grid(name, ends_at_n_equal_one):
    # With exact predictions the probability-flow solution is x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) e, e fixed by
    # the starting noise: DDIM and DPM-Solver++ follow it exactly, DDPM's last step returns x0.
    model = PointMassOracle()
    train_config = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                 clip_sample=False).config
    scheduler = sampling_scheduler(name, train_config)
    if name == "ddim":
        scheduler = DDIMScheduler.from_config(scheduler.config, set_alpha_to_one=True)
    pipe = DiMRPipeline(model=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.tensor([1, 7, 10])
    images = pipe(class_labels=labels, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    x0 = model.x0[labels]
    abar = model.alphas_cumprod
    abar_end = abar[0] if ends_at_n_equal_one else torch.tensor(1.0)
    z = torch.randn(3, 1, 4, 6, generator=torch.Generator().manual_seed(0))
    e = (z - abar[scheduler.timesteps[0]].sqrt() * x0) / (1 - abar[scheduler.timesteps[0]]).sqrt()
    expected = abar_end.sqrt() * x0 + (1 - abar_end).sqrt() * e
    assert images.shape == (3, 1, 4, 6)
    assert torch.allclose(images, expected / 2 + 0.5, atol=2e-5)
