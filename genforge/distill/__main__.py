"""Command line: ``python -m genforge.distill RECIPE [--resume | --auto-resume | --overwrite]
[--output-dir D] [--set KEY=VALUE]``.

The same as ``genforge distill``; under ``accelerate launch -m genforge.distill RECIPE`` the
processes split the work. A rerun over an earlier run's saved state needs ``--resume`` (or
``--auto-resume``) or ``--overwrite``. Recipe problems, damaged files and refused reruns exit
with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import sys

from genforge.config import ConfigError, add_override_arguments, overrides_from_args
from genforge.core.errors import report_error


def main(argv: list[str] | None = None, prog: str = "python -m genforge.distill") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Distil a dataset from a recipe, "
                                     "save the synthetic set and its grid, and evaluate it.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("recipe", help="YAML distillation recipe (recipes/distill/*.yaml)")
    rerun = parser.add_mutually_exclusive_group()
    rerun.add_argument("--resume", action="store_true", help="continue a killed run from its saved state "
                       "(error if there is none)")
    rerun.add_argument("--auto-resume", action="store_true", help="continue from the saved state if there is one")
    rerun.add_argument("--overwrite", action="store_true", help="start again, deleting an earlier run's saved "
                       "state and outputs in output_dir")
    add_override_arguments(parser, "distill.ipc=1")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from genforge.distill.recipe import load_distill_recipe, run_distill_recipe

    try:
        recipe = load_distill_recipe(args.recipe, overrides_from_args(args))
        metrics = run_distill_recipe(recipe, resume="auto" if args.auto_resume else args.resume,
                                     overwrite=args.overwrite, progress=not args.no_progress)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        return report_error(err)
    if metrics:
        print(f"{metrics['method']}{' + FYI' if metrics['flip'] else ''} ipc={metrics['ipc']}: test accuracy "
              f"{100 * metrics['accuracy_mean']:.2f} ± {100 * metrics['accuracy_std']:.2f}% over "
              f"{len(metrics['accuracies'])} networks (distilled in {metrics['distill_seconds']:.0f} s); "
              f"outputs in {recipe.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
