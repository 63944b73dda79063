"""Class-conditional epsilon-prediction diffusion as training-loop methods.

One method class trains any class-conditional noise predictor with the DDPM objective
(Ho et al. 2020, Eq. 14: || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1-abar_t) eps, t, y) ||^2)
and classifier-free-guidance label dropout (Ho & Salimans 2022). Registered variants differ
only in their network and loss:

- ``dimr``: :class:`genforge.models.dimr.DiMRModel` with DiMR's multi-scale loss (Eq. 3),
  the no-weight-decay group for TD-norm gates, and the official scaled-linear schedule;
- ``dit``: diffusers' ``DiTTransformer2DModel``, the adaLN-Zero baseline, with DiT's
  initialisation (:func:`genforge.models.dit.dit_baseline`);
- ``unet2d``: diffusers' ``UNet2DModel`` with a class-embedding table.

The recipe's ``model:`` section holds ``config`` (a named network config), ``args``
(constructor overrides), ``class_dropout`` and the noise schedule (``beta_schedule``,
``beta_start``, ``beta_end``). At the end of training the EMA network is saved as the variant's
pipeline (:class:`~genforge.pipelines.DiMRPipeline` for DiMR, a
:class:`~genforge.pipelines.ClassConditionalPipeline` otherwise), sampled into a per-class grid
and scored (FID on digits-CNN features through torch-fidelity, and
classifier agreement) by :mod:`genforge.methods.sampling`; a run on cached latents (``data.name:
latents``) decodes its samples with the cache's VAE first and scores them with Inception
(:func:`genforge.methods.sampling.latent_decoder`).
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DModel

from genforge.config import ConfigError, check_known_keys
from genforge.core.embed import drop_labels, null_class_of
from genforge.core.norm import split_no_decay_parameters
from genforge.data import build_dataset
from genforge.methods.sampling import SAMPLERS, check_eval_inputs, evaluate_class_conditional
from genforge.models.dimr import DIMR_CONFIGS, DiMRModel, dimr_config, multiscale_loss
from genforge.models.dit import DIT_CONFIGS, dit_baseline
from genforge.pipelines.class_conditional import ClassConditionalPipeline, sample_shape
from genforge.pipelines.dimr import DiMRPipeline
from genforge.train import Method, register_method

MODEL_DEFAULTS = {"config": "digits", "args": {}, "class_dropout": 0.1, "beta_start": None, "beta_end": None}
MODEL_KEYS = {*MODEL_DEFAULTS, "beta_schedule"}
SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")

UNET_CONFIGS = {
    "tiny": {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64],
             "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
             "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 16, "num_class_embeds": 11},
    "digits": {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [48, 80],
               "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
               "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 16, "num_class_embeds": 11},
    "mnist": {"sample_size": 32, "in_channels": 1, "out_channels": 1, "block_out_channels": [32, 56, 80],
              "layers_per_block": 1, "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
              "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"], "norm_num_groups": 8,
              "num_class_embeds": 11},
}
"""Named UNet2DModel configs; ``digits`` (1.20M parameters) matches DiMR's digits config (1.19M),
``mnist`` (1,339,649; 32x32 MNIST-5k) DiMR's ``mnist`` (1,336,451).
The DiT configs are :data:`genforge.models.dit.DIT_CONFIGS`."""


def check_network_section(model_cfg: dict, named_configs: dict, model_class: type, source: str) -> None:
    """ConfigError unless ``model.config`` names one of ``named_configs``, ``model.args`` is a mapping
    of ``model_class``'s constructor arguments and ``model.class_dropout`` lies in [0, 1)."""
    name = model_cfg.get("config", MODEL_DEFAULTS["config"])
    if name not in named_configs:
        raise ConfigError(f"{source}: model.config {name!r} is not one of {sorted(named_configs)}")
    args = model_cfg.get("args", MODEL_DEFAULTS["args"])
    if not isinstance(args, dict):
        raise ConfigError(f"{source}: model.args must be a mapping, got {type(args).__name__}")
    accepted = [p for p in inspect.signature(model_class.__init__).parameters if p != "self"]
    check_known_keys(args, accepted, "model.args", source)
    dropout = model_cfg.get("class_dropout", MODEL_DEFAULTS["class_dropout"])
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"{source}: model.class_dropout must be in [0, 1), got {dropout!r}")


class ClassConditionalNetworkMethod(Method):
    """The network side every class-conditional image generator's method shares: the named config
    plus ``model.args`` (:meth:`network_config`), the network, and the training images checked
    against the network's input shape. Construction refuses end-of-run inputs that are missing
    (:func:`~genforge.methods.sampling.check_eval_inputs`), then checks the ``model:`` section
    (:meth:`validate_model_config`) and ``sample.scheduler`` (one of ``samplers``), and sets
    ``options`` = :meth:`option_defaults` updated by the recipe. Subclasses set ``model_class``,
    ``named_configs`` and ``samplers`` and define those two methods."""

    model_class: type = None
    named_configs: dict[str, dict] = {}
    samplers: tuple[str, ...] = ()

    def __init__(self, recipe):
        super().__init__(recipe)
        check_eval_inputs(recipe, self._source())
        self.validate_model_config(recipe.model)
        if recipe.sample.scheduler not in self.samplers:
            raise ConfigError(f"{self._source()}: sample.scheduler {recipe.sample.scheduler!r} is not one of "
                              f"{list(self.samplers)}")
        self.options = {**self.option_defaults(), **recipe.model}

    def _source(self) -> str:
        return f"recipe for method {self.name!r}"

    def network_config(self) -> dict:
        config = copy.deepcopy(self.named_configs[self.options["config"]])
        return {**config, **copy.deepcopy(self.options["args"])}

    def build_model(self) -> torch.nn.Module:
        return self.model_class(**self.network_config())

    def image_dataset(self) -> torch.utils.data.Dataset:
        """The recipe's training split; ConfigError unless its images fit the network's input."""
        data = self.recipe.data
        dataset = build_dataset(data.name, split="train", root=data.root, image_size=data.image_size,
                                resize=data.resize, channels=data.channels)
        config = self.network_config()
        height, width = sample_shape(config["sample_size"])
        if (dataset.channels, dataset.image_size, dataset.image_size) != (config["in_channels"], height, width):
            raise ConfigError(f"{self._source()}: data gives {dataset.channels}x{dataset.image_size}x"
                              f"{dataset.image_size} images but the model expects {config['in_channels']}x{height}x{width}")
        return dataset


class DiTNetwork:
    """Mixin: diffusers' DiT with DiT's initialisation (:func:`genforge.models.dit.dit_baseline`) as the network."""

    model_class = DiTTransformer2DModel
    named_configs = DIT_CONFIGS

    def build_model(self) -> torch.nn.Module:
        return dit_baseline(**self.network_config())


class ClassConditionalDiffusion(ClassConditionalNetworkMethod):
    """DDPM epsilon-prediction training of a class-conditional network (one of the variants)."""

    default_schedule = "linear"
    pipeline_class: type = ClassConditionalPipeline
    samplers = SAMPLERS

    def __init__(self, recipe):
        super().__init__(recipe)
        self.noise_scheduler = self._noise_scheduler()

    def option_defaults(self) -> dict:
        return {**MODEL_DEFAULTS, "beta_schedule": self.default_schedule}

    def validate_model_config(self, model_cfg: dict) -> None:
        check_known_keys(model_cfg, sorted(MODEL_KEYS), "model", self._source())
        check_network_section(model_cfg, self.named_configs, self.model_class, self._source())
        schedule = model_cfg.get("beta_schedule", self.default_schedule)
        if schedule not in SCHEDULES:
            raise ConfigError(f"{self._source()}: model.beta_schedule {schedule!r} is not one of {list(SCHEDULES)}")

    def _noise_scheduler(self) -> DDPMScheduler:
        schedule = self.options["beta_schedule"]
        kwargs = {"num_train_timesteps": 1000, "beta_schedule": schedule, "prediction_type": "epsilon",
                  "clip_sample": False}
        if schedule == "scaled_linear":
            kwargs.update(beta_start=0.00085, beta_end=0.012)
        for key in ("beta_start", "beta_end"):
            if self.options[key] is not None:
                kwargs[key] = float(self.options[key])
        return DDPMScheduler(**kwargs)

    def train_dataset(self) -> torch.utils.data.Dataset:
        return self.image_dataset()

    def predict(self, model, noisy: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor):
        return model(noisy, timesteps, class_labels=labels)

    def loss(self, model, output, noise: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output.sample.float(), noise.float())

    def training_step(self, model, batch) -> tuple[torch.Tensor, dict]:
        images, labels = batch
        unwrapped = getattr(model, "module", model)
        labels = drop_labels(labels, self.options["class_dropout"], null_class_of(unwrapped))
        noise = torch.randn_like(images)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (images.shape[0],),
                                  device=images.device)
        noisy = self.noise_scheduler.add_noise(images, noise, timesteps)
        loss = self.loss(unwrapped, self.predict(model, noisy, timesteps, labels), noise)
        return loss, {}

    def on_train_end(self, ema_model, accelerator, output_dir: Path) -> dict:
        if not accelerator.is_main_process:
            return {}
        return evaluate_class_conditional(ema_model, self.noise_scheduler, self.recipe, Path(output_dir),
                                          self.pipeline_class)


@register_method("dimr")
class DiMRMethod(ClassConditionalDiffusion):
    """DiMR (arXiv 2406.09416): multi-scale epsilon loss, TD-norm gates without weight decay."""

    model_class = DiMRModel
    named_configs = {name: dimr_config(name) for name in DIMR_CONFIGS}
    default_schedule = "scaled_linear"
    pipeline_class = DiMRPipeline

    def loss(self, model, output, noise: torch.Tensor) -> torch.Tensor:
        return multiscale_loss(model, output.multiscale, noise)

    def parameter_groups(self, model) -> list[dict]:
        return split_no_decay_parameters(model, self.recipe.train.weight_decay)


@register_method("dit")
class DiTMethod(DiTNetwork, ClassConditionalDiffusion):
    """diffusers' DiT (arXiv 2212.09748, adaLN-Zero) with DiT's initialisation and the same objective."""


@register_method("unet2d")
class UNet2DMethod(ClassConditionalDiffusion):
    """diffusers' UNet2DModel with ``num_class_embeds`` (the last row is the null class)."""

    model_class = UNet2DModel
    named_configs = UNET_CONFIGS
