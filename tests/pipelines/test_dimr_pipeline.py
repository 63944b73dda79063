"""Sampling DiMR through diffusers schedulers, with the official CFG forms."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

import genforge
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
    guided = pipe._noise_prediction(x, t, y, 1 + s)
    assert torch.allclose(guided, cond + s * (cond - uncond), atol=1e-5)


def test_cfg_decay_is_the_official_formula_at_the_official_time_n_equal_t_plus_one():
    # official eval.py: w(n) = (w - 1) * (1 - cos((1 - n/1000)^p * pi)) / 2 + 1, n = diffusers t + 1
    # t = 499: n = 500, (1 - 0.5)^2 = 0.25, cos(pi/4) = 0.70710678, w = 1 + 2 * 0.29289322 / 2
    assert guidance_weight(3.0, torch.tensor(499), 1000, 2.0) == pytest.approx(1.29289322, abs=1e-8)
    assert guidance_weight(3.0, torch.tensor(999), 1000, 2.0) == 1.0  # n = N: no guidance at all
    assert guidance_weight(3.0, torch.tensor(0), 1000, 1.0) == pytest.approx(1 + (1 - math.cos(0.999 * math.pi)))
    assert guidance_weight(3.0, torch.tensor(500), 1000, None) == 3.0


def test_cfg_decay_sets_the_weight_of_every_step_of_its_call_only():
    pipe = tiny_pipeline()
    seen = []
    weight = pipe.guidance_weight
    pipe.guidance_weight = lambda scale, t: seen.append((int(t), weight(scale, t))) or seen[-1][1]
    sample(pipe, guidance_scale=3.0, guidance_decay_power=2.0)
    assert len(seen) == 3 and seen[0][1] < seen[-1][1]
    for t, w in seen:
        assert w == pytest.approx(1 + 2 * (1 - math.cos(math.pi * (1 - (t + 1) / 1000) ** 2)) / 2)
    seen.clear()
    sample(pipe, guidance_scale=3.0)
    assert [w for _, w in seen] == [3.0, 3.0, 3.0]


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
