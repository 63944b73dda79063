"""Knowledge concentration: many vertical specialists distilled into one student.

Gao, Guo, Li, Nevatia, "Knowledge Concentration: Learning 100K Object Classifiers in a
Single CNN", arXiv 1711.07607. Paper-derived (secondary source): no official code exists,
and this clean-room version follows the paper abstract plus a third-party summary; it is to
be checked against the PDF.

What the code implements, in the paper's order:
- Verticals: the class ids 0..N-1 are partitioned into M verticals V_v of N_v classes.
- Multi-teacher targets: the vertical of a sample's label picks the specialist teacher;
  the soft target is z*_c = p_T(c) for c in that vertical and in the teacher's top-K, and
  z*_c = 0 otherwise. The student is trained with sigmoid cross-entropy
  L = -mean_c [z*_c log s(y_c) + (1 - z*_c) log(1 - s(y_c))].
- Structurally connected (SC) layers: per-vertical blocks with no weight across verticals.
  Parameter counts (weights only) with backbone width s_b, N classes, M verticals:
  (a) FC(s1)-FC(s2): s_b*s1 + s1*s2 + s2*N;  (b) FC(s1)-SC(s2): s_b*s1 + s1*s2*M + s2*N.
- Self-paced learning: per vertical a learnable scale gamma_v, initialised at sqrt(N_v);
  the logits of vertical v become y_v = gamma_v * x_v / ||x_v||.

The two training Methods, run one after the other:

``specialists``: the M teachers T(V_v), trained side by side in one run. Specialist v is a timm
classifier over its N_v classes, trained with sigmoid (multi-label) cross-entropy on the samples
of the batch whose label lies in V_v, against the one-hot vector of the label within V_v; the
loss is the sum over the verticals present in the batch of each specialist's mean. Each one is
saved as a ``classifier`` run directory ``<output_dir>/specialist_{v}/`` (``model.safetensors``
+ ``model_config.json``, what :func:`genforge.kd.teachers.load_classifier` reads) next to
``verticals.json``.

``concentration``: one student, a timm backbone (features) under the head of layout (b),
FC(s1) - SC(s2 per vertical) - per-vertical classifier - self-paced scale y_v = gamma_v x_v/||x_v||.
Each sample's target z* is the sigmoid output of the specialist of its label's vertical, kept on
that vertical's top-K classes and zero elsewhere; the loss is the sigmoid cross-entropy of the
student logits against z*. The specialists are frozen and live outside the trained model (never
in the optimizer, the EMA or a checkpoint). The EMA student is scored on the test split (top-1
of its logits in class-id order, ECE) and saved to ``model.safetensors`` with
``student_config.json``, from which :func:`load_student` rebuilds it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from genforge.config import ConfigError, check_known_keys
from genforge.core.io import write_json
from genforge.core.state_dict import load_state_dict_strict, read_state_dict
from genforge.kd.teachers import RUN_CONFIG, RUN_WEIGHTS, TeacherError, load_classifier, teacher_device
from genforge.methods.classification import (ClassificationMethod, check_timm_model, finish_classifier,
                                             predict_logits, save_weights_atomic)
from genforge.train import register_method

__all__ = ["ConcentrationHead", "ConcentrationMethod", "ConcentrationStudent", "SelfPacedScale", "SpecialistBank",
           "SpecialistsMethod", "StructurallyConnected", "Verticals", "build_student", "concentration_loss",
           "concentration_targets", "index_within_vertical", "load_specialists", "load_student", "read_verticals",
           "save_specialist", "specialist_dir", "specialists_loss", "teacher_probs"]


class Verticals:
    """A partition of the class ids 0..N-1 into verticals (disjoint groups covering all ids)."""

    def __init__(self, groups: Sequence[Sequence[int]]):
        groups = [[int(c) for c in g] for g in groups]
        if not groups or any(len(g) == 0 for g in groups):
            raise ValueError(
                f"every vertical needs at least one class, got sizes {[len(g) for g in groups]}"
            )
        flat = [c for g in groups for c in g]
        if len(set(flat)) != len(flat):
            dup = sorted({c for c in flat if flat.count(c) > 1})
            raise ValueError(
                f"verticals must be disjoint, class ids {dup} appear more than once"
            )
        n = len(flat)
        if sorted(flat) != list(range(n)):
            raise ValueError(
                f"verticals must cover class ids 0..{n - 1} exactly, got {sorted(flat)}"
            )
        self.groups: list[list[int]] = groups
        self.num_classes = n
        self.num_verticals = len(groups)
        self.sizes = [len(g) for g in groups]
        # order[j] = class id at position j of the vertical-ordered logit vector
        self.order = torch.tensor(flat, dtype=torch.long)
        self.inverse = torch.empty(n, dtype=torch.long)
        self.inverse[self.order] = torch.arange(n)
        self.vertical_of = torch.empty(n, dtype=torch.long)
        for v, g in enumerate(groups):
            self.vertical_of[g] = v

    @classmethod
    def from_sizes(cls, sizes: Sequence[int]) -> "Verticals":
        """Contiguous verticals: sizes (3, 4) gives {0,1,2} and {3,4,5,6}."""
        starts = [sum(sizes[:v]) for v in range(len(sizes))]
        return cls([list(range(s, s + n)) for s, n in zip(starts, sizes)])


class StructurallyConnected(nn.Module):
    """A linear layer made of independent per-vertical blocks.

    `in_features` an int: every block reads the whole input (the SC layer after a shared FC,
    layout b). A sequence: the input is split into consecutive chunks, one per block, and the
    layer is block-diagonal. Only the blocks are parameters, so no weight crosses verticals.
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        out_features: Sequence[int],
        bias: bool = True,
    ):
        super().__init__()
        out_features = [int(o) for o in out_features]
        self.shared_input = isinstance(in_features, int)
        in_sizes = (
            [in_features] * len(out_features)
            if self.shared_input
            else [int(i) for i in in_features]
        )
        if len(in_sizes) != len(out_features):
            raise ValueError(
                f"got {len(in_sizes)} input blocks for {len(out_features)} output blocks"
            )
        self.in_sizes, self.out_sizes = in_sizes, out_features
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(o, i)) for i, o in zip(in_sizes, out_features)
        )
        self.bias = nn.Parameter(torch.zeros(sum(out_features))) if bias else None
        for w in self.weights:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))

    def weight(self) -> torch.Tensor:
        """The full (sum out, in) weight with exact zeros across blocks."""
        if self.shared_input:
            return torch.cat(list(self.weights), dim=0)
        return torch.block_diag(*self.weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = self.in_sizes[0] if self.shared_input else sum(self.in_sizes)
        if x.shape[-1] != expected:
            raise ValueError(
                f"SC layer expects {expected} input features, got shape {tuple(x.shape)}"
            )
        return F.linear(x, self.weight(), self.bias)


class SelfPacedScale(nn.Module):
    """y_v = gamma_v * x_v / ||x_v|| for each vertical v of vertical-ordered logits x.

    gamma_v is initialised at sqrt(N_v) (`init="sqrt"`) or at a given number, learnable or
    fixed. The normalisation is over the vertical's logit vector (vertical level).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        init: str | float = "sqrt",
        learnable: bool = True,
        eps: float = 1e-6,
    ):
        super().__init__()
        if init == "sqrt":
            gamma = torch.tensor([math.sqrt(n) for n in sizes])
        elif isinstance(init, (int, float)):
            gamma = torch.full((len(sizes),), float(init))
        else:
            raise ValueError(f"init must be 'sqrt' or a number, got {init!r}")
        self.sizes = list(sizes)
        self.eps = eps
        if learnable:
            self.gamma = nn.Parameter(gamma)
        else:
            self.register_buffer("gamma", gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N) in vertical order
        parts = torch.split(x, self.sizes, dim=-1)
        out = [
            g * p / p.norm(dim=-1, keepdim=True).clamp_min(self.eps)
            for g, p in zip(self.gamma, parts)
        ]
        return torch.cat(out, dim=-1)


class ConcentrationHead(nn.Module):
    """Layout (b): FC(s1) - SC(s2 per vertical) - per-vertical classifier - self-paced scale.

    Returns logits (B, N) indexed by class id.
    """

    def __init__(
        self,
        in_dim: int,
        s1: int,
        s2: int,
        verticals: Verticals,
        gamma_init: str | float = "sqrt",
        learn_gamma: bool = True,
    ):
        super().__init__()
        self.verticals = verticals
        m = verticals.num_verticals
        self.fc = nn.Linear(in_dim, s1)
        self.sc = StructurallyConnected(s1, [s2] * m)
        self.classifier = StructurallyConnected([s2] * m, verticals.sizes)
        self.scale = SelfPacedScale(
            verticals.sizes, init=gamma_init, learnable=learn_gamma
        )
        self.register_buffer("inverse", verticals.inverse.clone(), persistent=False)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (B, in_dim) -> (B, N)
        h = F.relu(self.fc(feats))
        h = F.relu(self.sc(h))  # (B, M * s2)
        y = self.scale(self.classifier(h))  # (B, N), vertical order
        return y[:, self.inverse]  # class-id order


def concentration_targets(
    teacher_probs_per_vertical: Sequence[torch.Tensor],
    labels: torch.Tensor,
    verticals: Verticals,
    top_k: int,
) -> torch.Tensor:
    """Soft targets z* (B, N).

    teacher_probs_per_vertical[v]: (B, N_v) sigmoid probabilities of teacher v over its
    vertical's classes, in the order of `verticals.groups[v]`. Each sample keeps only the
    teacher of its label's vertical, and of it only the top-K probabilities.
    """
    if len(teacher_probs_per_vertical) != verticals.num_verticals:
        raise ValueError(
            f"need {verticals.num_verticals} teacher outputs, got {len(teacher_probs_per_vertical)}"
        )
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    b = labels.shape[0]
    ref = teacher_probs_per_vertical[0]
    z = torch.zeros(b, verticals.num_classes, dtype=ref.dtype, device=ref.device)
    sample_vertical = verticals.vertical_of.to(labels.device)[labels]  # (B,)
    for v, (probs, group) in enumerate(
        zip(teacher_probs_per_vertical, verticals.groups)
    ):
        if probs.shape != (b, len(group)):
            raise ValueError(
                f"teacher {v} output must be {(b, len(group))}, got {tuple(probs.shape)}"
            )
        rows = (sample_vertical == v).nonzero(as_tuple=True)[0].to(z.device)
        if rows.numel() == 0:
            continue
        p = probs[rows]
        vals, idx = p.topk(min(top_k, len(group)), dim=-1)
        kept = torch.zeros_like(p).scatter_(-1, idx, vals)
        cols = torch.tensor(group, device=z.device)
        z[rows.unsqueeze(1), cols.unsqueeze(0)] = kept
    return z


def concentration_loss(
    student_logits: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Sigmoid (binary) cross-entropy of the student logits against z*, mean over entries."""
    return F.binary_cross_entropy_with_logits(student_logits, targets)


# --- the training Methods -------------------------------------------------------------------

VERTICALS_FILE = "verticals.json"
STUDENT_CONFIG = "student_config.json"
SPECIALISTS_DEFAULTS = {"name": None, "kwargs": {}, "verticals": None}
CONCENTRATION_DEFAULTS = {"name": None, "kwargs": {}, "s1": None, "s2": None, "top_k": 2,
                          "specialists": None, "learn_gamma": True}


def specialist_dir(run_dir: Path, v: int) -> Path:
    """Where a ``specialists`` run keeps specialist v (a classifier run directory)."""
    return Path(run_dir) / f"specialist_{v}"


def _verticals(groups, where: str) -> Verticals:
    """Verticals from a list of lists of class ids; ConfigError naming ``where`` otherwise."""
    if (not isinstance(groups, list)
            or not all(isinstance(g, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in g)
                       for g in groups)):
        raise ConfigError(f"{where} must be a list of lists of class ids, got {groups!r}")
    try:
        return Verticals(groups)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def _check_covers_dataset(verticals: Verticals, num_classes: int, where: str) -> None:
    if verticals.num_classes != num_classes:
        raise ConfigError(f"{where} cover class ids 0..{verticals.num_classes - 1}, but the dataset has "
                          f"{num_classes} classes (0..{num_classes - 1}); every class needs one vertical")


# --- the specialists ---------------------------------------------------------------------


def index_within_vertical(verticals: Verticals) -> torch.Tensor:
    """(N,) long: entry c is the index of class c among its vertical's classes."""
    within = torch.empty(verticals.num_classes, dtype=torch.long)
    for group in verticals.groups:
        within[group] = torch.arange(len(group))
    return within


class SpecialistBank(nn.ModuleList):
    """The M specialists; specialist v predicts the classes of ``verticals.groups[v]`` in that order.

    A module with a ``forward`` (rather than indexing the list in the step), so that a
    DistributedDataParallel wrapper sees the forward pass and synchronises the gradients.
    """

    def __init__(self, models, verticals: Verticals):
        super().__init__(models)
        if len(self) != verticals.num_verticals:
            raise ValueError(f"{len(self)} specialists for {verticals.num_verticals} verticals")
        self.verticals = verticals
        self.register_buffer("within", index_within_vertical(verticals), persistent=False)
        self.register_buffer("vertical_of", verticals.vertical_of.clone(), persistent=False)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per vertical present in the batch: (its specialist's logits (B_v, N_v), targets (B_v, N_v)),
        the one-hot vector of each label within the vertical."""
        sample_vertical = self.vertical_of[labels]  # (B,)
        out = []
        for v, specialist in enumerate(self):
            rows = (sample_vertical == v).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            logits = specialist(images[rows])
            out.append((logits, F.one_hot(self.within[labels[rows]], logits.shape[1]).to(logits.dtype)))
        return out


def specialists_loss(outputs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Sum over the verticals in the batch of the specialist's mean sigmoid cross-entropy."""
    return sum(F.binary_cross_entropy_with_logits(logits.float(), target.float()) for logits, target in outputs)


def save_specialist(model: nn.Module, directory: Path, config: dict) -> None:
    """A classifier run directory: ``model.safetensors`` and ``model_config.json`` (``config``:
    ``model_name`` and the ``timm.create_model`` arguments)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_weights_atomic(model, directory / RUN_WEIGHTS)
    write_json(directory / RUN_CONFIG, config, indent=2)


@register_method("specialists")
class SpecialistsMethod(ClassificationMethod):
    """The specialist teachers of a vertical partition, one timm classifier per vertical."""

    model_defaults = SPECIALISTS_DEFAULTS
    find_unused_parameters = True  # a vertical absent from a batch leaves its specialist idle

    def validate_model_config(self, model_cfg: dict) -> None:
        source = self._source()
        check_known_keys(model_cfg, list(SPECIALISTS_DEFAULTS), "model", source)
        check_timm_model(model_cfg, source)
        _verticals(model_cfg.get("verticals"), f"{source}: model.verticals")

    @cached_property
    def verticals(self) -> Verticals:
        return _verticals(self.options["verticals"], f"{self._source()}: model.verticals")

    def specialist_config(self, v: int) -> dict:
        """What ``model_config.json`` of specialist v records: the ``create_model`` arguments."""
        return {"model_name": self.options["name"], "num_classes": self.verticals.sizes[v],
                "in_chans": self.train_set.channels, **self.options["kwargs"]}

    def build_model(self) -> SpecialistBank:
        verticals = self.verticals
        _check_covers_dataset(verticals, self.train_set.num_classes, f"{self._source()}: model.verticals")
        models = []
        for v in range(verticals.num_verticals):
            config = self.specialist_config(v)
            try:
                models.append(timm.create_model(config.pop("model_name"), **config))
            except TypeError as err:
                raise ConfigError(f"{self._source()}: model.kwargs {self.options['kwargs']!r} do not fit "
                                  f"timm model {self.options['name']!r}: {err}") from None
        return SpecialistBank(models, verticals)

    def training_step(self, model, batch) -> tuple[torch.Tensor, dict]:
        images, labels = batch
        outputs = model(images, labels)
        hits = sum((logits.argmax(1) == target.argmax(1)).sum() for logits, target in outputs)
        return specialists_loss(outputs), {"train_accuracy_in_vertical": hits / labels.numel()}

    def on_train_end(self, ema_model, accelerator, output_dir: Path) -> dict:
        """Save each specialist and its accuracy on the test samples of its own vertical."""
        if not accelerator.is_main_process:
            return {}
        out, verticals = Path(output_dir), ema_model.verticals
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / VERTICALS_FILE, verticals.groups)
        within = index_within_vertical(verticals)
        test_vertical = verticals.vertical_of[torch.tensor([int(y) for _, y in self.test_set])]
        metrics = {}
        for v, specialist in enumerate(ema_model):
            save_specialist(specialist, specialist_dir(out, v), self.specialist_config(v))
            rows = (test_vertical == v).nonzero(as_tuple=True)[0].tolist()
            if rows:
                logits, labels = predict_logits(specialist, torch.utils.data.Subset(self.test_set, rows),
                                                self.recipe.eval.batch_size)
                accuracy = (logits.argmax(1) == within[labels]).float().mean()
                metrics[f"specialist_{v}_test_accuracy"] = float(accuracy)
        metrics["mean_specialist_test_accuracy"] = sum(metrics.values()) / max(len(metrics), 1)
        return metrics


# --- the student ---------------------------------------------------------------------------


def read_verticals(run_dir) -> Verticals:
    """The verticals of a ``specialists`` run, after checking that each specialist's recorded
    class count is its vertical's size; ConfigError naming the file otherwise."""
    run_dir = Path(run_dir)
    path = run_dir / VERTICALS_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a 'specialists' run directory: no {VERTICALS_FILE}")
    verticals = _verticals(json.loads(path.read_text()), str(path))
    for v, size in enumerate(verticals.sizes):
        config_path = specialist_dir(run_dir, v) / RUN_CONFIG
        if not config_path.is_file():
            raise ConfigError(f"specialist {v} of {run_dir}: {config_path} not found")
        recorded = json.loads(config_path.read_text()).get("num_classes")
        if recorded != size:
            raise ConfigError(f"{config_path}: specialist {v} predicts {recorded} classes, but its vertical "
                              f"{verticals.groups[v]} in {path} has {size}")
    return verticals


def load_specialists(run_dir, verticals: Verticals, in_chans: int) -> list[nn.Module]:
    """The frozen specialists of a ``specialists`` run; ConfigError if one does not fit."""
    for v in range(verticals.num_verticals):
        config_path = specialist_dir(run_dir, v) / RUN_CONFIG
        recorded = json.loads(config_path.read_text()).get("in_chans", in_chans)
        if recorded != in_chans:
            raise ConfigError(f"{config_path}: specialist {v} reads {recorded} input channels, "
                              f"the data has {in_chans}")
    try:
        return [load_classifier(specialist_dir(run_dir, v), num_classes=size, in_chans=in_chans)
                for v, size in enumerate(verticals.sizes)]
    except TeacherError as err:
        raise ConfigError(str(err)) from None


@torch.no_grad()
def teacher_probs(specialists, images: torch.Tensor, labels: torch.Tensor,
                  verticals: Verticals) -> list[torch.Tensor]:
    """Sigmoid outputs p_T (B, N_v) of each specialist, in the order of its vertical's classes.

    Specialist v is run only on the samples whose label lies in V_v, the only rows
    :func:`concentration_targets` reads from it; its other rows are zero. The frozen specialists
    are in eval mode, so a sample's output does not depend on the rest of the batch.
    """
    sample_vertical = verticals.vertical_of.to(labels.device)[labels]
    probs = []
    for v, specialist in enumerate(specialists):
        p = images.new_zeros(labels.shape[0], verticals.sizes[v], dtype=torch.float32)
        rows = (sample_vertical == v).nonzero(as_tuple=True)[0]
        if rows.numel():
            p[rows] = torch.sigmoid(teacher_device(specialist, images)(images[rows]).float())
        probs.append(p)
    return probs


class ConcentrationStudent(nn.Module):
    """A timm backbone (pooled features, ``num_classes=0``) under a :class:`ConcentrationHead`;
    returns the logits (B, N) in class-id order."""

    def __init__(self, backbone: nn.Module, head: ConcentrationHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))  # (B, s_b) -> (B, N)


def build_student(config: dict) -> ConcentrationStudent:
    """The student of a ``student_config.json`` mapping (backbone, kwargs, in_chans, s1, s2,
    verticals, learn_gamma)."""
    backbone = timm.create_model(config["backbone"], num_classes=0, in_chans=config["in_chans"],
                                 **config["kwargs"])
    head = ConcentrationHead(backbone.num_features, config["s1"], config["s2"], Verticals(config["verticals"]),
                             learn_gamma=config["learn_gamma"])
    return ConcentrationStudent(backbone, head)


def load_student(run_dir) -> ConcentrationStudent:
    """The trained student of a ``concentration`` run directory, in eval mode."""
    run_dir = Path(run_dir)
    student = build_student(json.loads((run_dir / STUDENT_CONFIG).read_text()))
    load_state_dict_strict(student, read_state_dict(run_dir / RUN_WEIGHTS), what=f"student weights in {run_dir}")
    return student.eval()


def _check_positive_int(model_cfg: dict, key: str, source: str) -> None:
    value = model_cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{source}: model.{key} must be a positive integer, got {value!r}")


@register_method("concentration")
class ConcentrationMethod(ClassificationMethod):
    """One student distilled from the specialists of a ``specialists`` run (masked multi-teacher
    sigmoid cross-entropy, top-K targets)."""

    model_defaults = CONCENTRATION_DEFAULTS

    def __init__(self, recipe):
        super().__init__(recipe)
        self.specialists: list[nn.Module] = []

    def validate_model_config(self, model_cfg: dict) -> None:
        source = self._source()
        check_known_keys(model_cfg, list(CONCENTRATION_DEFAULTS), "model", source)
        check_timm_model(model_cfg, source, exempt=("num_classes", "in_chans", "pretrained"))
        cfg = {**CONCENTRATION_DEFAULTS, **model_cfg}
        for key in ("s1", "s2", "top_k"):
            _check_positive_int(cfg, key, source)
        if not isinstance(cfg["learn_gamma"], bool):
            raise ConfigError(f"{source}: model.learn_gamma must be true or false, got {cfg['learn_gamma']!r}")
        run_dir = cfg["specialists"]
        if not isinstance(run_dir, str) or not run_dir:
            raise ConfigError(f"{source}: model.specialists must be the output_dir of a 'specialists' run, "
                              f"got {run_dir!r}")
        try:
            read_verticals(run_dir)
        except ConfigError as err:
            raise ConfigError(f"{source}: model.specialists: {err}") from None

    def student_config(self) -> dict:
        """What ``student_config.json`` records: the arguments of :func:`build_student`."""
        return {"backbone": self.options["name"], "kwargs": self.options["kwargs"],
                "in_chans": self.train_set.channels, "s1": self.options["s1"], "s2": self.options["s2"],
                "verticals": self.verticals.groups, "learn_gamma": self.options["learn_gamma"]}

    @cached_property
    def verticals(self) -> Verticals:
        return read_verticals(self.options["specialists"])

    def build_model(self) -> ConcentrationStudent:
        """The student; first loads the frozen specialists, so that a misfit fails before training."""
        source = f"{self._source()}: model.specialists {self.options['specialists']}"
        verticals = self.verticals
        _check_covers_dataset(verticals, self.train_set.num_classes, f"{source}: the verticals")
        try:
            self.specialists = load_specialists(self.options["specialists"], verticals, self.train_set.channels)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        try:
            return build_student(self.student_config())
        except TypeError as err:
            raise ConfigError(f"{self._source()}: model.kwargs {self.options['kwargs']!r} do not fit "
                              f"timm model {self.options['name']!r}: {err}") from None

    def targets(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """z* (B, N): the top-K sigmoid outputs of the specialist of each label's vertical."""
        verticals = self.verticals
        probs = teacher_probs(self.specialists, images, labels, verticals)
        return concentration_targets(probs, labels, verticals, self.options["top_k"])

    def training_step(self, model, batch) -> tuple[torch.Tensor, dict]:
        images, labels = batch
        logits = model(images)
        loss = concentration_loss(logits.float(), self.targets(images, labels))
        return loss, {"train_accuracy": (logits.argmax(dim=1) == labels).float().mean()}

    def on_train_end(self, ema_model, accelerator, output_dir: Path) -> dict:
        """Test accuracy and ECE of the EMA student, its weights and ``student_config.json``."""
        if not accelerator.is_main_process:
            return {}
        metrics = finish_classifier(ema_model, self.test_set, self.recipe, Path(output_dir))
        write_json(Path(output_dir) / STUDENT_CONFIG, self.student_config(), indent=2)
        return metrics
