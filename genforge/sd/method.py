"""Training methods for SD-style text-to-image UNets: a teacher, and BK-SDM / A-SDM distillation.

- ``sd_text_to_image``: trains a ``UNet2DConditionModel`` teacher with the DDPM objective
  (Ho et al. 2020, Eq. 14) on text embeddings of the local tokenizer and small frozen CLIP text
  encoder of :mod:`genforge.sd.text`, with prompt dropout to the empty prompt for classifier-free
  guidance. On digits the prompts are class names ("a handwritten digit three") and the UNet
  denoises the 1x8x8 images directly (no VAE: the "latents" are the pixels).
- ``sd_distill``: prunes the teacher of a ``sd_text_to_image`` run by ``model.plan``
  (:func:`genforge.sd.prune.prune`) and trains the student with BK-SDM's losses
  (:class:`genforge.sd.distill.Distiller`), optionally with A-SDM's progressive incubation
  (:mod:`genforge.sd.incubation`): ``incubation_steps`` optimizer steps per stage inside the
  frozen teacher, then the whole student. The optimizer step is kept in a buffer of the trained
  module, so a resumed run continues in the right phase. Under DDP the hybrid runs through the
  wrapped student's forward, so the stage being trained has its gradients all-reduced.
  ``model.teacher`` is a ``sd_text_to_image`` run directory or a local diffusers Stable
  Diffusion directory (``model_index.json``, ``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
  ``scheduler``: SD-1.5 as released); the training noise schedule is the teacher's.

Data (``data.name``): ``digits`` (class-name prompts), ``image_text`` (an image-text folder:
captions encoded by the frozen text encoder at each step, images by the teacher's VAE when it
has one, as diffusers' ``train_text_to_image.py`` and BK-SDM do) or, for ``sd_distill``,
``sd_latents`` (a text cache of ``genforge cache-latents --text-encoder``: neither the VAE nor
the text encoder runs; the cache must have been made with the teacher's, checked before
training). The grids of captioned data show ``sample.prompts``.

Both save a stock diffusers ``StableDiffusionPipeline`` (tokenizer, text encoder, UNet, DDIM
scheduler, and the teacher's VAE when it has one; without a VAE the UNet denoises pixels, sampled
with ``output_type="latent"``) to ``<output_dir>/pipeline``, write a grid of the fixed prompts at
each checkpoint (``samples_step_N.png``) and at the end (``samples_grid.png``), and on digits score
samples with FID on digits-CNN features and classifier agreement, like the class-conditional
diffusion methods.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch import nn
from tqdm.auto import tqdm

from genforge.config import ConfigError, check_known_keys
from genforge.core.io import write_json
from genforge.data import build_dataset
from genforge.data.grid import save_class_grid
from genforge.data.latents import check_text_cache
from genforge.data.transforms import signed_to_uint8
from genforge.methods.sampling import score_samples
from genforge.sd.configs import UNET_CONFIGS
from genforge.sd.distill import Distiller, LossWeights
from genforge.sd.incubation import hybrid, incubation_phase, train_only
from genforge.sd.prune import PLANS, ASDMOptions, PlanError, feature_layers, prune
from genforge.sd.text import digit_prompt, encode_prompts, small_text_encoder, word_tokenizer
from genforge.train import Method, register_method

__all__ = ["TextToImageTeacher", "SDDistill", "load_text_to_image_pipeline"]

DIGITS_UNET = {**UNET_CONFIGS["sd-like-tiny"], "in_channels": 1, "out_channels": 1, "sample_size": 8}
"""The digits teacher: SD-1.x's stage layout (attention in all but the innermost stage) at toy width."""


def _scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon",
                         clip_sample=False)


def teacher_directory(path) -> Path | None:
    """The pipeline directory of ``model.teacher``: ``<run>/pipeline`` of a ``sd_text_to_image`` run, or a
    diffusers Stable Diffusion directory itself; None when it is neither."""
    for candidate in (Path(path) / "pipeline", Path(path)):
        if (candidate / "model_index.json").is_file():
            return candidate
    return None


def load_text_to_image_pipeline(directory) -> StableDiffusionPipeline:
    """The stock pipeline a run saved, or a Stable Diffusion directory (its VAE when it has one; no safety
    checker or image encoder)."""
    parts = {} if (Path(directory) / "vae" / "config.json").is_file() else {"vae": None}
    return StableDiffusionPipeline.from_pretrained(directory, safety_checker=None, feature_extractor=None,
                                                   image_encoder=None, requires_safety_checker=False, **parts)


def _pipeline(unet, tokenizer, text_encoder, scheduler, vae=None) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler.from_config(scheduler.config, set_alpha_to_one=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(unet.device)  # the pipeline runs on its first component's device: the text encoder's


@torch.no_grad()
def _generate(pipe, prompts: list[str], recipe, seed: int, desc: str) -> torch.Tensor:
    """Samples in [-1, 1] of ``prompts``, in batches from one seed: decoded by the pipeline's VAE when it
    has one, else the denoised latents themselves (pixels)."""
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for start in tqdm(range(0, len(prompts), recipe.eval.batch_size), desc=desc, unit="batch"):
        out = pipe(prompt=prompts[start:start + recipe.eval.batch_size], num_inference_steps=recipe.sample.steps,
                   guidance_scale=recipe.sample.guidance_scale, generator=generator,
                   output_type="latent" if pipe.vae is None else "pt")
        chunks.append((out.images if pipe.vae is None else out.images * 2 - 1).clamp(-1, 1).cpu())
    return torch.cat(chunks)


@register_method("sd_text_to_image")
class TextToImageTeacher(Method):
    """A text-conditioned UNet2DConditionModel on class-name prompts or an image-text folder (the teacher of
    the distillation runs)."""

    model_keys = {"unet": {}, "prompt_dropout": 0.1, "text_hidden_size": 32, "text_layers": 2}
    data_names = ("digits", "image_text")

    def __init__(self, recipe):
        super().__init__(recipe)
        self.validate_model_config(recipe.model)
        if recipe.data.name not in self.data_names:
            raise ConfigError(f"{self._source()}: data.name must be one of {list(self.data_names)}, "
                              f"got {recipe.data.name!r}")
        if recipe.data.name != "digits" and not recipe.sample.prompts:
            raise ConfigError(f"{self._source()}: data {recipe.data.name!r} has no class names: give the prompts of "
                              f"the sample grids as sample.prompts (a list of strings)")
        self.options = {**self.model_keys, **recipe.model}
        self.noise_scheduler, self.vae = _scheduler(), None
        self.tokenizer, self.text_encoder = self.text_conditioning()
        prompts = [digit_prompt(i) for i in range(10)] + [""]
        self.prompt_embeds = encode_prompts(self.tokenizer, self.text_encoder, prompts)  # (11, L, D), "" last

    def _source(self) -> str:
        return f"recipe for method {self.name!r}"

    def validate_model_config(self, model_cfg: dict) -> None:
        check_known_keys(model_cfg, sorted(self.model_keys), "model", self._source())
        unet = model_cfg.get("unet", {})
        if not isinstance(unet, dict):
            raise ConfigError(f"{self._source()}: model.unet must be a mapping of UNet2DConditionModel arguments")
        accepted = [p for p in inspect.signature(UNet2DConditionModel.__init__).parameters if p != "self"]
        check_known_keys(unet, accepted, "model.unet", self._source())
        dropout = model_cfg.get("prompt_dropout", 0.1)
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ConfigError(f"{self._source()}: model.prompt_dropout must be in [0, 1), got {dropout!r}")

    def text_conditioning(self):
        """A word-level tokenizer over the digit prompts, or over the folder's captions and the grid's prompts."""
        prompts = [digit_prompt(i) for i in range(10)]
        if self.recipe.data.name == "image_text":
            prompts = self._dataset().captions + list(self.recipe.sample.prompts)
        tokenizer = word_tokenizer(prompts, max_length=max(8, 2 + max(len(p.split()) for p in prompts)))
        return tokenizer, small_text_encoder(tokenizer, self.options["text_hidden_size"], self.options["text_layers"],
                                             seed=self.recipe.seed)

    def build_model(self) -> nn.Module:
        config = {**DIGITS_UNET, "cross_attention_dim": self.options["text_hidden_size"], **self.options["unet"]}
        unet = UNet2DConditionModel(**config)
        self.unet_config = unet.config
        return unet

    def train_dataset(self):
        dataset = self._dataset()
        self.check_fits(dataset, self.unet_config)
        return dataset

    def _dataset(self):
        data = self.recipe.data
        try:
            return build_dataset(data.name, split="train", root=data.root, image_size=data.image_size,
                                 resize=data.resize, channels=data.channels)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"{self._source()}: data: {err}") from None

    def check_fits(self, dataset, unet_config) -> None:
        """ConfigError unless the training latents have the UNet's ``in_channels``."""
        encoded = self.vae is not None and self.recipe.data.name == "image_text"
        channels = self.vae.config.latent_channels if encoded else dataset.channels
        if channels != unet_config.in_channels:
            what = f"the VAE's {channels}-channel latents" if encoded else f"{channels}-channel samples"
            raise ConfigError(f"{self._source()}: data {self.recipe.data.name!r} gives {what}, the UNet takes "
                              f"in_channels={unet_config.in_channels}")

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """The UNet's training samples: VAE posterior samples times its scaling factor for images of an
        image-text folder when there is a VAE, else the batch itself (pixels, or cached latents)."""
        if self.vae is None or self.recipe.data.name != "image_text":
            return images
        with torch.no_grad():
            vae = self.vae.to(images.device)
            return vae.encode(images.to(vae.dtype)).latent_dist.sample().float() * vae.config.scaling_factor

    def conditioning(self, cond, dropout: float, device) -> torch.Tensor:
        """Prompt embeddings of a batch's conditions -- digit labels (their class-name prompts), captions
        (encoded by the frozen text encoder) or cached hidden states -- each replaced by the empty prompt's
        with probability ``dropout``."""
        if self.recipe.data.name == "digits":
            labels = torch.where(torch.rand(cond.shape, device=cond.device) < dropout, 10, cond)
            return self.prompt_embeds.to(cond.device)[labels]
        if self.recipe.data.name == "image_text":
            cond = encode_prompts(self.tokenizer, self.text_encoder.to(device), list(cond))
        drop = torch.rand(len(cond), device=device) < dropout
        return torch.where(drop[:, None, None], self.prompt_embeds[10].to(device, cond.dtype), cond)

    def noisy(self, images: torch.Tensor):
        noise = torch.randn_like(images)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (images.shape[0],),
                                  device=images.device)
        return self.noise_scheduler.add_noise(images, noise, timesteps), timesteps, noise

    def training_step(self, model, batch):
        images, cond = batch
        noisy, timesteps, noise = self.noisy(self.latents(images))
        embeds = self.conditioning(cond, self.options["prompt_dropout"], noisy.device)
        prediction = model(noisy, timesteps, embeds).sample
        return F.mse_loss(prediction.float(), noise.float()), {}

    def unet_of(self, model) -> UNet2DConditionModel:
        return model

    def grid_prompts(self) -> list[str]:
        """One row per prompt: the ten class names on digits, else ``sample.prompts``."""
        prompts = self.recipe.sample.prompts
        if self.recipe.data.name == "digits":
            prompts = [digit_prompt(i) for i in range(10)]
        return [p for p in prompts for _ in range(self.recipe.sample.num_per_class)]

    def on_checkpoint(self, ema_model, output_dir: Path, step: int) -> None:
        with torch.random.fork_rng(devices=[]):  # sampling must not move the training RNG (exact resume)
            self._grid(self.unet_of(ema_model), Path(output_dir) / f"samples_step_{step:07d}.png")

    def _grid(self, unet, path: Path) -> None:
        was_training = unet.training
        pipe = _pipeline(unet.eval(), self.tokenizer, self.text_encoder, self.noise_scheduler, self.vae)
        save_class_grid(_generate(pipe, self.grid_prompts(), self.recipe, self.recipe.seed, "sampling grid"),
                        self.recipe.sample.num_per_class, path)
        unet.train(was_training)

    def on_train_end(self, ema_model, accelerator, output_dir: Path) -> dict:
        if not accelerator.is_main_process:
            return {}
        output_dir = Path(output_dir)
        unet = self.unet_of(ema_model).eval()
        pipe = _pipeline(unet, self.tokenizer, self.text_encoder, self.noise_scheduler, self.vae)
        pipe.save_pretrained(output_dir / "pipeline")
        self._grid(unet, output_dir / "samples_grid.png")
        metrics = {"unet_parameters": unet.num_parameters()}
        if self.recipe.data.name == "digits":
            labels = torch.arange(self.recipe.eval.num_samples) % 10
            images = _generate(pipe, [digit_prompt(int(y)) for y in labels], self.recipe, self.recipe.seed + 1,
                               "sampling for metrics")
            np.savez_compressed(output_dir / "samples.npz", images=signed_to_uint8(images).numpy(),
                                labels=labels.numpy(), resize=np.array(self.recipe.data.resize))
            metrics = {**score_samples(images, labels, self.recipe), **metrics}
        write_json(output_dir / "sample_metrics.json", metrics, indent=2)
        return metrics


class _Student(nn.Module):
    """The student UNet and the micro-batch counter that tells incubation its phase (saved with it)."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet
        self.register_buffer("micro_steps", torch.zeros((), dtype=torch.long))

    def forward(self, *args, through: nn.Module | None = None, **kwargs):
        """The student UNet, or ``through``: an incubation hybrid holding some of its modules. Either way the
        call goes through this module, so a DDP wrapper all-reduces the gradients of what was trained."""
        return (self.unet if through is None else through)(*args, **kwargs)


@register_method("sd_distill")
class SDDistill(TextToImageTeacher):
    """BK-SDM / A-SDM distillation of a ``sd_text_to_image`` teacher or a Stable Diffusion UNet into a pruned
    student."""

    model_keys = {"teacher": None, "plan": "bk-small", "asdm": None, "loss": {}, "incubation_steps": 0,
                  "incubation_order": None, "prompt_dropout": 0.1}
    data_names = ("digits", "image_text", "sd_latents")
    find_unused_parameters = True  # incubation trains one stage at a time

    def validate_model_config(self, model_cfg: dict) -> None:
        check_known_keys(model_cfg, sorted(self.model_keys), "model", self._source())
        teacher = model_cfg.get("teacher")
        if not teacher or teacher_directory(teacher) is None:
            raise ConfigError(f"{self._source()}: model.teacher must be a finished sd_text_to_image run directory "
                              f"(with pipeline/model_index.json) or a Stable Diffusion directory (with "
                              f"model_index.json), got {teacher!r}")
        if model_cfg.get("plan", "bk-small") not in PLANS:
            raise ConfigError(f"{self._source()}: model.plan {model_cfg.get('plan')!r} is not one of {list(PLANS)}")
        try:
            ASDMOptions.from_value(model_cfg.get("asdm"))
        except PlanError as err:
            raise ConfigError(f"{self._source()}: model.asdm: {err}") from None
        check_known_keys(model_cfg.get("loss", {}), ["sd", "out", "feat"], "model.loss", self._source())
        if not isinstance(model_cfg.get("incubation_steps", 0), int) or model_cfg.get("incubation_steps", 0) < 0:
            raise ConfigError(f"{self._source()}: model.incubation_steps must be an integer >= 0")

    def text_conditioning(self):
        self.teacher_pipe = load_text_to_image_pipeline(teacher_directory(self.options["teacher"]))
        self.vae = self.teacher_pipe.vae
        self.noise_scheduler = DDPMScheduler.from_config(self.teacher_pipe.scheduler.config, clip_sample=False)
        return self.teacher_pipe.tokenizer, self.teacher_pipe.text_encoder

    def build_model(self) -> nn.Module:
        self.teacher = self.teacher_pipe.unet
        self.unet_config = self.teacher.config
        plan = self.options["plan"]
        student = prune(self.teacher, plan, self.options["asdm"] if plan == "asdm" else None)
        self.distiller = Distiller(student, self.teacher, feature_layers(self.teacher.config, plan),
                                   LossWeights(**self.options["loss"]))
        n = len(student.down_blocks)
        self.order = self.options["incubation_order"] or list(range(n))
        if self.options["incubation_steps"] and len(self.teacher.down_blocks) != n:
            raise ConfigError(f"{self._source()}: incubation needs a plan that keeps the teacher's stages, not {plan!r}")
        return _Student(student)

    def train_dataset(self):
        if self.recipe.data.name == "sd_latents":
            if self.vae is None:
                raise ConfigError(f"{self._source()}: data 'sd_latents' needs a teacher with a VAE (a Stable "
                                  f"Diffusion directory) to check the cache against and to decode the grids")
            try:
                check_text_cache(self.recipe.data.root, self.vae, self.tokenizer, self.text_encoder)
            except ValueError as err:
                raise ConfigError(f"{self._source()}: data: {err}") from None
        return super().train_dataset()

    def unet_of(self, model) -> UNet2DConditionModel:
        return model.unet

    def training_step(self, model, batch):
        images, cond = batch
        wrapper = getattr(model, "module", model)
        student = wrapper.unet
        step = int(wrapper.micro_steps) // self.recipe.train.grad_accum
        wrapper.micro_steps += 1
        forward = model  # through the DDP wrapper when there is one
        scalars = {}
        if self.options["incubation_steps"]:
            stage, stages = incubation_phase(step, self.order, self.options["incubation_steps"])
            train_only(student, stage)
            if stage is not None:
                forward = functools.partial(model, through=hybrid(self.teacher, student, stages))
            scalars["incubation_stage"] = -1 if stage is None else stage
        latents = self.latents(images)
        self.teacher.to(latents.device)
        noisy, timesteps, noise = self.noisy(latents)
        terms = self.distiller.losses(noisy, timesteps, self.conditioning(cond, self.options["prompt_dropout"],
                                                                          noisy.device), noise, model=forward)
        scalars.update({f"loss_{k}": v.detach() for k, v in terms.items() if k != "total"})
        return terms["total"], scalars

    def on_train_end(self, ema_model, accelerator, output_dir: Path) -> dict:
        metrics = super().on_train_end(ema_model, accelerator, output_dir)
        if metrics:
            metrics["teacher_unet_parameters"] = self.teacher.num_parameters()
            metrics["plan"] = self.options["plan"]
        return metrics
