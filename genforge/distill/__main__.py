"""Command line: ``python -m genforge.distill RECIPE [--resume] [--output-dir D] [--set KEY=VALUE]``.

The same as ``genforge distill``; under ``accelerate launch -m genforge.distill RECIPE`` the
processes split the work. Recipe problems exit with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import sys

from genforge.config import ConfigError
from genforge.train.__main__ import _parse_set


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genforge distill", description="Distil a dataset from a recipe, "
                                     "save the synthetic set and its grid, and evaluate it.")
    parser.add_argument("recipe", help="YAML distillation recipe (recipes/distill/*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue a killed run from its saved state")
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument("--set", type=_parse_set, action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set distill.ipc=1 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from genforge.distill.recipe import load_distill_recipe, run_distill_recipe

    overrides = dict(args.set)
    if args.output_dir is not None:
        overrides["output_dir"] = args.output_dir
    try:
        recipe = load_distill_recipe(args.recipe, overrides)
        metrics = run_distill_recipe(recipe, resume=args.resume, progress=not args.no_progress)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if metrics:
        print(f"{metrics['method']}{' + FYI' if metrics['flip'] else ''} ipc={metrics['ipc']}: test accuracy "
              f"{100 * metrics['accuracy_mean']:.2f} ± {100 * metrics['accuracy_std']:.2f}% over "
              f"{len(metrics['accuracies'])} networks (distilled in {metrics['distill_seconds']:.0f} s); "
              f"outputs in {recipe.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
