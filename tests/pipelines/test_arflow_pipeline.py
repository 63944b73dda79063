"""Specification of ARFlow's sampler (genforge.pipelines.arflow): SiT's SDE Euler-Maruyama with
its "Mean" last step, an Euler ODE, one network call per step, the state carried per batch in an
explicit cache, and classifier-free guidance with one state per branch."""

import pytest
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin

from genforge.models.arflow import ARFlowCache, ARFlowModel, arflow_config
from genforge.pipelines import load_saved_pipeline
from genforge.pipelines.arflow import ARFlowPipeline, SiTPipeline, guide


def random_tiny_model(seed=0) -> ARFlowModel:
    """The tiny config with every weight perturbed, so outputs depend on inputs, state and label."""
    torch.manual_seed(seed)
    model = ARFlowModel(**arflow_config("tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


class PointMassVelocity(ModelMixin, ConfigMixin):
    """The exact velocity of the linear path to a point mass mu_y: v = (mu_y - x) / (1 - t)."""

    @register_to_config
    def __init__(self, in_channels: int = 1, sample_size: int = 4, num_embeds_ada_norm: int = 3):
        super().__init__()
        self.register_buffer("mu", torch.linspace(-1, 1, 4 * sample_size * sample_size).reshape(
            4, in_channels, sample_size, sample_size))  # row 3: the null class

    def forward(self, x, timestep, class_labels):
        t = timestep.reshape(-1, 1, 1, 1)
        return Transformer2DModelOutput(sample=(self.mu[class_labels] - x) / (1 - t))


def pipe_of(model) -> ARFlowPipeline:
    pipe = ARFlowPipeline(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_ode_sampler_lands_on_a_point_mass_with_its_exact_velocity():
    pipe = SiTPipeline(PointMassVelocity(), sampler="ode")
    pipe.set_progress_bar_config(disable=True)
    labels = torch.tensor([0, 1, 2, 1])
    out = pipe(labels, num_inference_steps=20, generator=torch.Generator().manual_seed(0), output_type="latent")
    torch.testing.assert_close(out.images, pipe.model.mu[labels], atol=1e-5, rtol=0)


def test_sde_sampler_with_mean_last_step_gives_the_path_marginal_at_its_last_time():
    """With the exact velocity of a point mass mu, the SDE keeps the path's marginal
    x_t ~ N(t mu, (1 - t)^2); the "Mean" step from t = 0.96 maps x to 1.96 mu - x, so the samples
    are N(mu, 0.04^2): centred on mu with standard deviation 0.04."""
    pipe = SiTPipeline(PointMassVelocity(), sampler="sde")
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(300) % 3
    out = pipe(labels, num_inference_steps=250, generator=torch.Generator().manual_seed(0), output_type="latent")
    error = out.images - pipe.model.mu[labels]
    assert abs(error.mean()) < 0.004
    assert abs(error.std() - 0.04) < 0.004, error.std()


def test_guidance_with_w_1_equals_the_conditional_output_with_a_state_per_branch():
    model = random_tiny_model()
    pipe = pipe_of(model)
    labels = torch.tensor([1, 4])
    null = torch.full_like(labels, model.null_class)
    cond_cache, both_cache = ARFlowCache(), ARFlowCache()
    for step in range(4):  # the states carry four different iterates
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(step))
        t = torch.full((2,), 0.2 * step)
        cond = pipe.model_velocity(x, t, labels, cond_cache)
        both = pipe.model_velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]), both_cache)
        torch.testing.assert_close(guide(both, 1.0, None), cond, atol=1e-6, rtol=0)
        assert (both[2:] - both[:2]).abs().max() > 1e-3  # the unconditional branch differs
    guided = guide(both, 3.0, 3)  # the official quirk: channels 0-2 guided, channel 3 keeps v_c
    torch.testing.assert_close(guided[:, 3], both[:2, 3])
    torch.testing.assert_close(guided[:, :3], both[2:, :3] + 3.0 * (both[:2, :3] - both[2:, :3]))


@pytest.mark.parametrize("sampler,scale", [("sde", 1.0), ("sde", 2.0), ("ode", 2.0)])
def test_one_model_call_per_step_from_a_fresh_cache_per_batch(sampler, scale):
    model = random_tiny_model()
    pipe = pipe_of(model)
    calls = []

    def spy(module, args, kwargs):
        cache = kwargs["cache"]
        calls.append((id(cache), len(cache.states), args[0].shape))

    handle = model.register_forward_pre_hook(spy, with_kwargs=True)
    outputs = [pipe([0, 3], guidance_scale=scale, num_inference_steps=6, sampler=sampler, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images for _ in range(2)]
    handle.remove()
    assert len(calls) == 12  # exactly one network call per step, CFG included
    first, second = calls[:6], calls[6:]
    for batch in (first, second):
        assert len({cache for cache, _, _ in batch}) == 1  # one cache through a batch's steps
        assert batch[0][1] == 0 and all(n == 2 for _, n, _ in batch[1:])  # empty at the start, then filled
        assert all(shape == (2 * 2 if scale != 1 else 2, 1, 4, 8, 8) for _, _, shape in batch)  # one image per call
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)  # no state leaks from batch to batch


def test_the_carried_state_shapes_the_samples():
    """Sampling with the state reset at every step (no earlier iterates) gives other samples."""
    model = random_tiny_model()
    pipe = pipe_of(model)
    kwargs = dict(num_inference_steps=5, output_type="latent")
    carried = pipe([2, 5], generator=torch.Generator().manual_seed(1), **kwargs).images

    class Forgetful(ARFlowPipeline):
        def model_velocity(self, x, t, labels, cache):
            return super().model_velocity(x, t, labels, ARFlowCache())

    forgetful = Forgetful(model)
    forgetful.set_progress_bar_config(disable=True)
    reset = forgetful([2, 5], generator=torch.Generator().manual_seed(1), **kwargs).images
    assert (carried - reset).abs().max() > 1e-3


def test_save_and_load_round_trip_keeps_weights_and_sampler(tmp_path):
    pipe = ARFlowPipeline(random_tiny_model(), sampler="ode")
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = load_saved_pipeline(tmp_path / "pipe")
    assert isinstance(loaded, ARFlowPipeline) and loaded.config.sampler == "ode"
    for p in (pipe, loaded):
        p.set_progress_bar_config(disable=True)
    a, b = (p([1, 2], guidance_scale=1.5, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
              output_type="pt").images for p in (pipe, loaded))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    ({"class_labels": [0, 11]}, r"class_labels must lie in \[0, 10\]"),
    ({"sampler": "heun"}, r"sampler must be one of \['sde', 'ode'\], got 'heun'"),
    ({"num_inference_steps": 1}, "num_inference_steps must be >= 2 for the sde sampler"),
    ({"guidance_scale": 0.5}, "guidance_scale must be >= 1"),
])
def test_bad_input_is_refused_before_any_model_call(kwargs, match):
    model = random_tiny_model()
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=match):
        pipe_of(model)(**{"class_labels": [0, 1], **kwargs})
    assert not calls
