"""Class-conditional sampling for DiMR (arXiv 2406.09416): the official CFG schedule.

:class:`DiMRPipeline` is the :class:`~genforge.pipelines.class_conditional.ClassConditionalPipeline`
a DiMR training run saves (the diffusion probe requires one), plus the official "cfg decay" of
DiMR's ``eval.py``. CFG follows diffusers: eps = eps_u + w * (eps_c - eps_u), w =
``guidance_scale``. The official DiMR scale s (eps = eps_c + s * (eps_c - eps_u)) is w = 1 + s;
the released config's s = 0.4 is w = 1.4. With ``guidance_decay_power`` = p > 0 the weight
follows w(n) = 1 + (w - 1) * (1 - cos(pi * (1 - n/N)^p)) / 2 at the official time n = t + 1 in
[1, N] (diffusers' t is n - 1), rising from 1 at n = N to nearly w at n = 1.

The scheduler is any diffusers scheduler; :func:`genforge.methods.sampling.sampling_scheduler`
builds the ones recipes name, including the official sampler (DPM-Solver++ singlestep,
"fast" orders 3/2/1).
"""

from __future__ import annotations

import math

import torch

from genforge.pipelines.class_conditional import ClassConditionalPipeline


def guidance_weight(scale: float, timestep: torch.Tensor, num_train_timesteps: int,
                    decay_power: float | None) -> float:
    """CFG weight at diffusers timestep t: constant, or the official cosine "cfg decay" at n = t + 1."""
    if not decay_power:
        return scale
    n = float(timestep) + 1
    ramp = (1 - math.cos(math.pi * (1 - n / num_train_timesteps) ** decay_power)) / 2
    return 1 + (scale - 1) * ramp


class DiMRPipeline(ClassConditionalPipeline):
    """``pipe(class_labels=[0, 1, 2], guidance_scale=1.4, guidance_decay_power=None)``."""

    _decay_power: float | None = None

    def guidance_weight(self, scale: float, timestep: torch.Tensor) -> float:
        return guidance_weight(scale, timestep, self.scheduler.config.num_train_timesteps, self._decay_power)

    @torch.no_grad()
    def __call__(self, class_labels: list[int] | torch.Tensor, guidance_scale: float = 1.0,
                 guidance_decay_power: float | None = None, num_inference_steps: int = 50,
                 generator: torch.Generator | None = None, output_type: str = "pil", return_dict: bool = True,
                 latents: torch.Tensor | None = None):
        self._decay_power = guidance_decay_power
        try:
            return self._sample(class_labels, guidance_scale, num_inference_steps, generator, output_type,
                                return_dict, latents)
        finally:
            self._decay_power = None
