"""Training ARFlow (arXiv 2501.16085) and its SiT baseline on the linear-path velocity objective.

ARFlow (Sec. 3.1, official ``train.py`` + ``transport/transport.py`` + ``dataset/cache_loader.py``):

- a training item is a sequence of S same-class images (:class:`SameClassSequences`: the
  i-th image of the dataset and S - 1 other distinct images of its class, drawn with torch's
  global RNG so that resumed runs continue exactly; the official loader draws a random class
  and S random images of it, which differs only in how often each class is visited);
- every image gets its own noise x0 ~ N(0, I) and its own time, t = sort(U(0, 1)^S) ascending, so
  the sequence runs from the noisiest to the cleanest image (t = 0 is noise, t = 1 data);
- the linear path x_t = t x1 + (1 - t) x0 with velocity target u = x1 - x0, and the loss
  mean((v_theta(x_t, t, y) - u)^2) over all images (SiT's ``training_losses``, Linear, velocity);
- one class label per sequence, replaced by the null class with probability
  ``class_dropout`` (0.1) for classifier-free guidance;
- AdamW with weight decay on matrices only (the official groups exclude 1-D parameters), EMA.

Deviations from the official training, on purpose: gradient clipping is the loop's
``train.grad_clip`` (a norm) where the official clips each gradient value at 3.0; the digits
recipe uses a higher LR (1e-3 against the official 1e-4) and a short schedule for CPU.

The SiT baseline (``method: sit``; Ma et al., arXiv 2401.08740) is diffusers'
``DiTTransformer2DModel`` from DiT's initialisation (:func:`genforge.models.dit.dit_baseline`)
trained on the same objective with one image per item, times t ~ U(0, 1) fed to its timestep
embedding as they are, as SiT does. Both save their pipeline (:mod:`genforge.pipelines.arflow`)
and are sampled, drawn and scored at the end of training like the DiMR recipes
(:func:`genforge.methods.sampling.evaluate_pipeline`); a run on cached latents (``data.name:
latents``, :mod:`genforge.data.latents`) decodes its samples with the cache's VAE first and
scores them against the cache's image folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from genforge.config import ConfigError, check_known_keys
from genforge.core.embed import drop_labels, null_class_of
from genforge.methods.diffusion import ClassConditionalNetworkMethod, DiTNetwork, check_network_section
from genforge.methods.sampling import evaluate_pipeline
from genforge.models.arflow import ARFLOW_CONFIGS, ARFlowModel
from genforge.pipelines.arflow import SAMPLERS, ARFlowPipeline, SiTPipeline
from genforge.train import register_method

MODEL_DEFAULTS = {"config": "digits", "args": {}, "class_dropout": 0.1}


class SameClassSequences(torch.utils.data.Dataset):
    """Item i: (images (S, C, H, W), label) of dataset item i and S - 1 other images of its class."""

    def __init__(self, dataset, sequence_length: int):
        self.dataset, self.sequence_length = dataset, sequence_length
        labels = torch.as_tensor([int(label) for label in _labels(dataset)])
        self.labels = labels
        self.members = {int(c): torch.nonzero(labels == c).flatten() for c in labels.unique()}
        small = {c: len(m) for c, m in self.members.items() if len(m) < sequence_length}
        if small:
            raise ValueError(f"sequence_length {sequence_length} needs that many images per class; classes "
                             f"with fewer (class: count): {small}")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        label = int(self.labels[index])
        members = self.members[label]
        others = members[members != index]
        chosen = others[torch.randperm(len(others))[: self.sequence_length - 1]].tolist()
        images = torch.stack([self.dataset[i][0] for i in [index, *chosen]])
        return images, label


def _labels(dataset) -> list[int]:
    if hasattr(dataset, "labels"):
        return list(dataset.labels)
    return [label for _, label in dataset]


def linear_path(x1: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, u): x_t = t x1 + (1 - t) x0 and u = x1 - x0 for fresh noise x0; t broadcast from the left."""
    x0 = torch.randn_like(x1)
    t = t.reshape(*t.shape, *([1] * (x1.ndim - t.ndim)))
    return t * x1 + (1 - t) * x0, x1 - x0


def sequence_times(batch: int, length: int, device) -> torch.Tensor:
    """(B, S) times sorted ascending in each row: the sequence runs from noisiest to cleanest."""
    return torch.rand(batch, length, device=device).sort(dim=1).values


class LinearPathMethod(ClassConditionalNetworkMethod):
    """Shared by ARFlow and SiT: recipe checks, data, weight-decay groups and end-of-run sampling."""

    pipeline_class: type = SiTPipeline
    samplers = SAMPLERS
    defaults: dict = MODEL_DEFAULTS

    def option_defaults(self) -> dict:
        return dict(self.defaults)

    def validate_model_config(self, model_cfg: dict) -> None:
        check_known_keys(model_cfg, sorted(self.defaults), "model", self._source())
        check_network_section(model_cfg, self.named_configs, self.model_class, self._source())
        length = model_cfg.get("sequence_length", 1)
        if not isinstance(length, int) or length < 1:
            raise ConfigError(f"{self._source()}: model.sequence_length must be a positive int, got {length!r}")

    def train_dataset(self) -> torch.utils.data.Dataset:
        return self.image_dataset()

    def parameter_groups(self, model) -> list[dict]:
        """Weight decay on matrices and kernels only, as the official ARFlow ``train.py``."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": self.recipe.train.weight_decay},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]

    def on_train_end(self, ema_model, accelerator, output_dir: Path) -> dict:
        if not accelerator.is_main_process:
            return {}
        ema_model.eval()
        pipe = self.pipeline_class(model=ema_model, sampler=self.recipe.sample.scheduler)
        return evaluate_pipeline(pipe, null_class_of(ema_model), self.recipe, Path(output_dir))


@register_method("arflow")
class ARFlowMethod(LinearPathMethod):
    """ARFlow: same-class sequences, noisiest first, velocity of every image (one model call)."""

    model_class = ARFlowModel
    named_configs = ARFLOW_CONFIGS
    pipeline_class = ARFlowPipeline
    defaults = {**MODEL_DEFAULTS, "sequence_length": 5}

    def train_dataset(self) -> torch.utils.data.Dataset:
        return SameClassSequences(self.image_dataset(), self.options["sequence_length"])

    def training_step(self, model, batch) -> tuple[torch.Tensor, dict]:
        images, labels = batch  # (B, S, C, H, W), (B,)
        labels = drop_labels(labels, self.options["class_dropout"], null_class_of(getattr(model, "module", model)))
        t = sequence_times(images.shape[0], images.shape[1], images.device)
        xt, target = linear_path(images, t)
        prediction = model(xt, t, labels).sample
        return F.mse_loss(prediction.float(), target.float()), {}


@register_method("sit")
class SiTMethod(DiTNetwork, LinearPathMethod):
    """SiT on diffusers' DiT: the same linear-path velocity objective, one image per item."""

    def training_step(self, model, batch) -> tuple[torch.Tensor, dict]:
        images, labels = batch
        labels = drop_labels(labels, self.options["class_dropout"], null_class_of(getattr(model, "module", model)))
        t = torch.rand(images.shape[0], device=images.device)
        xt, target = linear_path(images, t)
        prediction = model(xt, timestep=t, class_labels=labels).sample
        return F.mse_loss(prediction.float(), target.float()), {}
