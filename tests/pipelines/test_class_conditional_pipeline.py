"""Sampling any class-conditional denoiser (the DiT and UNet baselines) and loading a saved
pipeline by the class its model_index.json names."""

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from genforge.methods.sampling import sampling_scheduler
from genforge.models.dimr import DiMRModel, dimr_config
from genforge.models.dit import DIT_CONFIGS, dit_baseline
from genforge.pipelines import PIPELINES, ClassConditionalPipeline, DiMRPipeline, load_saved_pipeline


def dit_pipeline() -> ClassConditionalPipeline:
    torch.manual_seed(0)
    model = dit_baseline(**DIT_CONFIGS["tiny"]).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm1.linear" in name or "proj_out" in name:
                param.normal_(std=0.05)
    pipe = ClassConditionalPipeline(model=model, scheduler=DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, **kwargs):
    return pipe(class_labels=[1, 7], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                output_type="pt", **kwargs).images


def test_guided_dit_prediction_mixes_the_label_and_diffusers_null_class():
    pipe = dit_pipeline()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor(500), torch.tensor([1, 7])
    cond = pipe.model(x, t.expand(2), class_labels=y).sample
    uncond = pipe.model(x, t.expand(2), class_labels=torch.tensor([10, 10])).sample  # num_embeds_ada_norm
    assert torch.allclose(pipe._noise_prediction(x, t, y, 3.0), uncond + 3.0 * (cond - uncond), atol=1e-6)


def test_a_saved_dit_pipeline_names_its_classes_and_loads_back_to_the_same_samples(tmp_path):
    pipe = dit_pipeline()
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "ClassConditionalPipeline"
    assert index["model"] == ["diffusers", "DiTTransformer2DModel"]
    loaded = load_saved_pipeline(tmp_path)
    assert type(loaded) is ClassConditionalPipeline
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(sample(loaded, guidance_scale=2.0), sample(pipe, guidance_scale=2.0))


def test_loading_takes_the_class_the_directory_names_and_refuses_a_mismatch_in_one_line(tmp_path):
    torch.manual_seed(0)
    DiMRPipeline(model=DiMRModel(**dimr_config("tiny")), scheduler=DDIMScheduler()).save_pretrained(tmp_path / "dimr")
    dit_pipeline().save_pretrained(tmp_path / "dit")
    assert type(load_saved_pipeline(tmp_path / "dimr")) is DiMRPipeline
    with pytest.raises(ValueError, match="holds a ClassConditionalPipeline, not a DiMRPipeline ") as err:
        load_saved_pipeline(tmp_path / "dit", DiMRPipeline)
    assert "\n" not in str(err.value)


def test_an_unknown_pipeline_class_is_named_with_the_known_ones(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    with pytest.raises(ValueError) as err:
        load_saved_pipeline(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "holds a DiTPipeline" in message
    assert all(name in message for name in PIPELINES)


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
        abar = self.alphas_cumprod[t.long()][:, None, None, None]  # t: (B,)
        return SimpleNamespace(sample=(x - abar.sqrt() * self.x0[class_labels]) / (1 - abar).sqrt())


@pytest.mark.parametrize("name, ends_at_n_equal_one", [
    ("ddim", False), ("ddpm", False), ("dpm++", False), ("dpm++singlestep", True)])
def test_exact_noise_of_a_point_mass_takes_every_sampler_to_that_point_on_a_non_square_grid(name, ends_at_n_equal_one):
    # With exact predictions the probability-flow solution is x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) e, e fixed by
    # the starting noise (diffusers' randn_tensor: torch.randn on the generator): DDIM and DPM-Solver++ follow it
    # exactly, DDPM's last step returns x0.
    model = PointMassOracle()
    train_config = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                 clip_sample=False).config
    scheduler = sampling_scheduler(name, train_config)
    if name == "ddim":
        scheduler = DDIMScheduler.from_config(scheduler.config, set_alpha_to_one=True)
    pipe = ClassConditionalPipeline(model=model, scheduler=scheduler)
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
