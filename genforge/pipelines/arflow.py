"""Sampling ARFlow (arXiv 2501.16085) and its SiT baseline: SiT's SDE Euler-Maruyama or an Euler ODE.

Both networks predict the velocity u = x1 - x0 of the linear path x_t = t x1 + (1 - t) x0
(SiT convention: t = 0 is noise, t = 1 data). Sampling integrates from t = 0 to 1 with exactly
one network call per step, as the official ``sample.py`` does through SiT's ``transport``:

- ``sampler="sde"`` (the official sampler): SiT's SDE with diffusion form "sigma",
  w_t = 1 - t. The score of the linear path is s = (t v - x) / (1 - t), so the drift is
  f = v + w_t s = (1 + t) v - x. N steps take N - 1 Euler-Maruyama updates
  x <- x + f dt + sqrt(2 w_t dt) eps on t_n = linspace(0, 1 - h, N) (dt = t_1 - t_0), then
  the "Mean" last step x <- x + f(x, 1 - h) h without noise, h = ``last_step_size`` = 0.04.
- ``sampler="ode"``: Euler steps x <- x + v dt on linspace(0, 1, N + 1). Ours: the official ODE
  is torchdiffeq's adaptive dopri5, several calls per step, which a stateful model cannot take.

ARFlow carries, per block, the attention state of the sample's own earlier iterates across the
steps: :class:`ARFlowPipeline` feeds one image per call (S = 1) at time t_n with an
:class:`~genforge.models.arflow.ARFlowCache` created empty for each batch (the official
``models_infer.py`` keeps it on the blocks' ``incremental_state``); the cache belongs to the
call, never to the modules. About N iterates pass through the state, against the 5 images of a
training sequence.

Classifier-free guidance: the batch is doubled, [conditional; null class], in one network call
per step; each row carries its own state, so the conditional and unconditional branches each
accumulate their own iterates. v = v_u + w (v_c - v_u), w = ``guidance_scale`` (1 = off, no
doubling). The official ``forward_with_cfg`` guides only the first 3 of the 4 latent channels
(a DiT legacy quirk, the 4th keeps v_c); ``guidance_channels=3`` reproduces that, the default
guides every channel.

:class:`SiTPipeline` is the same sampler around diffusers' ``DiTTransformer2DModel`` trained
on the same objective (the SiT baseline, arXiv 2401.08740): a stateless network, one image per call.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from genforge.core.embed import null_class_of
from genforge.models.arflow import ARFlowCache
from genforge.pipelines.class_conditional import sample_shape

SAMPLERS = ("sde", "ode")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def sde_drift(velocity: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    """SiT's SDE drift on the linear path with w_t = 1 - t: v + w_t * score = (1 + t) v - x."""
    return (1 + t) * velocity - x


def guide(velocity: torch.Tensor, scale: float, channels: int | None) -> torch.Tensor:
    """v_u + w (v_c - v_u) from the doubled batch [cond; uncond], on the first ``channels`` channels
    (all when None); the rest keep v_c."""
    cond, uncond = velocity.chunk(2)
    guided = uncond + scale * (cond - uncond)
    if channels is None:
        return guided
    return torch.cat([guided[:, :channels], cond[:, channels:]], dim=1)


class SiTPipeline(DiffusionPipeline):
    """``pipe(class_labels=[0, 1], guidance_scale=1.5, num_inference_steps=250, sampler="sde")``
    around a velocity network called as ``model(x, timestep=t, class_labels=y)``."""

    model_cpu_offload_seq = "model"

    def __init__(self, model, sampler: str = "sde"):
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
        self.register_modules(model=model)
        self.register_to_config(sampler=sampler)

    def new_cache(self):
        """The per-batch state the network carries across steps (none for a stateless network)."""
        return None

    def model_velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, cache) -> torch.Tensor:
        return self.model(x, timestep=t, class_labels=labels).sample

    def velocity(self, x: torch.Tensor, t: float, labels: torch.Tensor, scale: float, cache,
                 channels: int | None) -> torch.Tensor:
        """The (guided) velocity at time t: exactly one network call."""
        if scale == 1.0:
            return self.model_velocity(x, torch.full((x.shape[0],), t, device=x.device), labels, cache)
        null = torch.full_like(labels, null_class_of(self.model))
        both = self.model_velocity(torch.cat([x, x]), torch.full((2 * x.shape[0],), t, device=x.device),
                                   torch.cat([labels, null]), cache)
        return guide(both, scale, channels)

    def _check(self, labels: torch.Tensor, scale: float, steps: int, sampler: str, output_type: str) -> None:
        null = null_class_of(self.model)
        if labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) > null:
            raise ValueError(f"class_labels must lie in [0, {null}] ({null} = unconditional), got {labels.tolist()}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
        if steps < (2 if sampler == "sde" else 1):
            raise ValueError(f"num_inference_steps must be >= {2 if sampler == 'sde' else 1} for the {sampler} "
                             f"sampler, got {steps}")
        if scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 disables guidance), got {scale}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")

    @torch.no_grad()
    def __call__(self, class_labels: list[int] | torch.Tensor, guidance_scale: float = 1.0,
                 num_inference_steps: int = 250, sampler: str | None = None, generator: torch.Generator | None = None,
                 guidance_channels: int | None = None, last_step_size: float = 0.04, output_type: str = "pil",
                 return_dict: bool = True):
        sampler = sampler or self.config.sampler
        labels = torch.as_tensor(class_labels, device=self.device, dtype=torch.long).reshape(-1)
        self._check(labels, guidance_scale, num_inference_steps, sampler, output_type)
        config = self.model.config
        shape = (labels.shape[0], config.in_channels, *sample_shape(config.sample_size))
        x = randn_tensor(shape, generator=generator, device=self.device, dtype=self.model.dtype)
        cache = self.new_cache()  # a fresh state for every batch
        step = lambda x, t: self.velocity(x, t, labels, guidance_scale, cache, guidance_channels)  # noqa: E731
        if sampler == "ode":
            times = torch.linspace(0, 1, num_inference_steps + 1).tolist()
            for t, t_next in self.progress_bar(list(zip(times[:-1], times[1:]))):
                x = x + step(x, t) * (t_next - t)
        else:
            times = torch.linspace(0, 1 - last_step_size, num_inference_steps).tolist()
            dt = times[1] - times[0]
            for t in self.progress_bar(times[:-1]):
                noise = randn_tensor(shape, generator=generator, device=self.device, dtype=x.dtype)
                x = x + sde_drift(step(x, t), x, t) * dt + (2 * (1 - t) * dt) ** 0.5 * noise
            x = x + sde_drift(step(x, times[-1]), x, times[-1]) * last_step_size  # the "Mean" last step
        if output_type == "latent":
            return ImagePipelineOutput(images=x) if return_dict else (x,)
        images = (x / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.permute(0, 2, 3, 1).float().cpu().numpy()
            images = self.numpy_to_pil(images) if output_type == "pil" else images
        return ImagePipelineOutput(images=images) if return_dict else (images,)


class ARFlowPipeline(SiTPipeline):
    """ARFlow's sampler: one image per call with the per-block state in a fresh :class:`ARFlowCache`."""

    def new_cache(self) -> ARFlowCache:
        return ARFlowCache()

    def model_velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, cache) -> torch.Tensor:
        return self.model(x[:, None], t[:, None], labels, cache=cache).sample[:, 0]
