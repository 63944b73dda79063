"""``genforge.kd.train_student``: train a student against teachers from Python, in one call.

The call writes the same recipe a user would write (``method``, ``data``, ``model``, ``train``)
and runs it through the one training loop, so it validates, checkpoints, resumes and logs
exactly as ``genforge train`` does, and the run directory holds ``recipe.yaml`` to rerun it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from genforge.config import recipe_from_dict
from genforge.train import TrainResult, train

__all__ = ["train_student"]


def _plain(source):
    """Recipe-ready form of a teacher source: a path string or a plain mapping."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, Mapping):
        return {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in source.items()}
    raise TypeError(f"a teacher is a classifier run directory or a {{name, file, kwargs}} mapping, "
                    f"got {type(source).__name__}")


def train_student(
    teachers: Sequence | None,
    student: str,
    method: str = "meal_v2",
    *,
    dataset: str = "digits",
    root: str | None = None,
    image_size: int = 16,
    resize: str = "pad",
    channels: int | None = None,
    batch_size: int = 64,
    steps: int = 300,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
    resume: bool | str = False,
    train_options: Mapping | None = None,
    **model_options,
) -> TrainResult:
    """Train timm model ``student`` from ``teachers`` with ``method`` and score it on the test split.

    Args:
        teachers: classifier run directories or ``{name, file, kwargs}`` mappings (see
            :mod:`genforge.kd.teachers`); ``None`` for methods without online teachers
            (``reinforced`` reads its targets from ``reinforced_dir``).
        student: a ``timm.create_model`` name (genforge's ``gf_*`` backbones included).
        method: a registered method: ``meal_v2``, ``kd``, ``reinforced``, or any other.
        train_options: keys of the recipe's ``train:`` section (``lr``, ``optimizer``,
            ``lr_milestones``, ``weight_decay``, ``ema_decay``, ...).
        **model_options: the method's ``model:`` keys (``pretrained_file``, ``alpha``,
            ``temperature``, ``d_lr``, ``update``, ``reinforced_dir``, ``kwargs``, ...).

    Returns the loop's :class:`~genforge.train.TrainResult`; ``metrics`` holds the student's
    test accuracy and ECE, and ``output_dir`` its weights (``model.safetensors``).
    """
    model = {"name": student, **model_options}
    if teachers is not None:
        model["teachers"] = [_plain(t) for t in teachers]
    raw = {
        "method": method,
        "seed": seed,
        "output_dir": os.fspath(output_dir) if output_dir is not None else f"runs/{method}_{student}",
        "data": {"name": dataset, "root": root, "image_size": image_size, "resize": resize,
                 "channels": channels, "batch_size": batch_size},
        "model": model,
        "train": {"max_steps": steps, **dict(train_options or {})},
    }
    return train(recipe_from_dict(raw, source=f"genforge.kd.train_student(method={method!r})"), resume=resume)
