"""Frozen classifiers from files: the teachers of every knowledge-transfer method.

A teacher is a ``timm.create_model`` network (timm's own or a genforge ``gf_*`` backbone) with
weights from a local file. A recipe names it one of two ways:

- a run directory written by the ``classifier`` method (``model_config.json`` holds the
  ``timm.create_model`` arguments, ``model.safetensors`` the weights): ``runs/resnet18_digits``;
- a mapping ``{name: resnet18, file: path/to/weights, kwargs: {...}}``; the file is a
  safetensors file or a torch checkpoint (opened with ``weights_only=True``, so no code runs),
  e.g. an official timm/MEAL-V2 checkpoint.

Weights load strictly (:func:`genforge.core.state_dict.load_state_dict_strict` names every
missing, extra or mis-shaped key). The model comes back frozen: eval mode and
``requires_grad=False``. A class count that differs from the one expected (the dataset's or
the student's) is an error naming both, raised before any training.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from torch import nn

from genforge.core.state_dict import StateDictError, load_state_dict_strict, read_state_dict

__all__ = ["TeacherError", "check_teacher_source", "describe_source", "freeze", "load_classifier",
           "load_teachers", "teacher_config", "teacher_device", "teacher_record"]

RUN_CONFIG = "model_config.json"
RUN_WEIGHTS = "model.safetensors"
SPEC_KEYS = ("name", "file", "kwargs")


class TeacherError(ValueError):
    """A teacher that cannot be built or does not fit the data or the student."""


def describe_source(source) -> str:
    """How error messages name a teacher source."""
    return str(source) if not isinstance(source, Mapping) else f"{source.get('name')} from {source.get('file')}"


def _read_run_config(path: Path) -> dict:
    """A run's ``model_config.json``: a mapping with ``model_name``; TeacherError naming the file otherwise."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise TeacherError(f"teacher config {path} is not readable JSON ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_name"), str):
        raise TeacherError(f"teacher config {path} must be a mapping with 'model_name' (the timm.create_model "
                           f"arguments a classifier run writes), got {config!r}")
    return config


def teacher_config(source) -> tuple[str, dict, Path]:
    """(timm name, ``create_model`` kwargs, weight file) of a run directory or a mapping.

    Checks only what can be checked without building the model: the keys, that the name is a
    timm model and that the files exist. Raises TeacherError naming the source.
    """
    if isinstance(source, Mapping):
        unknown = sorted(set(source) - set(SPEC_KEYS))
        if unknown:
            raise TeacherError(f"teacher {describe_source(source)}: unknown keys {unknown}; "
                               f"allowed: {list(SPEC_KEYS)}")
        name, kwargs, file = source.get("name"), source.get("kwargs") or {}, source.get("file")
        if not isinstance(name, str) or file is None:
            raise TeacherError(f"a teacher mapping needs 'name' (a timm model) and 'file', got {dict(source)}")
        if not isinstance(kwargs, Mapping):
            raise TeacherError(f"teacher {describe_source(source)}: 'kwargs' must be a mapping, got {kwargs!r}")
        kwargs, file = dict(kwargs), Path(str(file))
    elif isinstance(source, (str, Path)):
        run = Path(source)
        config_path = run / RUN_CONFIG
        if not config_path.is_file():
            raise TeacherError(f"teacher {run}: not a classifier run directory (no {RUN_CONFIG}); give a "
                               f"run directory of the 'classifier' method or a mapping {{name, file, kwargs}}")
        kwargs = _read_run_config(config_path)
        name, file = kwargs.pop("model_name"), run / RUN_WEIGHTS
    else:
        raise TeacherError(f"a teacher is a run directory or a mapping {{name, file, kwargs}}, got {source!r}")
    if not timm.is_model(name):
        raise TeacherError(f"teacher {describe_source(source)}: {name!r} is not a timm model")
    if not file.is_file():
        raise TeacherError(f"teacher {describe_source(source)}: weight file {file} not found")
    return name, kwargs, file


def teacher_record(source) -> dict:
    """What identifies a teacher, for a provenance record: timm name, kwargs and the sha256 of its weight file."""
    name, kwargs, file = teacher_config(source)
    with open(file, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"name": name, "kwargs": kwargs, "sha256": digest}


def check_teacher_source(source, num_classes: int | None = None) -> None:
    """TeacherError for a bad source, or one whose recorded class count differs from ``num_classes``."""
    _, kwargs, _ = teacher_config(source)
    recorded = kwargs.get("num_classes")
    if num_classes is not None and recorded is not None and recorded != num_classes:
        raise TeacherError(f"teacher {describe_source(source)} predicts {recorded} classes but "
                           f"{num_classes} are expected (the dataset's and the student's)")


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad=False`` on every parameter, in place."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_classifier(source, *, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
    """The frozen classifier of ``source`` (a run directory or a ``{name, file, kwargs}`` mapping).

    ``num_classes`` / ``in_chans``: what the caller expects; a mapping without them in its
    kwargs is built with these, and a model predicting another class count is refused.
    """
    name, kwargs, file = teacher_config(source)
    if num_classes is not None:
        kwargs.setdefault("num_classes", num_classes)
    if in_chans is not None:
        kwargs.setdefault("in_chans", in_chans)
    if num_classes is not None and kwargs["num_classes"] != num_classes:
        raise TeacherError(f"teacher {describe_source(source)} predicts {kwargs['num_classes']} classes but "
                           f"{num_classes} are expected (the dataset's and the student's)")
    try:
        model = timm.create_model(name, **kwargs)
    except TypeError as err:
        raise TeacherError(f"teacher {describe_source(source)}: kwargs {kwargs} do not fit timm model "
                           f"{name!r}: {err}") from None
    try:
        load_state_dict_strict(model, read_state_dict(file), what=f"teacher weights {file}")
    except StateDictError as err:
        raise TeacherError(str(err)) from None
    return freeze(model)


def load_teachers(sources, *, num_classes: int | None = None, in_chans: int | None = None) -> list[nn.Module]:
    """:func:`load_classifier` of each source; an empty list is an error."""
    if not sources:
        raise TeacherError("at least one teacher is needed")
    return [load_classifier(s, num_classes=num_classes, in_chans=in_chans) for s in sources]


def teacher_device(model: nn.Module, like: torch.Tensor) -> nn.Module:
    """Move a frozen teacher to ``like``'s device (once; a no-op afterwards)."""
    first = next(model.parameters(), None)
    if first is not None and first.device != like.device:
        model.to(like.device)
    return model
