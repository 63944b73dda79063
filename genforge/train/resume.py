"""What a resumed run may change, and the record of what it changed.

A run directory's `recipe.yaml` must keep describing the run. So `--resume` compares the
recipe it is given with the one the run recorded, key by key (dotted, the free-form `model:`
section included), before any work. A key the recorded recipe lacks, because it was written before
that setting existed, counts at its default (the recorded recipe is read as a recipe first):
- a change to a key that alters the run's result (data, model, optimisation, seed, sampling,
  evaluation) is refused, naming every such key with its old and new value;
- a change to one of `HARMLESS` (how long to train, how often to log and checkpoint, how many
  loader workers) is allowed, and appended to `resumes.jsonl` in the run directory before
  `recipe.yaml` is rewritten with the new values.
"""

from __future__ import annotations

import json
from pathlib import Path

from genforge.config import ConfigError, Recipe, read_yaml, recipe_from_dict, recipe_to_dict, setting_differences

__all__ = ["HARMLESS", "check_resume_settings", "record_resume"]

HARMLESS = ("output_dir", "train.max_steps", "train.max_minutes", "train.log_every",
            "train.checkpoint_every", "train.keep_checkpoints", "data.num_workers")
"""Keys a resumed run may change: none of them changes a weight or a metric of the steps run."""


def _flatten(mapping: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def check_resume_settings(run_dir, recipe: Recipe) -> dict[str, list]:
    """`{key: [recorded, new]}` of the harmless changes; ConfigError for any other change.

    A run directory without `recipe.yaml` (none is written before training starts) has
    nothing to compare, and gives `{}`.
    """
    saved_file = Path(run_dir) / "recipe.yaml"
    if not saved_file.is_file():
        return {}
    saved = read_yaml(saved_file)
    if not isinstance(saved, dict):
        raise ConfigError(f"{saved_file}: not a recipe mapping; cannot check the resumed settings")
    try:
        saved = recipe_to_dict(recipe_from_dict(saved, str(saved_file)))
    except ConfigError:
        pass  # a recipe this version no longer reads is compared as it was written
    old, new = _flatten(saved), _flatten(recipe_to_dict(recipe))
    changed = {k: [old.get(k), new.get(k)] for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k)}
    refused = {k: v for k, v in changed.items() if k not in HARMLESS}
    if refused:
        listing = setting_differences(old, new, list(refused))
        raise ConfigError(
            f"resuming {run_dir} with settings that change the run's result ({listing}); the run "
            f"recorded them in {saved_file}. Resume with the recorded settings, or start a new "
            f"output_dir. Keys a resume may change: {', '.join(HARMLESS)}")
    return {k: v for k, v in changed.items() if k != "output_dir"}


def record_resume(run_dir, step: int, changed: dict) -> None:
    """Append `{"resumed_at_step", "changed"}` to `resumes.jsonl` when settings changed."""
    if changed:
        with open(Path(run_dir) / "resumes.jsonl", "a") as f:
            f.write(json.dumps({"resumed_at_step": step, "changed": changed}) + "\n")
