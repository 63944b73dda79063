"""``genforge reno RECIPE --prompts FILE``: ReNO (arXiv 2406.04312) over a prompt file.

A recipe (``recipes/reno/*.yaml``) names a saved pipeline directory (a genforge pipeline, or
any diffusers pipeline ReNO supports, loaded with ``local_files_only``), the rewards and their
weights, and the options of :func:`genforge.pipelines.reno.optimize`. For a class-conditional
pipeline each line of the prompt file is a class label. When the pipeline directory is missing
and the recipe names a ``train_recipe``, that training recipe is run first (its output is the
pipeline). The run writes, under ``output_dir``: ``images/NNNN.png`` (the optimised image of
prompt N), ``rewards.json`` (per prompt: the initial and best reward losses, the best
iteration, seconds) and ``side_by_side.png`` (one row per prompt: initial | optimised).
``unconditional: true`` (class-conditional pipelines) renders every latent with the pipeline's
null class and leaves the wanted class to the rewards (``reward_prompt`` of
:func:`~genforge.pipelines.reno.optimize`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torchvision.utils import save_image
from tqdm.auto import tqdm

from genforge.config import ConfigError, add_override_arguments, dataclass_from_mapping, overrides_from_args, read_yaml
from genforge.core.errors import report_error
from genforge.core.io import write_json

__all__ = ["RenoRecipe", "load_reno_recipe", "read_prompts", "run_reno_recipe"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class RenoOptions:
    """Keyword arguments of :func:`genforge.pipelines.reno.optimize` (official defaults)."""

    n_iters: int = field(default=50, metadata={"min": 1})
    lr: float = 5.0
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    grad_clip: float = 0.1
    reg_weight: float = 0.01
    num_inference_steps: int = field(default=1, metadata={"min": 1})
    guidance_scale: float = 1.0
    gradient_checkpointing: bool = True
    offload_rewards: bool = False


@dataclass
class RenoRecipe:
    pipeline: str
    rewards: dict
    seed: int = 0
    output_dir: str = "runs/reno"
    train_recipe: str | None = None
    weights_dir: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    batch_size: int = field(default=1, metadata={"min": 1})
    unconditional: bool = False
    optimize: RenoOptions = field(default_factory=RenoOptions)


def load_reno_recipe(path, overrides: dict | None = None) -> RenoRecipe:
    """Read and check a ReNO recipe (unknown keys, types, dtype, optimiser, reward names)."""
    from genforge.rewards import REWARDS

    recipe = dataclass_from_mapping(RenoRecipe, read_yaml(path), str(path), overrides=overrides)
    if recipe.dtype not in DTYPES:
        raise ConfigError(f"{path}: dtype must be one of {sorted(DTYPES)}, got {recipe.dtype!r}")
    if recipe.optimize.optimizer not in ("sgd", "adam"):
        raise ConfigError(f"{path}: optimize.optimizer must be 'sgd' or 'adam', got {recipe.optimize.optimizer!r}")
    unknown = sorted(set(recipe.rewards) - set(REWARDS))
    if not recipe.rewards or unknown:
        raise ConfigError(f"{path}: rewards must map registered reward names {sorted(REWARDS)} to weights, "
                          f"got {recipe.rewards!r}")
    return recipe


def load_pipeline(recipe: RenoRecipe):
    """The recipe's pipeline on its device and dtype; trained first by ``train_recipe`` when missing."""
    from diffusers import DiffusionPipeline

    import genforge.models  # noqa: F401 -- a saved DiMR pipeline names genforge.models.dimr, which must be imported
    from genforge.pipelines import PIPELINES, load_saved_pipeline

    directory = Path(recipe.pipeline)
    if not (directory / "model_index.json").is_file():
        if recipe.train_recipe is None or directory.name != "pipeline":
            raise FileNotFoundError(f"pipeline directory {str(directory)!r} has no model_index.json (and the recipe "
                                    f"names no train_recipe to make it as <output_dir>/pipeline)")
        from genforge.train.__main__ import main as train_main

        print(f"{directory} not found: training it with {recipe.train_recipe}")
        if train_main([recipe.train_recipe, "--set", f"output_dir={directory.parent}"]) != 0:
            raise ValueError(f"training {recipe.train_recipe} failed")
    saved = json.loads((directory / "model_index.json").read_text()).get("_class_name")
    if saved in PIPELINES:
        pipe = load_saved_pipeline(directory)
    else:
        pipe = DiffusionPipeline.from_pretrained(directory, local_files_only=True, torch_dtype=DTYPES[recipe.dtype])
    device = ("cuda" if torch.cuda.is_available() else "cpu") if recipe.device == "auto" else recipe.device
    pipe = pipe.to(device)
    return pipe if recipe.dtype == "float32" else pipe.to(dtype=DTYPES[recipe.dtype])


def read_prompts(path, class_conditional: bool) -> list:
    """Non-empty lines of ``path``: prompts, or class labels (ints) for a class-conditional pipeline."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"prompt file {path} has no prompts")
    if class_conditional:
        bad = [line for line in lines if not line.isdigit()]
        if bad:
            raise ValueError(f"{path}: a class-conditional pipeline takes one class label per line, got {bad[:3]}")
        return [int(line) for line in lines]
    return lines


def _upscaled(images: torch.Tensor, min_size: int = 64) -> torch.Tensor:
    factor = max(1, min_size // images.shape[-1])
    return torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images


def run_reno_recipe(recipe: RenoRecipe, prompts_file, progress: bool = True) -> list[dict]:
    """Optimise every prompt of ``prompts_file``; writes the images, ``rewards.json`` and
    ``side_by_side.png`` to ``recipe.output_dir`` and returns the per-prompt records."""
    from genforge.core.embed import null_class_of
    from genforge.pipelines import ClassConditionalPipeline
    from genforge.pipelines.reno import optimize
    from genforge.rewards import load

    weights_dir = Path(recipe.weights_dir) if recipe.weights_dir else None
    models = {name: load(name, weights_dir / name if weights_dir else None) for name, w in recipe.rewards.items() if w}
    pipe = load_pipeline(recipe)
    class_conditional = isinstance(pipe, ClassConditionalPipeline)
    if recipe.unconditional and not class_conditional:
        raise ValueError(f"unconditional: true needs a class-conditional pipeline, {recipe.pipeline} holds a "
                         f"{type(pipe).__name__}")
    prompts = read_prompts(prompts_file, class_conditional)
    out = Path(recipe.output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records, pairs = [], []
    bar = tqdm(total=len(prompts), desc="ReNO prompts", disable=not progress)
    for start in range(0, len(prompts), recipe.batch_size):
        batch = prompts[start:start + recipe.batch_size]
        begin = time.perf_counter()
        condition = [null_class_of(pipe.model)] * len(batch) if recipe.unconditional else batch
        result = optimize(pipe, condition, recipe.rewards, models=models, seed=recipe.seed + start,
                          reward_prompt=batch, **asdict(recipe.optimize))
        seconds = (time.perf_counter() - begin) / len(batch)
        for i, prompt in enumerate(batch):
            index = start + i
            save_image(result.images[i], out / "images" / f"{index:04d}.png")
            pairs += [result.initial_images[i], result.images[i]]
            records.append({"index": index, "prompt": prompt, "seconds": round(seconds, 3),
                            "best_iteration": int(result.best_iteration[i]),
                            "initial": {k: float(v[i]) for k, v in result.initial_rewards.items()},
                            "best": {k: float(v[i]) for k, v in result.best_rewards.items()}})
        bar.update(len(batch))
    bar.close()
    save_image(_upscaled(torch.stack(pairs)), out / "side_by_side.png", nrow=2, padding=2, pad_value=0.5)
    write_json(out / "rewards.json", records, indent=2)
    return records


def main(argv: list[str] | None = None, prog: str = "python -m genforge.pipelines.reno_recipe") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Optimise the initial noise of a pipeline for each "
                                     "prompt of a file with reward models (ReNO).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("recipe", help="YAML ReNO recipe (recipes/reno/*.yaml)")
    parser.add_argument("--prompts", required=True, help="text file: one prompt (or class label) per line")
    add_override_arguments(parser, "optimize.n_iters=10")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        recipe = load_reno_recipe(args.recipe, overrides_from_args(args))
        records = run_reno_recipe(recipe, args.prompts, progress=not args.no_progress)
    except (ConfigError, FileNotFoundError, ImportError, KeyError, ValueError) as err:
        return report_error(err)
    initial = sum(r["initial"]["total"] for r in records) / len(records)
    best = sum(r["best"]["total"] for r in records) / len(records)
    print(f"ReNO on {len(records)} prompts: mean total reward loss {initial:.4f} -> {best:.4f}; "
          f"outputs in {recipe.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
