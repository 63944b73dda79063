"""Command line: `python -m genforge.train RECIPE [--resume | --auto-resume | --resume-from CKPT]
[--max-steps N] [--output-dir D]`.

Works unchanged under `accelerate launch -m genforge.train ...`. Built-in methods register
themselves when the registry first looks a name up (it imports `genforge.methods` and
`genforge.kd`).
`--set KEY=VALUE` overrides any recipe key (dotted, value parsed as YAML), e.g.
`--set train.lr=1e-4`. Configuration and checkpoint problems exit with status 2 and a
one-line message instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys

from accelerate import PartialState

from genforge.config import ConfigError, add_override_arguments, load_recipe, overrides_from_args
from genforge.train.checkpoint import CheckpointError
from genforge.train.loop import train


def main(argv: list[str] | None = None, prog: str = "python -m genforge.train") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Train a recipe with the genforge loop.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("recipe", help="YAML recipe file")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="continue from the newest intact checkpoint (a damaged newer one is "
                             "skipped with a warning; error if there is none)")
    resume.add_argument("--auto-resume", action="store_true",
                        help="continue from the newest intact checkpoint if there is one")
    resume.add_argument("--resume-from", metavar="CKPT",
                        help="continue from this checkpoint directory (<output_dir>/checkpoints/step_N)")
    parser.add_argument("--max-steps", type=int, help="override train.max_steps")
    add_override_arguments(parser, "train.lr=1e-4")
    args = parser.parse_args(argv)

    overrides = overrides_from_args(args)
    if args.max_steps is not None:
        overrides["train.max_steps"] = args.max_steps
    try:
        recipe = load_recipe(args.recipe, overrides)
        result = train(recipe, resume="auto" if args.auto_resume else args.resume,
                       resume_from=args.resume_from)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if PartialState().is_main_process:
        print(f"done: {result.steps} steps, final loss {result.final_loss}, "
              f"output in {result.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
