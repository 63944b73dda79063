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
  module, so a resumed run continues in the right phase.

Both save a stock diffusers ``StableDiffusionPipeline`` (tokenizer, text encoder, UNet, DDIM
scheduler; no VAE, sampled with ``output_type="latent"``) to ``<output_dir>/pipeline``, write a
grid of the fixed class prompts at each checkpoint (``samples_step_N.png``) and at the end
(``samples_grid.png``), and score samples with FID on digits-CNN features and classifier
agreement, like the class-conditional diffusion methods.
"""

from __future__ import annotations

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


def load_text_to_image_pipeline(directory) -> StableDiffusionPipeline:
    """The stock pipeline a run saved (no VAE, safety checker or image encoder)."""
    return StableDiffusionPipeline.from_pretrained(directory, vae=None, safety_checker=None, feature_extractor=None,
                                                   image_encoder=None, requires_safety_checker=False)


def _pipeline(unet, tokenizer, text_encoder, scheduler) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(vae=None, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler.from_config(scheduler.config, set_alpha_to_one=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def _generate(pipe, labels: torch.Tensor, recipe, seed: int, desc: str) -> torch.Tensor:
    """Samples in [-1, 1] for class-name prompts of ``labels``, in batches from one seed."""
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for start in tqdm(range(0, len(labels), recipe.eval.batch_size), desc=desc, unit="batch"):
        prompts = [digit_prompt(int(y)) for y in labels[start:start + recipe.eval.batch_size]]
        out = pipe(prompt=prompts, num_inference_steps=recipe.sample.steps, guidance_scale=recipe.sample.guidance_scale,
                   generator=generator, output_type="latent")
        chunks.append(out.images.clamp(-1, 1).cpu())
    return torch.cat(chunks)


@register_method("sd_text_to_image")
class TextToImageTeacher(Method):
    """A text-conditioned UNet2DConditionModel on class-name prompts (the teacher of the distillation runs)."""

    model_keys = {"unet": {}, "prompt_dropout": 0.1, "text_hidden_size": 32, "text_layers": 2}

    def __init__(self, recipe):
        super().__init__(recipe)
        self.validate_model_config(recipe.model)
        self.options = {**self.model_keys, **recipe.model}
        self.noise_scheduler = _scheduler()
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
        prompts = [digit_prompt(i) for i in range(10)]
        tokenizer = word_tokenizer(prompts)
        return tokenizer, small_text_encoder(tokenizer, self.options["text_hidden_size"], self.options["text_layers"],
                                             seed=self.recipe.seed)

    def build_model(self) -> nn.Module:
        config = {**DIGITS_UNET, "cross_attention_dim": self.options["text_hidden_size"], **self.options["unet"]}
        return UNet2DConditionModel(**config)

    def train_dataset(self):
        data = self.recipe.data
        if data.name != "digits":
            raise ConfigError(f"{self._source()}: data.name must be 'digits' (its class names are the prompts), "
                              f"got {data.name!r}")
        return build_dataset(data.name, split="train", root=data.root, image_size=data.image_size,
                             resize=data.resize, channels=data.channels)

    def conditioning(self, labels: torch.Tensor, dropout: float) -> torch.Tensor:
        """Prompt embeddings of ``labels``, each replaced by the empty prompt's with probability ``dropout``."""
        labels = torch.where(torch.rand(labels.shape, device=labels.device) < dropout, 10, labels)
        return self.prompt_embeds.to(labels.device)[labels]

    def noisy(self, images: torch.Tensor):
        noise = torch.randn_like(images)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (images.shape[0],),
                                  device=images.device)
        return self.noise_scheduler.add_noise(images, noise, timesteps), timesteps, noise

    def training_step(self, model, batch):
        images, labels = batch
        noisy, timesteps, noise = self.noisy(images)
        prediction = model(noisy, timesteps, self.conditioning(labels, self.options["prompt_dropout"])).sample
        return F.mse_loss(prediction.float(), noise.float()), {}

    def unet_of(self, model) -> UNet2DConditionModel:
        return model

    def on_checkpoint(self, ema_model, output_dir: Path, step: int) -> None:
        with torch.random.fork_rng(devices=[]):  # sampling must not move the training RNG (exact resume)
            self._grid(self.unet_of(ema_model), Path(output_dir) / f"samples_step_{step:07d}.png")

    def _grid(self, unet, path: Path) -> None:
        was_training = unet.training
        pipe = _pipeline(unet.eval(), self.tokenizer, self.text_encoder, self.noise_scheduler)
        labels = torch.arange(10).repeat_interleave(self.recipe.sample.num_per_class)
        save_class_grid(_generate(pipe, labels, self.recipe, self.recipe.seed, "sampling grid"),
                        self.recipe.sample.num_per_class, path)
        unet.train(was_training)

    def on_train_end(self, ema_model, accelerator, output_dir: Path) -> dict:
        if not accelerator.is_main_process:
            return {}
        output_dir = Path(output_dir)
        unet = self.unet_of(ema_model).eval()
        pipe = _pipeline(unet, self.tokenizer, self.text_encoder, self.noise_scheduler)
        pipe.save_pretrained(output_dir / "pipeline")
        self._grid(unet, output_dir / "samples_grid.png")
        labels = torch.arange(self.recipe.eval.num_samples) % 10
        images = _generate(pipe, labels, self.recipe, self.recipe.seed + 1, "sampling for metrics")
        np.savez_compressed(output_dir / "samples.npz", images=signed_to_uint8(images).numpy(), labels=labels.numpy(),
                            resize=np.array(self.recipe.data.resize))
        metrics = {**score_samples(images, labels, self.recipe), "unet_parameters": unet.num_parameters()}
        write_json(output_dir / "sample_metrics.json", metrics, indent=2)
        return metrics


class _Student(nn.Module):
    """The student UNet and the micro-batch counter that tells incubation its phase (saved with it)."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet
        self.register_buffer("micro_steps", torch.zeros((), dtype=torch.long))

    def forward(self, *args, **kwargs):
        return self.unet(*args, **kwargs)


@register_method("sd_distill")
class SDDistill(TextToImageTeacher):
    """BK-SDM / A-SDM distillation of a ``sd_text_to_image`` teacher into a pruned student."""

    model_keys = {"teacher": None, "plan": "bk-small", "asdm": None, "loss": {}, "incubation_steps": 0,
                  "incubation_order": None, "prompt_dropout": 0.1}
    find_unused_parameters = True  # incubation trains one stage at a time

    def validate_model_config(self, model_cfg: dict) -> None:
        check_known_keys(model_cfg, sorted(self.model_keys), "model", self._source())
        teacher = model_cfg.get("teacher")
        if not teacher or not (Path(teacher) / "pipeline" / "model_index.json").is_file():
            raise ConfigError(f"{self._source()}: model.teacher must be a finished sd_text_to_image run directory "
                              f"(with pipeline/model_index.json), got {teacher!r}")
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
        self.teacher_pipe = load_text_to_image_pipeline(Path(self.options["teacher"]) / "pipeline")
        return self.teacher_pipe.tokenizer, self.teacher_pipe.text_encoder

    def build_model(self) -> nn.Module:
        self.teacher = self.teacher_pipe.unet
        plan = self.options["plan"]
        student = prune(self.teacher, plan, self.options["asdm"] if plan == "asdm" else None)
        self.distiller = Distiller(student, self.teacher, feature_layers(self.teacher.config, plan),
                                   LossWeights(**self.options["loss"]))
        n = len(student.down_blocks)
        self.order = self.options["incubation_order"] or list(range(n))
        if self.options["incubation_steps"] and len(self.teacher.down_blocks) != n:
            raise ConfigError(f"{self._source()}: incubation needs a plan that keeps the teacher's stages, not {plan!r}")
        return _Student(student)

    def unet_of(self, model) -> UNet2DConditionModel:
        return model.unet

    def training_step(self, model, batch):
        images, labels = batch
        wrapper = getattr(model, "module", model)
        student = wrapper.unet
        step = int(wrapper.micro_steps) // self.recipe.train.grad_accum
        wrapper.micro_steps += 1
        forward = model  # through the DDP wrapper when there is one
        scalars = {}
        if self.options["incubation_steps"]:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                raise ConfigError(f"{self._source()}: incubation trains a hybrid outside DDP; run it in one process")
            stage, stages = incubation_phase(step, self.order, self.options["incubation_steps"])
            train_only(student, stage)
            forward = student if stage is None else hybrid(self.teacher, student, stages)
            scalars["incubation_stage"] = -1 if stage is None else stage
        self.teacher.to(images.device)
        noisy, timesteps, noise = self.noisy(images)
        terms = self.distiller.losses(noisy, timesteps, self.conditioning(labels, self.options["prompt_dropout"]),
                                      noise, model=forward)
        scalars.update({f"loss_{k}": v.detach() for k, v in terms.items() if k != "total"})
        return terms["total"], scalars

    def on_train_end(self, ema_model, accelerator, output_dir: Path) -> dict:
        metrics = super().on_train_end(ema_model, accelerator, output_dir)
        if metrics:
            metrics["teacher_unet_parameters"] = self.teacher.num_parameters()
            metrics["plan"] = self.options["plan"]
        return metrics
