"""Reinforce recipes: ``genforge reinforce RECIPE`` builds a reinforced dataset once.

Dataset reinforcement (Faghri et al., ICCV 2023, arXiv 2303.08983, Sec. 3; ``apple/ml-dr``
``reinforce.py``) runs a frozen teacher ensemble over NS stored augmentations of every
training image and keeps the top-k of its mean softmax (:mod:`genforge.kd.reinforce.shards`). A
recipe (``recipes/kd/reinforce_*.yaml``) names:

- ``data``: the dataset (:class:`genforge.config.DataConfig`); its train split is reinforced,
  ``batch_size`` is how many augmented images the teachers see at once;
- ``teachers``: classifier run directories or ``{name, file, kwargs}`` mappings
  (:func:`genforge.kd.teachers.load_classifier`), averaged at ``temperature``;
- ``num_samples`` (NS), ``top_k`` (k), ``shard_size``, ``seed``, ``device``;
- ``transforms``: ``[[name, {kwargs}], ...]`` (or ``{name: {kwargs}}``) from the registry of
  :mod:`genforge.kd.reinforce.augment`, applied in the registry's fixed order.

Every key, transform and option is checked when the recipe loads; the teachers' class count
is checked against the dataset before any image is augmented. Every shard and the manifest
record the run's provenance: the dataset, NS, k, the seed, the shard size, the transforms, the
temperature and each teacher (timm name, kwargs and the sha256 of its weight file). A killed
run resumes: rerunning the recipe skips the finished shards; a directory whose manifest or
any finished shard records another value is refused before a teacher is loaded, naming
every differing key. The run writes the shards, ``manifest.json``, ``reinforce_recipe.yaml`` and
``reinforced_grid.png`` (one row per image: the original, then its NS replayed
augmentations). Any student recipe of the ``reinforced`` method then trains from the
directory with no teacher in memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from genforge.config import (ConfigError, DataConfig, add_override_arguments, dataclass_from_mapping, overrides_from_args,
                             read_yaml)
from genforge.core.errors import report_error
from genforge.data import build_dataset
from genforge.data.grid import save_class_grid
from genforge.kd.ensemble import TeacherEnsemble
from genforge.kd.reinforce.augment import ORDER, REGISTRY, RandomResizedCrop, ReinforcePipeline
from genforge.kd.reinforce.dataset import ReinforcedDataset
from genforge.kd.reinforce.shards import (check_reinforced_dir, dataset_tag, finished_shards, reinforce,
                                          reinforce_manifest)
from genforge.kd.teachers import TeacherError, load_classifier, teacher_record

__all__ = [
    "ReinforceRecipe",
    "build_split",
    "load_reinforce_recipe",
    "main",
    "reinforce_recipe_from_mapping",
    "run_reinforce_recipe",
]

GRID_ROWS = 8


@dataclass
class ReinforceRecipe:
    """A whole reinforce recipe; ``transforms`` is normalised to ``[[name, kwargs], ...]``."""

    seed: int = 0
    output_dir: str = "runs/kd_reinforce"
    data: DataConfig = field(default_factory=DataConfig)
    teachers: list[Any] = field(default_factory=list)
    temperature: float = 1.0
    num_samples: int = field(default=8, metadata={"min": 1})
    top_k: int = field(default=5, metadata={"min": 1})
    shard_size: int = field(default=256, metadata={"min": 1})
    transforms: Any = None
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def pipeline(self) -> ReinforcePipeline:
        return ReinforcePipeline([REGISTRY[name](**kwargs) for name, kwargs in self.transforms])


def build_split(data: DataConfig, split: str = "train") -> torch.utils.data.Dataset:
    """The recipe's dataset split, built as every reinforce and student recipe builds it."""
    return build_dataset(data.name, split=split, root=data.root, image_size=data.image_size,
                         resize=data.resize, channels=data.channels)


def _transform_list(raw, source: str) -> list[list]:
    """``[[name, kwargs], ...]`` from a list of pairs / names or a mapping name -> kwargs."""
    if raw is None:
        raise ConfigError(f"{source}: 'transforms' is required: a list of [name, {{kwargs}}] "
                          f"from {list(ORDER)}")
    items = list(raw.items()) if isinstance(raw, Mapping) else raw
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{source}: 'transforms' must be a non-empty list of [name, {{kwargs}}] or a "
                          f"mapping name -> kwargs, got {raw!r}")
    pairs = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = [item]
        if not isinstance(item, (list, tuple)) or len(item) not in (1, 2):
            raise ConfigError(f"{source}: 'transforms[{i}]' must be a name or [name, {{kwargs}}], got {item!r}")
        name, kwargs = item[0], item[1] if len(item) == 2 else None
        if not isinstance(name, str):
            raise ConfigError(f"{source}: 'transforms[{i}]' must be a name or [name, {{kwargs}}], got {item!r}")
        if name not in REGISTRY:
            close = difflib.get_close_matches(name, ORDER, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: 'transforms[{i}]': unknown transform {name!r}; "
                              f"known: {', '.join(ORDER)}{hint}")
        kwargs = {} if kwargs is None else kwargs
        if not isinstance(kwargs, Mapping):
            raise ConfigError(f"{source}: 'transforms[{i}]' ({name}): options must be a mapping, got {kwargs!r}")
        try:
            REGISTRY[name](**kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{source}: 'transforms[{i}]' ({name}): {err}") from None
        pairs.append([name, dict(kwargs)])
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: 'transforms': each transform may appear once, got {names}")
    return pairs


def reinforce_recipe_from_mapping(raw, source: str = "<dict>", overrides: dict | None = None) -> ReinforceRecipe:
    """Validate a reinforce recipe mapping (keys, types, transforms and their options)."""
    recipe = dataclass_from_mapping(ReinforceRecipe, raw, source, overrides=overrides)
    recipe.transforms = _transform_list(recipe.transforms, source)
    if not recipe.teachers:
        raise ConfigError(f"{source}: 'teachers' must list at least one teacher (a classifier run "
                          "directory or a mapping {name, file, kwargs})")
    for i, teacher in enumerate(recipe.teachers):
        if not isinstance(teacher, (str, Mapping)):
            raise ConfigError(f"{source}: 'teachers[{i}]' must be a run directory or a mapping "
                              f"{{name, file, kwargs}}, got {teacher!r}")
    if not recipe.temperature > 0:
        raise ConfigError(f"{source}: 'temperature' must be positive, got {recipe.temperature}")
    for transform in recipe.pipeline().transforms:
        if isinstance(transform, RandomResizedCrop) and transform.size != (recipe.data.image_size,) * 2:
            raise ConfigError(f"{source}: random_resized_crop size {list(transform.size)} must equal "
                              f"data.image_size {recipe.data.image_size}: the student also sees "
                              "un-augmented images (probability 1 - p_replay) in the same batches")
    return recipe


def load_reinforce_recipe(path, overrides: dict | None = None) -> ReinforceRecipe:
    return reinforce_recipe_from_mapping(read_yaml(path), source=str(path), overrides=overrides)


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("reinforce recipe: device 'cuda' asked for, but CUDA is not available")
    return name


def _save_grid(dataset, out: Path, tag: str, num_samples: int) -> Path:
    """Rows of (original, NS replayed augmentations) for the first images."""
    replayed = ReinforcedDataset(dataset, out, dataset_name=tag)
    images = []
    for idx in range(min(GRID_ROWS, len(dataset))):
        images.append(dataset[idx][0])
        images += [replayed.replay(idx, j)[0] for j in range(num_samples)]
    path = out / "reinforced_grid.png"
    save_class_grid(torch.stack(images), num_samples + 1, path)
    return path


def run_reinforce_recipe(recipe: ReinforceRecipe, progress: bool = True, max_shards: int | None = None) -> dict:
    """Reinforce the recipe's train split (resuming a killed run); returns a summary.

    ``max_shards`` stops after that many new shards (run again to continue).
    """
    device = _device(recipe.device)
    try:
        dataset = build_split(recipe.data)
    except ValueError as err:
        raise ConfigError(f"reinforce recipe: data: {err}") from None
    if recipe.top_k > dataset.num_classes:
        raise ConfigError(f"reinforce recipe: top_k={recipe.top_k} exceeds the {dataset.num_classes} classes "
                          f"of dataset {recipe.data.name!r}")
    out = Path(recipe.output_dir)
    tag = dataset_tag(recipe.data, "train", dataset)
    provenance = {"teachers": [teacher_record(source) for source in recipe.teachers],
                  "temperature": recipe.temperature}
    # a directory of another run is refused before any teacher is loaded
    before = set(check_reinforced_dir(out, reinforce_manifest(
        tag, len(dataset), dataset.num_classes, recipe.num_samples, recipe.top_k, recipe.seed, recipe.shard_size,
        recipe.pipeline(), provenance)))
    teachers = [load_classifier(source, num_classes=dataset.num_classes, in_chans=dataset.channels)
                for source in recipe.teachers]
    ensemble = TeacherEnsemble(teachers, temperature=recipe.temperature).to(device)
    start = time.perf_counter()
    reinforce(dataset, ensemble, out, recipe.pipeline(), num_samples=recipe.num_samples, top_k=recipe.top_k,
              seed=recipe.seed, shard_size=recipe.shard_size, dataset_name=tag, device=device,
              max_shards=max_shards, progress=progress, batch_size=recipe.data.batch_size, provenance=provenance)
    seconds = time.perf_counter() - start
    (out / "reinforce_recipe.yaml").write_text(yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False))
    total = -(-len(dataset) // recipe.shard_size)
    done = set(finished_shards(out))
    summary = {"output_dir": str(out), "dataset_name": tag, "shards": total, "shards_done": len(done),
               "shards_written": len(done - before), "complete": len(done) == total, "seconds": seconds}
    if summary["complete"]:
        summary["grid"] = str(_save_grid(dataset, out, tag, recipe.num_samples))
    summary["bytes"] = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return summary


def main(argv: list[str] | None = None, prog: str = "python -m genforge.kd.reinforce") -> int:
    """``genforge reinforce RECIPE [--set KEY=VALUE] [--output-dir D] [--max-shards N] [--no-progress]``."""
    parser = argparse.ArgumentParser(prog=prog, description="Build a reinforced dataset: stored "
                                     "augmentations and the teachers' top-k probabilities, resumable.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("recipe", help="YAML reinforce recipe (recipes/kd/reinforce_*.yaml)")
    add_override_arguments(parser, "num_samples=4")
    parser.add_argument("--max-shards", type=int, help="stop after N new shards (run again to continue)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        recipe = load_reinforce_recipe(args.recipe, overrides_from_args(args))
        summary = run_reinforce_recipe(recipe, progress=not args.no_progress, max_shards=args.max_shards)
    except (ConfigError, FileNotFoundError, TeacherError, ValueError) as err:
        return report_error(err)
    state = "complete" if summary["complete"] else "incomplete (run again to continue)"
    print(f"{summary['dataset_name']}: {summary['shards_done']}/{summary['shards']} shards {state}, "
          f"{summary['shards_written']} written in {summary['seconds']:.1f} s, "
          f"{summary['bytes'] / 2**20:.1f} MiB in {summary['output_dir']}")
    return 0
