"""Class-conditional sampling of masked-token generators: ENAT, its MaskGIT baseline, the aMUSEd peer.

Both pipelines compose a token network and a VQ tokenizer (``vqvae``: a diffusers ``VQModel`` with
``lookup_from_codebook=True``, or the official MaskGIT VQGAN,
:class:`~genforge.models.maskgit_vqgan.MaskGITVQGAN`; both decode through
:func:`genforge.models.tokenizers.as_tokenizer`) and run the official ENAT decoding
loop (``NATSchedule.generate``, :func:`genforge.models.maskgit.iterative_decode`): T steps from
all-[MASK], the masking schedule (``schedule="cosine"``, official, or ``"linear"``), sampling
temperature ``samp_temp`` and Gumbel re-masking temperature ``mask_temp``, both annealed by
(1 - (s+1)/T).

Classifier-free guidance uses the official convention l = l_c + w_s (l_c - l_u) with
w_s = (s/T) ``guidance_scale`` (``guidance_ramp="linear"``, official; 0 on the first step) or
w_s = ``guidance_scale`` (``"constant"``). ``guidance_scale=0`` disables guidance (diffusers'
scale is 1 + w). Official defaults at 256 px: 8 steps, w = 2.5, mask_temp 1.5, samp_temp 6.

:class:`ENATPipeline` runs the conditional and the null-class pass separately, each with its own
:class:`~genforge.models.enat.ReuseCache` (``reuse=True``: only newly revealed tokens are
encoded each step; set ``pipe.reuse = False`` to encode every visible token at every step).
:class:`AmusedClassPipeline` samples the aMUSEd peer with diffusers' ``AmusedScheduler``.
"""

from __future__ import annotations

import math

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from genforge.models.enat import ReuseCache
from genforge.models.maskgit import check_decoding, check_labels, iterative_decode
from genforge.models.tokenizers import as_tokenizer


class MaskedTokenPipeline(DiffusionPipeline):
    """Shared loop: labels -> tokens (:meth:`generate_tokens`) -> images through the VQ decoder.

    A subclass defines ``predictor(labels)``, which returns ``predict(ids, step, guided) ->
    (l_c, l_u or None)`` for :func:`~genforge.models.maskgit.iterative_decode`.
    """

    model_cpu_offload_seq = "model->vqvae"

    def __init__(self, model, vqvae):
        super().__init__()
        self.register_modules(model=model, vqvae=vqvae)

    def token_grid(self) -> tuple[int, int]:
        side = math.isqrt(self.model.config.num_tokens)
        if side * side != self.model.config.num_tokens:
            raise ValueError(f"num_tokens={self.model.config.num_tokens} is not a square token grid")
        return side, side

    @torch.no_grad()
    def generate_tokens(self, class_labels, num_inference_steps: int = 8, guidance_scale: float = 0.0,
                        guidance_ramp: str = "linear", mask_temp: float = 1.5, samp_temp: float = 6.0,
                        generator: torch.Generator | None = None, schedule: str = "cosine",
                        callback=None) -> torch.Tensor:
        """(B, L) code ids for ``class_labels`` (B,), by the official ENAT loop (module docstring)."""
        labels, config = self.check_labels(class_labels), self.model.config
        return iterative_decode(self.predictor(labels), labels.shape[0], config.num_tokens, config.codebook_size,
                                steps=num_inference_steps, guidance_scale=guidance_scale,
                                guidance_ramp=guidance_ramp, mask_temp=mask_temp, samp_temp=samp_temp,
                                generator=generator, schedule=schedule, device=self.device, callback=callback)

    @torch.no_grad()
    def decode_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> images in [0, 1], (B, C, H, W)."""
        images = as_tokenizer(self.vqvae).decode_ids(ids, self.token_grid())
        return (images / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def __call__(self, class_labels, num_inference_steps: int = 8, guidance_scale: float = 0.0,
                 generator: torch.Generator | None = None, output_type: str = "pil", return_dict: bool = True,
                 **sampling):
        """Images of ``class_labels``: ``pipe([0, 1, 2], num_inference_steps=8, guidance_scale=2.5)``;
        ``sampling``: the other arguments of :meth:`generate_tokens` (temperatures, ramp, schedule)."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        ids = self.generate_tokens(class_labels, num_inference_steps=num_inference_steps,
                                   guidance_scale=guidance_scale, generator=generator, **sampling)
        images = self.decode_tokens(ids)
        if output_type != "pt":
            images = images.permute(0, 2, 3, 1).float().cpu().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def check_labels(self, class_labels) -> torch.Tensor:
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=self.device).reshape(-1)
        if labels.numel() == 0:
            raise ValueError("class_labels is empty")
        check_labels(labels, self.model.config.num_classes, labels.shape[0])
        return labels


class MaskGITPipeline(MaskedTokenPipeline):
    """The NAT baseline: every step runs the full transformer on all L tokens (both CFG branches
    in one batch)."""

    def predictor(self, labels: torch.Tensor):
        null = torch.full_like(labels, self.model.config.num_classes)

        def predict(ids, step, guided):
            if not guided:
                return self.model(ids, labels).logits, None
            cond, uncond = self.model(torch.cat([ids, ids]), torch.cat([labels, null])).logits.chunk(2)
            return cond, uncond

        return predict


class ENATPipeline(MaskedTokenPipeline):
    """ENAT: each CFG branch keeps its own :class:`ReuseCache` across steps (``reuse=True``)."""

    def __init__(self, model, vqvae):
        super().__init__(model, vqvae)
        self.reuse = True  # set False to encode every visible token at every step

    def predictor(self, labels: torch.Tensor):
        caches = {"cond": ReuseCache(), "uncond": ReuseCache()}
        branch_labels = {"cond": labels, "uncond": torch.full_like(labels, self.model.config.num_classes)}
        reuse = self.reuse

        def run(branch, ids):
            out = self.model(ids, branch_labels[branch], cache=caches[branch] if reuse else None)
            caches[branch] = out.cache
            return out.logits

        def predict(ids, step, guided):
            return run("cond", ids), (run("uncond", ids) if guided else None)

        return predict


class AmusedClassPipeline(MaskedTokenPipeline):
    """The aMUSEd peer (:class:`~genforge.models.amused_class.AmusedClassModel`) sampled with
    diffusers' ``AmusedScheduler``: softmax sampling at temperature 1, Gumbel top-k re-masking
    with a temperature falling linearly over ``temperature = (start, end)`` (aMUSEd's default
    (2, 0)), cosine schedule. CFG as the NAT pipelines: l = l_c + w (l_c - l_u), constant w."""

    model_cpu_offload_seq = "model->vqvae"

    def __init__(self, model, vqvae, scheduler):
        DiffusionPipeline.__init__(self)
        self.register_modules(model=model, vqvae=vqvae, scheduler=scheduler)

    @torch.no_grad()
    def generate_tokens(self, class_labels, num_inference_steps: int = 8, guidance_scale: float = 0.0,
                        temperature: tuple[float, float] = (2.0, 0.0), generator: torch.Generator | None = None,
                        callback=None) -> torch.Tensor:
        labels = self.check_labels(class_labels)
        check_decoding(num_inference_steps, 0.0, 0.0, guidance_scale)
        null = torch.full_like(labels, self.model.config.num_classes)
        ids = torch.full((labels.shape[0], self.model.config.num_tokens), self.model.config.codebook_size,
                         dtype=torch.long, device=self.device)
        self.scheduler.set_timesteps(num_inference_steps, temperature=tuple(temperature), device=self.device)
        for step, timestep in enumerate(self.scheduler.timesteps):
            if guidance_scale > 0:
                cond, uncond = self.model(torch.cat([ids, ids]), torch.cat([labels, null])).logits.chunk(2)
                logits = cond + guidance_scale * (cond - uncond)
            else:
                logits = self.model(ids, labels).logits
            ids = self.scheduler.step(logits, timestep, ids, generator=generator).prev_sample
            if callback is not None:
                callback(step, ids, guidance_scale)
        return ids
