"""Class-conditional sampling of any epsilon-predicting denoiser on diffusers schedulers.

:class:`ClassConditionalPipeline` composes a class-conditional noise predictor, called as
``model(x, t, class_labels=y)`` with ``t`` repeated over the batch and an output with
``.sample`` (diffusers' ``DiTTransformer2DModel`` and ``UNet2DModel`` with a class table, our
DiMR), and any diffusers scheduler, in the model's own (pixel or latent) space: no VAE.
``output_type="latent"`` returns the final sample as it is (no [0, 1] mapping or clamping), for
a model of VAE latents whose run decodes them (:func:`genforge.methods.sampling.latent_decoder`).
A training run of the DiT or UNet baseline saves one; a DiMR run saves the
:class:`~genforge.pipelines.dimr.DiMRPipeline`, which adds DiMR's guidance schedule.

Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598) in diffusers' convention:
eps = eps_u + w * (eps_c - eps_u), with w = ``guidance_scale`` (1 = no guidance) and eps_u the
prediction for the network's null class (:func:`genforge.core.embed.null_class_of`).
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from genforge.core.embed import null_class_of


def sample_shape(sample_size: int | list[int]) -> tuple[int, int]:
    """(height, width) of a model's ``sample_size``, an int (square) or a [height, width] pair."""
    return (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)


class ClassConditionalPipeline(DiffusionPipeline):
    """Sample images of given classes: ``pipe(class_labels=[0, 1, 2], guidance_scale=2.0)``."""

    model_cpu_offload_seq = "model"

    def __init__(self, model, scheduler):
        super().__init__()
        self.register_modules(model=model, scheduler=scheduler)

    def guidance_weight(self, scale: float, timestep: torch.Tensor) -> float:
        """The CFG weight w at ``timestep``: constant here."""
        return scale

    def _noise_prediction(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                          scale: float) -> torch.Tensor:
        if scale == 1.0:
            return self.model(x, t.expand(x.shape[0]), class_labels=labels).sample
        null = torch.full_like(labels, null_class_of(self.model))
        both = self.model(torch.cat([x, x]), t.expand(2 * x.shape[0]), class_labels=torch.cat([labels, null])).sample
        cond, uncond = both.chunk(2)
        return uncond + self.guidance_weight(scale, t) * (cond - uncond)

    @torch.no_grad()
    def __call__(self, class_labels: list[int] | torch.Tensor, guidance_scale: float = 1.0,
                 num_inference_steps: int = 50, generator: torch.Generator | None = None,
                 output_type: str = "pil", return_dict: bool = True, latents: torch.Tensor | None = None):
        """``latents``: the starting noise (B, C, H, W), drawn from ``generator`` when not given."""
        return self._sample(class_labels, guidance_scale, num_inference_steps, generator, output_type, return_dict,
                            latents)

    def _sample(self, class_labels, guidance_scale, num_inference_steps, generator, output_type, return_dict,
                latents):
        """:meth:`__call__` without ``no_grad``: ReNO differentiates through it."""
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 disables guidance), got {guidance_scale}")
        labels = torch.as_tensor(class_labels, device=self.device, dtype=torch.long).reshape(-1)
        null = null_class_of(self.model)
        if labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) > null:
            raise ValueError(f"class_labels must lie in [0, {null}] ({null} = unconditional), got {labels.tolist()}")
        config = self.model.config
        shape = (labels.shape[0], config.in_channels, *sample_shape(config.sample_size))
        if latents is None:
            x = randn_tensor(shape, generator=generator, device=self.device, dtype=self.model.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for {labels.shape[0]} labels, got {tuple(latents.shape)}")
        else:
            x = latents.to(self.device, self.model.dtype)
        x = x * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(x, t)
            eps = self._noise_prediction(model_input, t, labels, guidance_scale)
            x = self.scheduler.step(eps, t, x, generator=generator, return_dict=False)[0]
        if output_type == "latent":
            return ImagePipelineOutput(images=x) if return_dict else (x,)
        images = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return ImagePipelineOutput(images=images) if return_dict else (images,)
        array = images.permute(0, 2, 3, 1).float().cpu().numpy()
        if output_type == "pil":
            array = self.numpy_to_pil(array)
        return ImagePipelineOutput(images=array) if return_dict else (array,)
