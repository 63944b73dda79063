"""Class-conditional sampling for DiMR (arXiv 2406.09416) on diffusers schedulers.

:class:`DiMRPipeline` composes an epsilon-predicting class-conditional network and a diffusers
scheduler. It works with any network called as ``model(x, t, class_labels=y)`` whose output
has ``.sample`` (our DiMR and DiT baseline, diffusers' ``UNet2DModel``), so the baselines DiMR
is measured against are sampled by the same code.

Classifier-free guidance (Ho & Salimans 2022) in diffusers' convention:
eps = eps_u + w * (eps_c - eps_u), with w = ``guidance_scale`` (1 = no guidance). The
official DiMR scale s (eps = eps_c + s * (eps_c - eps_u)) is w = 1 + s; the released
config's s = 0.4 is w = 1.4. With ``guidance_decay_power`` = p > 0 the official "cfg decay"
(``eval.py``) applies: w(n) = 1 + (w - 1) * (1 - cos(pi * (1 - n/N)^p)) / 2 with the official
time n = t + 1 in [1, N] (diffusers' t is n - 1), rising from 1 at n = N to nearly w at n = 1.

The scheduler is any diffusers scheduler; :func:`genforge.methods.sampling.sampling_scheduler`
builds the ones recipes name, including the official sampler (DPM-Solver++ singlestep,
"fast" orders 3/2/1).
"""

from __future__ import annotations

import math

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput


def null_class_of(model) -> int:
    """The unconditional class index of a class-conditional network."""
    if hasattr(model, "null_class"):
        return int(model.null_class)
    num_class_embeds = getattr(model.config, "num_class_embeds", None)
    if num_class_embeds is None:
        raise ValueError(f"{type(model).__name__} is not class-conditional (no null class)")
    return int(num_class_embeds) - 1


def guidance_weight(scale: float, timestep: torch.Tensor, num_train_timesteps: int,
                    decay_power: float | None) -> float:
    """CFG weight at diffusers timestep t: constant, or the official cosine "cfg decay" at n = t + 1."""
    if not decay_power:
        return scale
    n = float(timestep) + 1
    ramp = (1 - math.cos(math.pi * (1 - n / num_train_timesteps) ** decay_power)) / 2
    return 1 + (scale - 1) * ramp


def sample_shape(sample_size: int | list[int]) -> tuple[int, int]:
    """(height, width) of a model's ``sample_size``, an int (square) or a [height, width] pair."""
    return (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)


class DiMRPipeline(DiffusionPipeline):
    """Sample images of given classes: ``pipe(class_labels=[0, 1, 2], guidance_scale=1.4)``."""

    model_cpu_offload_seq = "model"

    def __init__(self, model, scheduler):
        super().__init__()
        self.register_modules(model=model, scheduler=scheduler)

    def _noise_prediction(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, scale: float,
                          decay_power: float | None) -> torch.Tensor:
        if scale == 1.0:
            return self.model(x, t, class_labels=labels).sample
        null = torch.full_like(labels, null_class_of(self.model))
        both = self.model(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample
        cond, uncond = both.chunk(2)
        weight = guidance_weight(scale, t, self.scheduler.config.num_train_timesteps, decay_power)
        return uncond + weight * (cond - uncond)

    @torch.no_grad()
    def __call__(self, class_labels: list[int] | torch.Tensor, guidance_scale: float = 1.0,
                 guidance_decay_power: float | None = None, num_inference_steps: int = 50,
                 generator: torch.Generator | None = None, output_type: str = "pil",
                 return_dict: bool = True):
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 disables guidance), got {guidance_scale}")
        labels = torch.as_tensor(class_labels, device=self.device, dtype=torch.long).reshape(-1)
        null = null_class_of(self.model)
        if labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) > null:
            raise ValueError(f"class_labels must lie in [0, {null}] ({null} = unconditional), got {labels.tolist()}")
        config = self.model.config
        shape = (labels.shape[0], config.in_channels, *sample_shape(config.sample_size))
        x = torch.randn(shape, generator=generator, device="cpu" if generator is None else generator.device,
                        dtype=self.model.dtype).to(self.device)
        x = x * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(x, t)
            eps = self._noise_prediction(model_input, t, labels, guidance_scale, guidance_decay_power)
            x = self.scheduler.step(eps, t, x, generator=generator, return_dict=False)[0]
        images = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return ImagePipelineOutput(images=images) if return_dict else (images,)
        array = images.permute(0, 2, 3, 1).float().cpu().numpy()
        if output_type == "pil":
            array = self.numpy_to_pil(array)
        return ImagePipelineOutput(images=array) if return_dict else (array,)

