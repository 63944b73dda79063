"""The ``genforge`` command: ``train``, ``distill``, ``reinforce``, ``reno``, ``cache-latents``,
``sample`` and ``eval``.

- ``genforge train RECIPE [--resume]`` runs a recipe with the one Accelerate loop (the same
  as ``accelerate launch -m genforge.train RECIPE``);
- ``genforge distill RECIPE [--resume | --auto-resume | --overwrite]`` distils a dataset into a
  synthetic set, draws it and evaluates it with the field's protocol (the same as
  ``python -m genforge.distill``); a rerun over a run's saved state needs one of the three;
- ``genforge reinforce RECIPE [--max-shards N]`` builds a reinforced dataset (stored
  augmentations + the teachers' top-k probabilities, in shards a killed run resumes) that
  ``reinforced`` student recipes train from (the same as ``python -m genforge.kd.reinforce``);
- ``genforge reno RECIPE --prompts FILE`` optimises the initial noise of a pipeline for each
  prompt (class label for a class-conditional pipeline) with reward models, ReNO (the same as
  ``python -m genforge.pipelines.reno_recipe``), writing the images, per-prompt rewards and an
  initial-vs-optimised PNG;
- ``genforge cache-latents --vae DIR --images FOLDER --out DIR`` encodes an image folder once with
  a local diffusers AutoencoderKL into resumable latent shards (the ``latents`` dataset reads
  them; the same as ``python -m genforge.data.latents``);
- ``genforge sample PIPELINE_DIR`` loads a saved pipeline of whichever genforge class its
  model_index.json names (a training run writes one to ``<output_dir>/pipeline``: a
  DiMRPipeline for DiMR, a ClassConditionalPipeline for the DiT and UNet baselines) and writes
  a per-class PNG grid and, optionally, an .npz;
- ``genforge eval --fake SAMPLES [--real SOURCE]`` scores samples with FID (torch-fidelity,
  with its progress bars) and, when they carry labels, classifier agreement on the digits.

Every subcommand has its own ``--help`` (``genforge train --help``), which shows each
option's default.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import torch


def _sample(args: argparse.Namespace) -> int:
    from genforge.data.transforms import signed_to_uint8
    from genforge.data.grid import save_class_grid
    from genforge.core.embed import null_class_of
    from genforge.methods.sampling import generate, sampling_scheduler
    from genforge.pipelines import load_saved_pipeline

    pipe = load_saved_pipeline(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    num_classes = null_class_of(pipe.model)
    classes = args.classes if args.classes else list(range(num_classes))
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        print(f"error: classes {bad} outside [0, {num_classes})", file=sys.stderr)
        return 2
    if args.scheduler:
        pipe.scheduler = sampling_scheduler(args.scheduler, pipe.scheduler.config)
    labels = torch.tensor(classes).repeat_interleave(args.per_class)
    images = generate(pipe, labels, steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
                      batch_size=args.batch_size)
    save_class_grid(images, args.per_class, Path(args.out))
    print(f"wrote {args.out} ({len(classes)} rows x {args.per_class})")
    if args.npz:
        np.savez_compressed(args.npz, images=signed_to_uint8(images).numpy(), labels=labels.numpy())
        print(f"wrote {args.npz}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from genforge.metrics import JUDGES, classifier_agreement, compute_fidelity, load_real_and_fake

    real, fake, labels = load_real_and_fake(args.real, args.fake)
    results = compute_fidelity(real, fake, feature_extractor=args.extractor, kid=args.kid,
                               inception_weights=args.inception_weights, batch_size=args.batch_size,
                               progress=not args.no_progress)
    judge = {extractor: load for extractor, load in JUDGES.values()}.get(args.extractor)
    if labels is not None and judge is not None:
        results["classifier_agreement"] = float(classifier_agreement(fake, labels, judge()))
    for key, value in results.items():
        print(f"{key:>22}: {value:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


FORWARDED = {
    "train": ("genforge.train.__main__", "train a recipe with the one Accelerate loop"),
    "distill": ("genforge.distill.__main__", "distil a dataset from a recipe"),
    "reinforce": ("genforge.kd.reinforce.recipe", "build a reinforced dataset from a recipe"),
    "reno": ("genforge.pipelines.reno_recipe", "optimise each prompt's initial noise with reward models (ReNO)"),
    "cache-latents": ("genforge.data.latents", "encode an image folder into latent shards with a local VAE"),
}
"""Subcommands whose parser lives with their command (``python -m MODULE`` runs the same):
``genforge NAME ...`` calls that module's ``main(argv, prog="genforge NAME")``."""


def build_parser() -> argparse.ArgumentParser:
    from genforge.methods.sampling import SAMPLERS

    defaults = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="genforge", description=__doc__.split("\n\n")[0], formatter_class=defaults)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in FORWARDED.items():
        commands.add_parser(name, help=f"{help_text} (genforge {name} --help)", add_help=False)

    sample = commands.add_parser("sample", help="sample a saved class-conditional pipeline into a grid",
                                 description="Sample a saved genforge pipeline (the class its model_index.json "
                                             "names) into a per-class PNG grid.", formatter_class=defaults)
    sample.add_argument("pipeline", help="directory written by save_pretrained (e.g. runs/dimr_digits/pipeline)")
    sample.add_argument("--classes", type=int, nargs="*", help="class rows; every class when none is given")
    sample.add_argument("--per-class", type=_positive_int, default=10, help="samples per class (grid columns)")
    sample.add_argument("--steps", type=_positive_int, default=25, help="sampler steps")
    sample.add_argument("--guidance-scale", type=float, default=2.0, help="classifier-free guidance scale: w in eps_u + w (eps_c - eps_u) "
                        "for diffusion and flow pipelines (1 = off); w in l_c + w (l_c - l_u) on the logits of "
                        "ENAT / MaskGIT / aMUSEd token pipelines (0 = off)")
    sample.add_argument("--scheduler", choices=SAMPLERS, help="override the saved sampler; the saved one when not given")
    sample.add_argument("--seed", type=int, default=0, help="seed of the starting noise")
    sample.add_argument("--batch-size", type=_positive_int, default=500, help="images per pipeline call")
    sample.add_argument("--out", default="samples_grid.png", help="PNG grid to write")
    sample.add_argument("--npz", help="also save images and labels to this .npz")

    evaluate = commands.add_parser("eval", help="FID (torch-fidelity) and classifier agreement of samples",
                                   description="FID (torch-fidelity) and classifier agreement of samples.",
                                   formatter_class=defaults)
    evaluate.add_argument("--fake", required=True, help="samples: .npz with images[, labels] or a folder")
    evaluate.add_argument("--real", default="digits:train", help="reference: digits:SPLIT[:SIZE[:pad|resize]], mnist5k:SPLIT[:SIZE[:pad|resize]], .npz or folder")
    evaluate.add_argument("--extractor", default="digits-cnn", choices=["digits-cnn", "mnist-cnn", "inception-v3-compat"],
                          help="feature extractor (and, for a judge, classifier agreement)")
    evaluate.add_argument("--inception-weights", help="local Inception weights file (no download is done)")
    evaluate.add_argument("--kid", action="store_true", help="also compute KID")
    evaluate.add_argument("--batch-size", type=_positive_int, default=256, help="feature-extraction batch size")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    evaluate.add_argument("--json", help="write the results to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in FORWARDED:
        module = importlib.import_module(FORWARDED[argv[0]][0])
        return module.main(argv[1:], prog=f"genforge {argv[0]}")
    args = build_parser().parse_args(argv)
    return run_script(_sample if args.command == "sample" else _eval, args)


def run_script(main, argv) -> int:
    """``main(argv)``'s exit status, with bad input (a missing or unreadable file, a bad value)
    reported in one line on stderr and status 2 instead of a traceback."""
    try:
        status = main(argv)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
