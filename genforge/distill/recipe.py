"""Distillation recipes: ``genforge distill RECIPE`` distils, saves, draws and evaluates.

A recipe (``recipes/distill/*.yaml``) names the method, the seed, the output directory and
three sections: ``data`` (which real dataset), ``distill`` (ipc, the FYI flip, a DWA
teacher file and the engine's ``options``) and ``eval`` (the train-on-synthetic protocol,
:class:`~genforge.distill.evaluate.EvalOptions`). Every key is checked when the recipe
loads, the engine options against the engine's own dataclass.

Under ``accelerate launch`` each process distils a share (classes for DM/DataDAM, batches
for DWA), writes it to ``parts/``, and the main process merges, saves and evaluates. The
run writes ``synthetic_set.safetensors``, ``synthetic_grid.png`` (one row per class),
``metrics.json`` and the resolved ``recipe.yaml``. ``--resume`` continues a killed run
(``--auto-resume``: when there is one); a rerun without it over a directory holding an
earlier run's state is refused before any work, unless ``--overwrite`` says to start again
(:func:`genforge.distill.state.prepare_output_dir`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from genforge.config import ConfigError, dataclass_from_mapping, read_yaml
from genforge.core.io import write_json
from genforge.data import check_dataset, dataset_names
from genforge.distill.api import ENGINE_OPTIONS, check_run, distill_dataset, resolve_teacher
from genforge.distill.data import load_real
from genforge.distill.evaluate import EvalOptions, evaluate_synthetic
from genforge.distill.state import prepare_output_dir
from genforge.distill.synthetic import SyntheticSet

__all__ = ["DistillRecipe", "load_distill_recipe", "run_distill_recipe"]


@dataclass
class DistillData:
    name: str = "digits"
    root: str | None = None
    test_root: str | None = None
    image_size: int | None = None
    resize: str = "pad"
    channels: int | None = None
    zca: bool = False


@dataclass
class DistillSection:
    ipc: int = field(default=10, metadata={"min": 1})
    flip: bool = False
    teacher: str | None = None
    options: dict = field(default_factory=dict)


@dataclass
class DistillRecipe:
    method: str
    seed: int = 0
    output_dir: str = "runs/distill"
    data: DistillData = field(default_factory=DistillData)
    distill: DistillSection = field(default_factory=DistillSection)
    eval: EvalOptions = field(default_factory=EvalOptions)

    def engine_options(self):
        return dataclass_from_mapping(ENGINE_OPTIONS[self.method], self.distill.options, "recipe",
                                      section="distill.options")


def recipe_from_mapping(raw, source: str = "<dict>", overrides: dict | None = None) -> DistillRecipe:
    """Validate a distillation recipe mapping (every section, the engine options, the dataset)."""
    recipe = dataclass_from_mapping(DistillRecipe, raw, source, overrides=overrides)
    if recipe.method not in ENGINE_OPTIONS:
        raise ConfigError(f"{source}: unknown method {recipe.method!r}; known: {sorted(ENGINE_OPTIONS)}")
    if recipe.data.name not in dataset_names():
        raise ConfigError(f"{source}: unknown dataset 'data.name': {recipe.data.name!r}; known: {dataset_names()}")
    if recipe.method == "dwa" and recipe.data.zca:
        raise ConfigError(f"{source}: data.zca: DWA clips pixels to the [0, 1] box in normalised space and cannot "
                          "run on ZCA-whitened data; set data.zca: false")
    try:
        dataclass_from_mapping(ENGINE_OPTIONS[recipe.method], recipe.distill.options, source,
                               section="distill.options").check()
        recipe.eval.check()
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None
    if recipe.eval.soft == "teacher" and recipe.method != "dwa":
        raise ConfigError(f"{source}: eval.soft='teacher' relabels with DWA's teacher; method is {recipe.method!r}")
    if recipe.distill.flip and recipe.method == "random":
        raise ConfigError(f"{source}: distill.flip (FYI) has no effect on the random-subset baseline")
    return recipe


def load_distill_recipe(path, overrides: dict | None = None) -> DistillRecipe:
    return recipe_from_mapping(read_yaml(path), source=str(path), overrides=overrides)


def run_distill_recipe(recipe: DistillRecipe, *, resume: bool | str = False, overwrite: bool = False,
                       progress: bool = True) -> dict:
    """Distil, save, draw and evaluate; returns the metrics written to ``metrics.json``.

    ``resume``: True, False or ``"auto"``; ``overwrite`` starts again over an earlier run's
    state (see :func:`genforge.distill.state.prepare_output_dir`).
    """
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True lets several CPU processes split a run
    out = Path(recipe.output_dir)
    for key in ("root", "test_root"):  # the files a recipe names exist where it runs, not where it loads
        try:
            check_dataset(recipe.data.name, root=getattr(recipe.data, key), resize=recipe.data.resize)
        except ValueError as err:
            raise ConfigError(f"distill recipe: data.{key}: {err}") from None
    if state.is_main_process or not overwrite:  # every process checks; only the main one deletes
        prepare_output_dir(out, resume, overwrite)
    state.wait_for_everyone()
    data = dataclasses.asdict(recipe.data)
    test_root, zca = data.pop("test_root"), data.pop("zca")
    name = data.pop("name")
    real, test = load_real(name, test_root=test_root, zca=zca, **data)
    check_run(recipe.method, real, recipe.distill.ipc, flip=recipe.distill.flip)
    options = recipe.engine_options()
    show = progress and state.is_main_process
    teacher = None
    if recipe.method == "dwa":
        # the main process trains (and caches) or loads the teacher first; the others then load it
        if state.is_main_process:
            teacher = resolve_teacher(recipe.distill.teacher, real, options, recipe.seed, out, show)
        state.wait_for_everyone()
        if not state.is_main_process:
            teacher = resolve_teacher(recipe.distill.teacher, real, options, recipe.seed, out, False)

    start = time.perf_counter()
    shard_dir = out if state.num_processes == 1 else out / f"shard_{state.process_index}"
    syn = distill_dataset(recipe.method, real, recipe.distill.ipc, seed=recipe.seed, flip=recipe.distill.flip,
                          teacher=teacher, shard=(state.process_index, state.num_processes), output_dir=shard_dir,
                          resume="auto", progress=show, **dataclasses.asdict(options))  # out was checked above
    if state.num_processes > 1:
        syn.save(out / "parts" / f"part_{state.process_index}.safetensors")
        state.wait_for_everyone()
        if not state.is_main_process:
            return {}
        syn = SyntheticSet.merge([SyntheticSet.load(out / "parts" / f"part_{i}.safetensors")
                                  for i in range(state.num_processes)])
    distill_seconds = time.perf_counter() - start
    syn.save(out / "synthetic_set.safetensors")
    syn.save_grid(out / "synthetic_grid.png")
    (out / "recipe.yaml").write_text(yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False))

    start = time.perf_counter()
    eval_teacher = teacher if recipe.eval.soft == "teacher" else None
    result = evaluate_synthetic(syn, test, recipe.eval, seed=recipe.seed, teacher=eval_teacher, progress=show)
    metrics = {"method": recipe.method, "flip": recipe.distill.flip, "ipc": recipe.distill.ipc, "seed": recipe.seed,
               "accuracy_mean": result.mean, "accuracy_std": result.std, "accuracies": result.accuracies,
               "distill_seconds": distill_seconds, "eval_seconds": time.perf_counter() - start}
    write_json(out / "metrics.json", metrics, indent=2)
    return metrics
