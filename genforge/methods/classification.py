"""Supervised image classification of any timm model as a training-loop method.

Trains a ``timm.create_model`` network (timm's own families and genforge's ``gf_*`` backbones,
which ``import genforge`` registers) on a genforge dataset by minimising the cross-entropy of
the softmax over its logits z, optionally with label smoothing (Szegedy et al. 2016,
arXiv 1512.00567, Sec. 7: the target is (1 - eps) onehot(y) + eps / K). Input channels and the
class count follow the dataset. Weight decay spares 1-D parameters (norms, biases) and the
names a model lists in ``no_weight_decay()``, as timm's own optimizer factory does.

At the end the EMA model is scored on the dataset's test split: top-1 accuracy and the
expected calibration error (Guo et al. 2017, :mod:`genforge.metrics.calibration`); its weights
go to ``<output_dir>/model.safetensors``. :class:`ClassificationMethod` (data, step, groups,
test-time scoring) is the base of the other classification methods too
(:mod:`genforge.methods.diffusion_probe`).

The recipe's ``model:`` section: ``name`` (a timm model name), ``kwargs`` (extra
``create_model`` arguments), ``pretrained_file`` (local weights, loaded through timm's
``pretrained_cfg_overlay=dict(file=...)``; timm re-initialises a classifier whose class count
differs from the dataset's and adapts the stem to the input channels), ``label_smoothing`` and,
for the ``classifier`` method, ``bn_recalibration_batch``: before scoring, the BatchNorm running
statistics of the saved model are re-estimated over the shuffled training split in batches of that size
(:func:`recalibrate_batchnorm`, "precise BN", Wu & Johnson 2021, arXiv 2105.07576). Off by default;
it is for networks whose last stages run at 1x1 spatial size on small images, where the running
averages of small, noisy batch statistics do not match the population (timm's ResNet-18 on 32x32
MNIST-5k at batch 64: 33.5% test accuracy from its running statistics, 98.1% after re-estimation
in batches of 500).
"""

from __future__ import annotations

import difflib
from functools import cached_property
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_model
from timm.models import load_state_dict
from timm.optim import param_groups_weight_decay

from genforge.config import ConfigError, Recipe, check_known_keys
from genforge.core.errors import one_line
from genforge.core.io import atomic_write, write_json
from genforge.data import build_dataset
from genforge.metrics.calibration import expected_calibration_error
from genforge.train import Method, register_method

__all__ = ["ClassificationMethod", "ClassifierMethod", "check_label_smoothing", "check_timm_model",
           "classification_metrics", "classification_step", "finish_classifier", "load_split", "no_decay_groups",
           "predict_logits", "pretrained_overlay", "recalibrate_batchnorm", "save_weights_atomic"]

MODEL_DEFAULTS = {"name": None, "kwargs": {}, "pretrained_file": None, "label_smoothing": 0.0}
DATASET_KWARGS = ("num_classes", "in_chans", "pretrained", "pretrained_cfg_overlay")
"""create_model arguments the method sets itself, from the dataset and ``pretrained_file``."""


def check_timm_model(model_cfg: dict, source: str, exempt=DATASET_KWARGS) -> None:
    """ConfigError unless ``model.name`` is a timm model and ``model.kwargs`` a mapping that
    leaves the arguments in ``exempt`` (set by the method) alone."""
    name = model_cfg.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{source}: model.name must be a timm model name, got {name!r}")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"{source}: model.name {name!r} is not a timm model{hint}")
    kwargs = model_cfg.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{source}: model.kwargs must be a mapping, got {type(kwargs).__name__}")
    for key in exempt:
        if key in kwargs:
            raise ConfigError(f"{source}: model.kwargs.{key} is set by the method (from the dataset "
                              "or model.pretrained_file); remove it")


def check_label_smoothing(value, source: str) -> None:
    """ConfigError unless ``model.label_smoothing`` is a number eps in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{source}: model.label_smoothing must be a number in [0, 1), got {value!r}")


def load_split(recipe: Recipe, split: str) -> torch.utils.data.Dataset:
    """The recipe's dataset, split ``split``; a ConfigError when the dataset lacks it."""
    data = recipe.data
    try:
        return build_dataset(data.name, split=split, root=data.root, image_size=data.image_size,
                             resize=data.resize, channels=data.channels)
    except ValueError as err:
        raise ConfigError(f"recipe for method {recipe.method!r}: data ({split} split): {err}") from None


def classification_step(model, batch, label_smoothing: float) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy of one batch, and its top-1 accuracy to log."""
    images, labels = batch
    logits = model(images)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    return loss, {"train_accuracy": (logits.argmax(dim=1) == labels).float().mean()}


def no_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """timm's groups: no decay for 1-D parameters, biases and ``model.no_weight_decay()`` names."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, K) float32 and labels (N,) of a whole dataset, on the CPU, model in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    logits, labels = [], []
    for images, targets in loader:
        logits.append(model(images.to(device)).float().cpu())
        labels.append(targets)
    return torch.cat(logits), torch.cat(labels)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 accuracy and the 15-bin expected calibration error."""
    return {"test_accuracy": float((logits.argmax(dim=1) == labels).float().mean()),
            "test_ece": expected_calibration_error(logits, labels, from_logits=True)}


def pretrained_overlay(model_name: str, file: str) -> dict:
    """timm's ``pretrained_cfg_overlay`` for local weights: the file, and the class count of its
    classifier, so that timm keeps a head that fits the dataset and replaces one that does not
    (an ImageNet head for 10 digits)."""
    overlay = {"file": str(file)}
    classifier = getattr(timm.models.get_pretrained_cfg(model_name), "classifier", None)
    if isinstance(classifier, (tuple, list)):
        classifier = classifier[0]
    weight = load_state_dict(str(file)).get(f"{classifier}.weight") if classifier else None
    if weight is not None:
        overlay["num_classes"] = weight.shape[0]
    return overlay


def save_weights_atomic(model: torch.nn.Module, path: Path) -> None:
    """safetensors of the state dict (buffers included), written atomically (:mod:`genforge.core.io`)."""
    with atomic_write(path) as tmp:
        save_model(model, str(tmp))


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, dataset, batch_size: int) -> int:
    """Replace every BatchNorm layer's running mean and variance by the average of its batch statistics over
    ``dataset`` in shuffled batches of ``batch_size`` (a fixed permutation, ``torch.randperm`` of seed 0: a
    split stored class by class would give one-class batches, whose averaged variances miss the variance
    between classes; the rest of the model in eval mode, so dropout and drop-path stay off); the momenta
    and modes are restored. Returns the number of layers re-estimated."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta, was_training = [m.momentum for m in norms], model.training
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
        norm.train()
    device = next(model.parameters()).device
    order = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(0))
    for images, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order):
        model(images.to(device))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.train(was_training)
    return len(norms)


def finish_classifier(model: torch.nn.Module, test_set, recipe: Recipe, output_dir: Path) -> dict:
    """Score the EMA model on the test split and save its weights to ``model.safetensors``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics = classification_metrics(*predict_logits(model, test_set, recipe.eval.batch_size))
    metrics["num_params"] = sum(p.numel() for p in model.parameters())
    metrics["num_trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    save_weights_atomic(model, output_dir / "model.safetensors")
    return metrics


class ClassificationMethod(Method):
    """What every classification method shares: its recipe's train and test splits, the
    cross-entropy step, timm's no-decay groups and the test-time scoring; a subclass gives
    ``model_defaults`` (the keys of its ``model:`` section), checks them and builds the model."""

    model_defaults: dict = {}

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        self.validate_model_config(recipe.model)
        self.options = {**self.model_defaults, **recipe.model}

    def _source(self) -> str:
        return f"recipe for method {self.name!r}"

    @cached_property
    def train_set(self) -> torch.utils.data.Dataset:
        return load_split(self.recipe, "train")

    @cached_property
    def test_set(self) -> torch.utils.data.Dataset:
        return load_split(self.recipe, "test")

    def parameter_groups(self, model) -> list[dict]:
        return no_decay_groups(model, self.recipe.train.weight_decay)

    def train_dataset(self) -> torch.utils.data.Dataset:
        if len(self.test_set) == 0:  # fail now, not after training
            raise ConfigError(f"{self._source()}: the test split of dataset {self.recipe.data.name!r} is empty")
        return self.train_set

    def training_step(self, model, batch) -> tuple[torch.Tensor, dict]:
        return classification_step(model, batch, self.options["label_smoothing"])

    def on_train_end(self, ema_model, accelerator, output_dir: Path) -> dict:
        if not accelerator.is_main_process:
            return {}
        return finish_classifier(ema_model, self.test_set, self.recipe, Path(output_dir))


@register_method("classifier")
class ClassifierMethod(ClassificationMethod):
    """Cross-entropy training of a timm model on the recipe's dataset."""

    model_defaults = {**MODEL_DEFAULTS, "bn_recalibration_batch": None}

    def validate_model_config(self, model_cfg: dict) -> None:
        source = self._source()
        check_known_keys(model_cfg, list(self.model_defaults), "model", source)
        check_timm_model(model_cfg, source)
        weights = model_cfg.get("pretrained_file")
        if weights is not None and not Path(str(weights)).is_file():
            raise ConfigError(f"{source}: model.pretrained_file {weights!r} is not a file")
        check_label_smoothing(model_cfg.get("label_smoothing", 0.0), source)
        batch = model_cfg.get("bn_recalibration_batch")
        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
            raise ConfigError(f"{source}: model.bn_recalibration_batch must be a batch size >= 1 or null, "
                              f"got {batch!r}")

    def create_kwargs(self) -> dict:
        """``timm.create_model`` keyword arguments besides the name (classes and channels from the data)."""
        return {"num_classes": self.train_set.num_classes, "in_chans": self.train_set.channels,
                **self.options["kwargs"]}

    def build_model(self) -> torch.nn.Module:
        weights, name = self.options["pretrained_file"], self.options["name"]
        try:
            pretrained = ({"pretrained": True, "pretrained_cfg_overlay": pretrained_overlay(name, weights)}
                          if weights else {})
            return timm.create_model(name, **self.create_kwargs(), **pretrained)
        except TypeError as err:
            raise ConfigError(f"{self._source()}: model.kwargs {self.options['kwargs']!r} do not fit "
                              f"timm model {name!r}: {err}") from None
        except Exception as err:  # noqa: BLE001 -- a weight file that does not read or fit, in one line
            if not weights:
                raise
            raise ConfigError(f"{self._source()}: model.pretrained_file {weights!r} cannot be loaded into "
                              f"timm model {name!r}: {one_line(err)}") from None

    def on_train_end(self, ema_model, accelerator, output_dir: Path) -> dict:
        """Re-estimate BatchNorm statistics when ``model.bn_recalibration_batch`` asks, then score and save; also
        write ``model_config.json``: the ``timm.create_model`` arguments of the saved model."""
        batch = self.options.get("bn_recalibration_batch")
        if batch and accelerator.is_main_process:
            recalibrate_batchnorm(ema_model, self.train_set, batch)
        metrics = super().on_train_end(ema_model, accelerator, output_dir)
        if accelerator.is_main_process:
            config = {"model_name": self.options["name"], **self.create_kwargs()}
            write_json(Path(output_dir) / "model_config.json", config, indent=2)
        return metrics
