"""m2mKD's loss and training Methods: teach student modules, then train the assembled modular student.

Lo et al., "m2mKD: Module-to-Module Knowledge Distillation for Modular Transformers",
arXiv 2402.16918 (code: kamanphoebe/m2mKD, after Deep Incubation, arXiv 2212.04129). The
networks (splitting, stitching, the hybrid forward, the MoE student) are in
:mod:`genforge.kd.m2mkd.network`; this module holds the loss, DeiT's soft distillation
(``hard``: the second term is CE(logits_S, argmax logits_T)), and plugs them into the one
training loop.

``m2mkd`` (the m2mKD phase, Sec. 3): a monolithic teacher ViT and the shallow meta model,
both ``classifier`` runs, are loaded frozen and split into modules T_i and meta stages
(``split_vit``). Each taught student module S_i (with its stitch layers) runs in its own
hybrid network meta[0:i] -> S_i -> meta[i+1:] against the teacher path
meta[0:i] -> T_i -> meta[i+1:] with the loss
    L_i = (1 - a) CE(logits_S, y) + a tau^2 KL_sum(log_softmax(logits_S/tau) || log_softmax(logits_T/tau)) / numel(logits_S).
A step minimises sum_i L_i over the taught indices. The hybrid networks share only frozen
parameters, so dL/dS_i = dL_i/dS_i, and AdamW (and SGD) update each parameter from its own
gradient alone: the sum trains every module exactly as training them one at a time on the
same batches would, only in one run (the paper runs the pairs as separate jobs). Meta and
teacher stay outside the trained model: they are neither optimised nor checkpointed. At the
end each module goes to ``modules/module_{i}.safetensors`` and the ``ModularStudent``
arguments to ``student_config.json``; the metrics are the test accuracy of the teacher, the
meta model, each hybrid network and (when every module was taught) the assembled student.

``modular_student`` (the end-to-end phase): cross-entropy training of the MoE
``ModularStudent``, initialised from an ``m2mkd`` run's modules (loaded strictly) or from
scratch (the end-to-end baseline the paper improves on); scored like a classifier (test
accuracy and ECE).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from genforge.config import ConfigError, check_known_keys
from genforge.core.io import write_json
from genforge.core.state_dict import StateDictError, read_state_dict
from genforge.kd.m2mkd.network import ModularStudent, hybrid_forward, no_weight_decay_names, split_vit, student_module
from genforge.kd.teachers import TeacherError, load_classifier, teacher_device
from genforge.methods.classification import (ClassificationMethod, check_label_smoothing, classification_metrics,
                                             finish_classifier, predict_logits, save_weights_atomic)
from genforge.train import register_method

__all__ = ["FrozenNetworks", "HybridNetwork", "M2MKDMethod", "ModularStudentMethod", "TaughtModules",
           "load_student_modules", "m2mkd_loss", "m2mkd_pair_loss", "module_path", "split_frozen"]

MODULES_DIR = "modules"
STUDENT_CONFIG = "student_config.json"
STUDENT_DEFAULTS = {"depths": None, "embed_dim": None, "num_heads": None, "num_experts": 4, "top_k": 1,
                    "mlp_ratio": 4.0}
"""The ``model.student`` keys of ``m2mkd``; meta_dim, img_size, patch_size come from the meta model."""
SCRATCH_STUDENT_DEFAULTS = {**STUDENT_DEFAULTS, "meta_dim": None, "patch_size": None}
"""The ``model.student`` keys of ``modular_student`` without an m2mKD run."""
M2MKD_DEFAULTS = {"teacher": None, "meta": None, "teacher_depths": None, "student": None, "alpha": 0.5,
                  "tau": 1.0, "distillation_type": "soft", "indices": None}
MODULAR_DEFAULTS = {"student": None, "m2mkd_run": None, "keep_stitches": True, "label_smoothing": 0.0}


# ----------------------------------------------------------------------------- the loss


def m2mkd_loss(
    logits_s: torch.Tensor,
    logits_t: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.5,
    tau: float = 1.0,
    distillation_type: str = "soft",
) -> torch.Tensor:
    """(1 - alpha) CE + alpha * distillation term (DeiT normalisation). `labels` may be soft (mixup)."""
    base = F.cross_entropy(logits_s, labels)
    if distillation_type == "soft":
        kd = (
            F.kl_div(
                F.log_softmax(logits_s / tau, dim=-1),
                F.log_softmax(logits_t / tau, dim=-1),
                reduction="sum",
                log_target=True,
            )
            * (tau * tau)
            / logits_s.numel()
        )
    elif distillation_type == "hard":
        kd = F.cross_entropy(logits_s, logits_t.argmax(dim=-1))
    else:
        raise ValueError(
            f"distillation_type must be 'soft' or 'hard', got {distillation_type!r}"
        )
    return (1 - alpha) * base + alpha * kd


def m2mkd_pair_loss(
    meta_modules: Sequence[nn.Module],
    teacher_module: nn.Module,
    student_module: nn.Module,
    index: int,
    images: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.5,
    tau: float = 1.0,
    distillation_type: str = "soft",
) -> torch.Tensor:
    """The m2mKD loss of teaching pair `index`; meta and teacher must be frozen (see `genforge.kd.teachers.freeze`)."""
    with torch.no_grad():
        logits_t = hybrid_forward(meta_modules, index, teacher_module, images)
    logits_s = hybrid_forward(meta_modules, index, student_module, images)
    return m2mkd_loss(
        logits_s,
        logits_t,
        labels,
        alpha=alpha,
        tau=tau,
        distillation_type=distillation_type,
    )


# ----------------------------------------------------------------------------- recipe checks


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_depths(value, key: str, source: str) -> None:
    if not isinstance(value, list) or not value or not all(_positive_int(d) for d in value):
        raise ConfigError(f"{source}: {key} must be a non-empty list of positive block counts, got {value!r}")


def _check_student(student, defaults: dict, source: str) -> None:
    """ConfigError for a ``model.student`` mapping that ``ModularStudent`` could not take."""
    if not isinstance(student, dict):
        raise ConfigError(f"{source}: model.student must be a mapping of ModularStudent arguments, got {student!r}")
    check_known_keys(student, list(defaults), "model.student", source)
    missing = [k for k, v in defaults.items() if v is None and k not in student]
    if missing:
        raise ConfigError(f"{source}: model.student needs {missing}")
    options = {**defaults, **student}
    _check_depths(options["depths"], "model.student.depths", source)
    for key in ("embed_dim", "num_heads", "num_experts", "meta_dim", "patch_size"):
        if key in options and not _positive_int(options[key]):
            raise ConfigError(f"{source}: model.student.{key} must be a positive integer, got {options[key]!r}")
    if options["embed_dim"] % options["num_heads"]:
        raise ConfigError(f"{source}: model.student.embed_dim {options['embed_dim']} is not divisible by "
                          f"num_heads {options['num_heads']}")
    if not _positive_int(options["top_k"]) or options["top_k"] > options["num_experts"]:
        raise ConfigError(f"{source}: model.student.top_k must be in 1..num_experts ({options['num_experts']}), "
                          f"got {options['top_k']!r}")
    if not _number(options["mlp_ratio"]) or options["mlp_ratio"] <= 0:
        raise ConfigError(f"{source}: model.student.mlp_ratio must be a positive number, got {options['mlp_ratio']!r}")


def _build_student(kwargs: dict, source: str, **extra) -> ModularStudent:
    try:
        return ModularStudent(**kwargs, **extra)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: cannot build the modular student from {kwargs}: {err}") from None


# ----------------------------------------------------------------------------- teacher and meta model


@dataclass
class FrozenNetworks:
    """The frozen teacher and meta ViTs of an m2mKD run and their modules (sharing their parameters)."""

    teacher: VisionTransformer
    meta: VisionTransformer
    teacher_modules: nn.ModuleList
    meta_stages: nn.ModuleList

    def to(self, like: torch.Tensor) -> FrozenNetworks:
        """Move both networks to ``like``'s device (a no-op once they are there)."""
        teacher_device(self.teacher, like)
        teacher_device(self.meta, like)
        return self


def _load_vit(source, key: str, recipe_source: str, num_classes: int, in_chans: int) -> VisionTransformer:
    if not isinstance(source, (str, dict)):
        raise ConfigError(f"{recipe_source}: model.{key} must be a classifier run directory, got {source!r}")
    try:
        model = load_classifier(source, num_classes=num_classes, in_chans=in_chans)
    except TeacherError as err:
        raise ConfigError(f"{recipe_source}: model.{key}: {err}") from None
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"{recipe_source}: model.{key} {source!r} is a {type(model).__name__}, not a timm "
                          "VisionTransformer; m2mKD splits ViTs into modules of blocks")
    return model


def split_frozen(teacher: VisionTransformer, meta: VisionTransformer, teacher_depths: list[int],
                 source: str) -> FrozenNetworks:
    """Split the teacher into modules of ``teacher_depths`` blocks and the meta model into one block per module.

    ConfigError unless the depths sum to the teacher's depth, the meta model has one block per
    module, and both produce the same tokens (embedding width, patch count, prefix tokens).
    """
    if sum(teacher_depths) != len(teacher.blocks):
        raise ConfigError(f"{source}: model.teacher_depths {teacher_depths} sum to {sum(teacher_depths)}, but "
                          f"the teacher has {len(teacher.blocks)} blocks")
    if len(meta.blocks) != len(teacher_depths):
        raise ConfigError(f"{source}: the meta model has {len(meta.blocks)} blocks (one per module), but "
                          f"model.teacher_depths {teacher_depths} makes {len(teacher_depths)} teacher modules")
    for what in ("embed_dim", "num_prefix_tokens"):
        if getattr(teacher, what) != getattr(meta, what):
            raise ConfigError(f"{source}: teacher and meta model differ in {what} ({getattr(teacher, what)} vs "
                              f"{getattr(meta, what)}); a teacher module must fit between meta stages")
    if teacher.patch_embed.num_patches != meta.patch_embed.num_patches:
        raise ConfigError(f"{source}: teacher and meta model differ in patch count ({teacher.patch_embed.num_patches}"
                          f" vs {meta.patch_embed.num_patches})")
    return FrozenNetworks(teacher, meta, split_vit(teacher, teacher_depths), split_vit(meta, [1] * len(meta.blocks)))


# ----------------------------------------------------------------------------- the trained model


class TaughtModules(nn.ModuleList):
    """The student modules being taught (entry k teaches pair ``indices[k]``).

    ``forward`` returns the per-pair m2mKD losses, so the loss is computed inside the
    prepared model's forward (mixed precision, DDP gradient sync).
    """

    def __init__(self, modules: list[nn.Module], indices: list[int]):
        super().__init__(modules)
        self.indices = list(indices)

    def no_weight_decay(self) -> set[str]:
        return no_weight_decay_names(self)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, frozen: FrozenNetworks,
                **loss_options) -> torch.Tensor:  # -> (len(indices),)
        return torch.stack([
            m2mkd_pair_loss(frozen.meta_stages, frozen.teacher_modules[i], module, i, images, labels, **loss_options)
            for i, module in zip(self.indices, self)])


class HybridNetwork(nn.Module):
    """meta[0:i] -> module -> meta[i+1:]: how pair i's module is scored on its own."""

    def __init__(self, meta_stages: nn.ModuleList, index: int, module: nn.Module):
        super().__init__()
        self.meta_stages, self.index, self.module = meta_stages, index, module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return hybrid_forward(self.meta_stages, self.index, self.module, images)


def module_path(run_dir: Path, index: int) -> Path:
    return Path(run_dir) / MODULES_DIR / f"module_{index}.safetensors"


def load_student_modules(run_dir, source: str = "m2mKD run") -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """(``ModularStudent`` kwargs, the module state dicts) of an ``m2mkd`` run; ConfigError naming a missing file."""
    run_dir = Path(run_dir)
    config_path = run_dir / STUDENT_CONFIG
    if not config_path.is_file():
        raise ConfigError(f"{source}: {run_dir} is not an m2mkd run directory (no {STUDENT_CONFIG})")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise ConfigError(f"{source}: {config_path} is not readable JSON ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("depths"), list):
        raise ConfigError(f"{source}: {config_path} must be a mapping of ModularStudent arguments with "
                          f"'depths' (what an m2mkd run writes), got {config!r}")
    paths = [module_path(run_dir, i) for i in range(len(config["depths"]))]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"{source}: {run_dir} lacks the student modules {missing} (teach every index first)")
    try:
        return config, [read_state_dict(p, nesting_keys=(), strip_prefixes=()) for p in paths]
    except StateDictError as err:
        raise ConfigError(f"{source}: student module {err}") from None


# ----------------------------------------------------------------------------- methods


@register_method("m2mkd")
class M2MKDMethod(ClassificationMethod):
    """Teach student modules against a split teacher inside a frozen meta model (m2mKD)."""

    model_defaults = M2MKD_DEFAULTS
    find_unused_parameters = True  # top-k gating may leave an expert without tokens

    def validate_model_config(self, model_cfg: dict) -> None:
        """Keys and values only; the run directories are read when the model is built."""
        source = self._source()
        check_known_keys(model_cfg, list(M2MKD_DEFAULTS), "model", source)
        for key in ("teacher", "meta", "teacher_depths", "student"):
            if model_cfg.get(key) is None:
                raise ConfigError(f"{source}: model.{key} is required")
        depths = model_cfg["teacher_depths"]
        _check_depths(depths, "model.teacher_depths", source)
        _check_student(model_cfg["student"], STUDENT_DEFAULTS, source)
        if len(model_cfg["student"]["depths"]) != len(depths):
            raise ConfigError(f"{source}: model.student.depths {model_cfg['student']['depths']} and "
                              f"model.teacher_depths {depths} differ in module count")
        alpha, tau = model_cfg.get("alpha", 0.5), model_cfg.get("tau", 1.0)
        if not _number(alpha) or not 0 <= alpha <= 1:
            raise ConfigError(f"{source}: model.alpha must be a number in [0, 1], got {alpha!r}")
        if not _number(tau) or tau <= 0:
            raise ConfigError(f"{source}: model.tau must be a positive number, got {tau!r}")
        if model_cfg.get("distillation_type", "soft") not in ("soft", "hard"):
            raise ConfigError(f"{source}: model.distillation_type must be 'soft' or 'hard', "
                              f"got {model_cfg['distillation_type']!r}")
        indices, n = model_cfg.get("indices"), len(depths)
        if indices is not None:
            if (not isinstance(indices, list) or not indices
                    or not all(isinstance(i, int) and not isinstance(i, bool) and -n <= i < n for i in indices)):
                raise ConfigError(f"{source}: model.indices must be a non-empty list of module indices in "
                                  f"[-{n}, {n}), got {indices!r}")
            if len({i % n for i in indices}) != len(indices):
                raise ConfigError(f"{source}: model.indices {indices} name a module twice")

    @property
    def indices(self) -> list[int]:
        """The taught module indices, non-negative (-1 is the last module)."""
        n = len(self.options["teacher_depths"])
        chosen = self.options["indices"]
        return list(range(n)) if chosen is None else [i % n for i in chosen]

    @cached_property
    def frozen(self) -> FrozenNetworks:
        """The frozen teacher and meta model, loaded and split (ConfigError for any misfit)."""
        source, data = self._source(), self.train_set
        teacher = _load_vit(self.options["teacher"], "teacher", source, data.num_classes, data.channels)
        meta = _load_vit(self.options["meta"], "meta", source, data.num_classes, data.channels)
        return split_frozen(teacher, meta, list(self.options["teacher_depths"]), source)

    def student_kwargs(self) -> dict:
        """``ModularStudent`` arguments: the recipe's, the meta model's token geometry, the data's classes."""
        meta, data = self.frozen.meta, self.train_set
        img_size, patch_size = meta.patch_embed.img_size, meta.patch_embed.patch_size
        if img_size[0] != img_size[1] or patch_size[0] != patch_size[1]:
            raise ConfigError(f"{self._source()}: the meta model's images {img_size} or patches {patch_size} "
                              "are not square; the modular student needs square ones")
        return {**STUDENT_DEFAULTS, **self.options["student"], "meta_dim": meta.embed_dim,
                "img_size": img_size[0], "patch_size": patch_size[0], "in_chans": data.channels,
                "num_classes": data.num_classes}

    def build_model(self) -> TaughtModules:
        kwargs = self.student_kwargs()
        student = _build_student(kwargs, self._source())
        if student.stages[0].module.stem.num_prefix_tokens != self.frozen.meta.num_prefix_tokens:
            raise ConfigError(f"{self._source()}: the meta model has {self.frozen.meta.num_prefix_tokens} prefix "
                              "tokens; the modular student has one class token")
        return TaughtModules([student_module(i, **kwargs) for i in self.indices], self.indices)

    def training_step(self, model, batch) -> tuple[torch.Tensor, dict]:
        images, labels = batch
        frozen = self.frozen.to(images)
        losses = model(images, labels, frozen, alpha=self.options["alpha"], tau=self.options["tau"],
                       distillation_type=self.options["distillation_type"])
        return losses.sum(), {f"loss_{i}": loss.detach() for i, loss in zip(self.indices, losses)}

    def on_train_end(self, ema_model, accelerator, output_dir: Path) -> dict:
        """Save the modules and the student config; score teacher, meta, each hybrid network and the assembly."""
        if not accelerator.is_main_process:
            return {}
        out = Path(output_dir)
        (out / MODULES_DIR).mkdir(parents=True, exist_ok=True)
        for i, module in zip(self.indices, ema_model):
            save_weights_atomic(module, module_path(out, i))
        kwargs = self.student_kwargs()
        write_json(out / STUDENT_CONFIG, kwargs, indent=2)

        device = next(ema_model.parameters()).device
        frozen, batch = self.frozen.to(torch.empty(0, device=device)), self.recipe.eval.batch_size

        def accuracy(model: nn.Module) -> float:
            return classification_metrics(*predict_logits(model, self.test_set, batch))["test_accuracy"]

        metrics = {"teacher_test_accuracy": accuracy(frozen.teacher), "meta_test_accuracy": accuracy(frozen.meta)}
        for i, module in zip(self.indices, ema_model):
            metrics[f"hybrid_{i}_test_accuracy"] = accuracy(HybridNetwork(frozen.meta_stages, i, module))
        if len(self.indices) == len(kwargs["depths"]):
            student = ModularStudent(**kwargs)
            student.load_modules(load_student_modules(out, self._source())[1])
            metrics["student_test_accuracy"] = accuracy(student.to(device))
            metrics["student_num_params"] = sum(p.numel() for p in student.parameters())
        return metrics


@register_method("modular_student")
class ModularStudentMethod(ClassificationMethod):
    """Cross-entropy training of the MoE modular student, from an m2mKD run's modules or from scratch."""

    model_defaults = MODULAR_DEFAULTS
    find_unused_parameters = True  # top-k gating may leave an expert without tokens

    def validate_model_config(self, model_cfg: dict) -> None:
        """Keys and values only; ``m2mkd_run`` is read when the model is built."""
        source = self._source()
        check_known_keys(model_cfg, list(MODULAR_DEFAULTS), "model", source)
        student, run = model_cfg.get("student"), model_cfg.get("m2mkd_run")
        if (student is None) == (run is None):
            raise ConfigError(f"{source}: give exactly one of model.student (train from scratch) and "
                              "model.m2mkd_run (start from an m2mkd run's modules)")
        if student is not None:
            _check_student(student, SCRATCH_STUDENT_DEFAULTS, source)
        elif not isinstance(run, str):
            raise ConfigError(f"{source}: model.m2mkd_run must be an m2mkd run directory, got {run!r}")
        if not isinstance(model_cfg.get("keep_stitches", True), bool):
            raise ConfigError(f"{source}: model.keep_stitches must be true or false")
        check_label_smoothing(model_cfg.get("label_smoothing", 0.0), source)

    @cached_property
    def taught(self) -> tuple[dict, list[dict[str, torch.Tensor]]] | None:
        run = self.options["m2mkd_run"]
        return None if run is None else load_student_modules(run, f"{self._source()}: model.m2mkd_run")

    def student_kwargs(self) -> dict:
        """``ModularStudent`` arguments: the m2mKD run's (checked against the data) or the recipe's plus the data's."""
        data = self.train_set
        expected = {"num_classes": data.num_classes, "in_chans": data.channels, "img_size": self.recipe.data.image_size}
        if self.taught is None:
            return {**SCRATCH_STUDENT_DEFAULTS, **self.options["student"], **expected}
        config = self.taught[0]
        for key, value in expected.items():
            if config.get(key) != value:
                raise ConfigError(f"{self._source()}: the m2mkd run {self.options['m2mkd_run']} has {key}="
                                  f"{config.get(key)!r} but the data gives {value!r}")
        return config

    def build_model(self) -> ModularStudent:
        student = _build_student(self.student_kwargs(), self._source(), keep_stitches=self.options["keep_stitches"])
        if self.taught is not None:
            try:
                student.load_modules(self.taught[1])
            except (RuntimeError, ValueError) as err:
                raise ConfigError(f"{self._source()}: the modules of {self.options['m2mkd_run']} do not fit "
                                  f"the modular student: {err}") from None
        return student

    def on_train_end(self, ema_model, accelerator, output_dir: Path) -> dict:
        """Test accuracy and ECE, ``model.safetensors`` and ``student_config.json`` (the ModularStudent arguments)."""
        if not accelerator.is_main_process:
            return {}
        metrics = finish_classifier(ema_model, self.test_set, self.recipe, Path(output_dir))
        config = {**self.student_kwargs(), "keep_stitches": self.options["keep_stitches"]}
        write_json(Path(output_dir) / STUDENT_CONFIG, config, indent=2)
        return metrics
