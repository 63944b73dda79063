"""``genforge.distill.distill_dataset(method=..., dataset=..., ipc=...)``: one call from real data to a synthetic set.

Engines: ``"random"`` (a random real subset, the field's baseline), ``"dm"``, ``"datadam"``
and ``"dwa"`` (``rho=0`` is SRe2L). ``flip=True`` is FYI for any of the optimising engines.
Method options are the fields of the engine's options dataclass (``ENGINE_OPTIONS``);
unknown ones are refused before any work starts. ``shard=(index, count)`` distils one share
(classes for the matching engines, batches for DWA) so several processes can split a run;
``SyntheticSet.merge`` joins the shares.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from genforge.distill.data import RealData, load_real
from genforge.distill.datadam import DataDAMOptions, datadam_objective
from genforge.distill.dm import DMOptions, dm_objective
from genforge.distill.dwa import DWAOptions, distill_dwa, load_teacher, teacher_training, train_teacher
from genforge.distill.matching import distill_by_matching
from genforge.distill.state import (check_settings, prepare_output_dir, read_safetensors, save_safetensors,
                                    settings_digest)
from genforge.distill.synthetic import SyntheticSet, initial_images

__all__ = ["ENGINE_OPTIONS", "RandomOptions", "check_run", "distill_dataset", "engine_options", "resolve_teacher",
           "teacher_settings"]


@dataclass
class RandomOptions:
    """The random-real-subset baseline has no options."""

    def check(self) -> None:
        pass


ENGINE_OPTIONS = {"random": RandomOptions, "dm": DMOptions, "datadam": DataDAMOptions, "dwa": DWAOptions}


def engine_options(method: str, options: dict):
    """The checked options dataclass of ``method`` built from ``options``."""
    if method not in ENGINE_OPTIONS:
        raise ValueError(f"unknown distillation method {method!r}; known: {sorted(ENGINE_OPTIONS)}")
    cls = ENGINE_OPTIONS[method]
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; its options are {known}")
    built = cls(**options)
    built.check()
    return built


def _as_real(dataset, dataset_kwargs: dict) -> RealData:
    if isinstance(dataset, RealData):
        return dataset
    if isinstance(dataset, str):
        return load_real(dataset, **dataset_kwargs)[0]
    if isinstance(dataset, Dataset):
        return RealData.from_dataset(dataset, zca=dataset_kwargs.get("zca", False))
    raise TypeError(f"dataset must be a dataset name, a RealData or a torch Dataset, got {type(dataset).__name__}")


def teacher_settings(real: RealData, options: DWAOptions, seed: int) -> dict:
    """Everything a trained DWA teacher depends on: its network, its training, the seed and the data."""
    return {"width": options.teacher_width, "depth": options.teacher_depth, "seed": seed,
            "training": asdict(teacher_training(options)), "data": real.fingerprint}


def resolve_teacher(teacher, real: RealData, options: DWAOptions, seed: int, output_dir: Path | None,
                    progress: bool) -> nn.Module:
    """The DWA teacher: a module, a weight file, or one trained now.

    A trained teacher is cached in ``output_dir`` as ``teacher-<digest>.safetensors``, the
    digest a sha256 of :func:`teacher_settings`, which the file also records; it is reused
    only by a run with the same settings (the recorded ones are checked on reuse).
    """
    if isinstance(teacher, nn.Module):
        return teacher.eval()
    if teacher is not None:
        return load_teacher(teacher, real, options)
    settings = teacher_settings(real, options, seed)
    cached = output_dir / f"teacher-{settings_digest(settings)}.safetensors" if output_dir is not None else None
    if cached is not None and cached.is_file():
        _, meta = read_safetensors(cached, "cached DWA teacher")
        check_settings(cached, json.loads(meta["settings"]) if "settings" in meta else None, settings)
        return load_teacher(cached, real, options)
    net = train_teacher(real, options, seed, progress=progress)
    if cached is not None:
        save_safetensors(cached, net.state_dict(), metadata={"settings": json.dumps(settings, sort_keys=True)})
    return net


def check_run(method: str, real: RealData, ipc: int, *, flip: bool = False, teacher=None) -> None:
    """ValueError, before any work (a DWA teacher is trained first), for a run that cannot be done."""
    if not isinstance(ipc, int) or isinstance(ipc, bool) or ipc < 1:
        raise ValueError(f"ipc must be a positive integer, got {ipc!r}")
    if flip and method == "random":
        raise ValueError("flip (FYI) changes an objective; the random-subset baseline has none")
    if teacher is not None and method != "dwa":
        raise ValueError(f"a teacher is only used by method 'dwa', not {method!r}")
    if method == "dwa" and real.zca is not None:
        raise ValueError("DWA clips pixels to the [0, 1] box in normalised space; it cannot run on ZCA-whitened data")
    real.check_ipc(ipc)


def distill_dataset(method: str = "datadam", dataset="digits", ipc: int = 10, *, seed: int = 0, flip: bool = False,
                    teacher=None, shard: tuple[int, int] = (0, 1), output_dir: str | Path | None = None,
                    resume: bool | str = False, overwrite: bool = False, progress: bool = True,
                    dataset_kwargs: dict | None = None, **options) -> SyntheticSet:
    """Distil ``dataset`` into ``ipc`` images per class with ``method``; see the module docstring.

    ``dataset`` is a registered dataset name (``dataset_kwargs`` go to
    :func:`genforge.distill.data.load_real`: root, image_size, resize, channels, zca), a
    :class:`RealData` or a genforge torch Dataset. ``teacher`` (DWA only) is a module or a
    weight file; without one a ConvNetBN teacher is trained first.

    ``output_dir`` keeps the run's state (and a trained teacher): ``resume=True`` continues a
    killed run, ``"auto"`` continues one if its state is there; without either, an
    ``output_dir`` holding an earlier run's state is refused unless ``overwrite=True``
    (:func:`genforge.distill.state.prepare_output_dir`).
    """
    opts = engine_options(method, options)
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is not in [0, {count})")
    real = _as_real(dataset, dataset_kwargs or {})
    check_run(method, real, ipc, flip=flip, teacher=teacher)
    resume = prepare_output_dir(output_dir, resume, overwrite)
    output_dir = Path(output_dir) if output_dir is not None else None
    classes = list(range(real.num_classes))[index::count]
    soft = None
    if method == "random":
        images, labels = initial_images(real, classes, ipc, "real", seed)
    elif method == "dwa":
        net = resolve_teacher(teacher, real, opts, seed, output_dir, progress)
        images, labels, soft = distill_dwa(real, net, opts, ipc=ipc, seed=seed, flip=flip,
                                           ipc_ids=list(range(ipc))[index::count], output_dir=output_dir,
                                           resume=resume, progress=progress)
    else:
        objective = dm_objective if method == "dm" else partial(datadam_objective, power=opts.power,
                                                                 task_balance=opts.task_balance)
        images, labels = distill_by_matching(real, objective, opts, ipc=ipc, seed=seed, flip=flip, classes=classes,
                                             output_dir=output_dir, resume=resume, progress=progress,
                                             desc=f"{method}{'+FYI' if flip else ''} ipc={ipc}",
                                             run_tag={"method": method})
    return SyntheticSet(images=images, labels=labels, method=method, ipc=ipc, seed=seed,
                       normalisation=real.normalisation, soft_labels=soft, zca=real.zca,
                       extra={"flip": flip, "options": asdict(opts), "shard": [index, count]})
