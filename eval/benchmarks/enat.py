"""ENAT against its MaskGIT baseline and diffusers' aMUSEd on digits tokens: FLOPs, wall time, FID.

The three runs of ``recipes/enat/{digits,maskgit_digits,amused_digits}.yaml`` (same tokenizer run,
ENAT 6 + 2 blocks and MaskGIT 8 blocks at width 128, aMUSEd matched to ENAT's parameter count)
are loaded from their saved pipelines and sampled with the same number of steps and CFG weight:

- FLOPs per image, counted (not estimated) by ``torch.utils.flop_counter.FlopCounterMode`` around
  every network call of a whole decoding (token generation; the shared VQ decoder is left out),
  both CFG branches included; ENAT with and without reuse. Per-step FLOPs go to a PNG curve.
- Wall time per image, the pipelines timed in turn in one process (median of ``--repeats``),
  given as ratios to MaskGIT.
- FID (digits CNN) and classifier agreement of ``--num-samples`` class-balanced samples for each
  sampling seed in ``--seeds`` (the networks are fixed: seeds vary sampling only); ENAT with and
  without reuse, so that what reuse costs in quality is measured beside what it saves.

A run directory without a saved pipeline (a recipe not trained yet) is built from its recipe with
random weights: FLOPs and wall time do not depend on the weights, so it enters those columns and
is left out of FID / agreement.

    python eval/benchmarks/enat.py --seeds 0 1 2 --plot docs/enat_flops_per_step.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from genforge.config import load_recipe
from genforge.methods.sampling import generate, score_samples
from genforge.pipelines import load_saved_pipeline
from genforge.train.registry import get_method

RUNS = {"ENAT": "runs/enat_digits", "MaskGIT": "runs/maskgit_digits", "aMUSEd": "runs/amused_digits"}
RECIPES = {"ENAT": "recipes/enat/digits.yaml", "MaskGIT": "recipes/enat/maskgit_digits.yaml",
           "aMUSEd": "recipes/enat/amused_digits.yaml"}


def load_or_build(name: str, run: Path):
    """(pipeline, recipe, trained): the run's saved pipeline, or its recipe's network with random weights."""
    if (run / "pipeline").is_dir():
        return load_saved_pipeline(run / "pipeline"), load_recipe(run / "recipe.yaml"), True
    recipe = load_recipe(RECIPES[name])
    method = get_method(recipe.method)(recipe)
    torch.manual_seed(0)
    return method.pipeline(method.build_model().eval()), recipe, False


def counted_decoding(pipe, labels, steps: int, guidance: float, options: dict) -> list[float]:
    """FLOPs of every decoding step (summed over the network calls of the step), for the whole batch."""
    per_call, marks = [], []

    def enter(module, args):
        module._flops = FlopCounterMode(display=False)
        module._flops.__enter__()

    def leave(module, args, output):
        module._flops.__exit__(None, None, None)
        per_call.append(module._flops.get_total_flops())

    handles = [pipe.model.register_forward_pre_hook(enter), pipe.model.register_forward_hook(leave)]
    try:
        pipe.generate_tokens(labels, num_inference_steps=steps, guidance_scale=guidance,
                             generator=torch.Generator().manual_seed(0),
                             callback=lambda step, ids, weight: marks.append(len(per_call)), **options)
    finally:
        for handle in handles:
            handle.remove()
    starts = [0, *marks[:-1]]
    return [float(sum(per_call[a:b])) for a, b in zip(starts, marks)]


def variants(names) -> list[tuple[str, str, bool]]:
    """(row label, pipeline name, reuse) of each pipeline in ``names``, plus ENAT without reuse when ENAT is one."""
    return [(name, name, True) for name in names] + [("ENAT, no reuse", "ENAT", False)] * ("ENAT" in names)


def use(pipes: dict, name: str, reuse: bool):
    """The pipeline ``name``, with ENAT's reuse switched as the row asks."""
    if name == "ENAT":
        pipes[name].reuse = reuse
    return pipes[name]


def wall_times(pipes: dict, labels, steps: int, guidance: float, options: dict, repeats: int) -> dict:
    """Median seconds per image of each pipeline, and of ENAT without reuse, timed in turn."""
    runs = variants(list(pipes))
    times = {label: [] for label, _, _ in runs}
    for _ in range(repeats):
        for label, name, reuse in runs:
            pipe = use(pipes, name, reuse)
            start = time.perf_counter()
            pipe.generate_tokens(labels, num_inference_steps=steps, guidance_scale=guidance,
                                 generator=torch.Generator().manual_seed(0), **options[name])
            times[label].append((time.perf_counter() - start) / len(labels))
    pipes["ENAT"].reuse = True
    return {label: statistics.median(values) for label, values in times.items()}


def plot(curves: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, values in curves.items():
        ax.plot(range(1, len(values) + 1), [v / 1e6 for v in values], marker="o", label=name)
    ax.set_xlabel("decoding step")
    ax.set_ylabel("MFLOPs per image (both CFG branches)")
    ax.set_title("FLOPs per step on digits tokens (FlopCounterMode)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in RUNS.items():
        parser.add_argument(f"--{name.lower()}", default=default, help=f"output_dir of the {name} run")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=None, help="CFG weight (default: the ENAT recipe's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plot", type=Path, default=Path("docs/enat_flops_per_step.png"))
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    runs = {name: Path(getattr(args, name.lower())) for name in RUNS}
    loaded = {name: load_or_build(name, run) for name, run in runs.items()}
    pipes = {name: pipe for name, (pipe, _, _) in loaded.items()}
    options = {name: recipe.model.get("sampling", {}) for name, (_, recipe, _) in loaded.items()}
    trained = [name for name, (_, _, is_trained) in loaded.items() if is_trained]
    recipe = loaded["ENAT"][1]
    guidance = recipe.sample.guidance_scale if args.guidance is None else args.guidance
    params = {name: sum(p.numel() for p in pipe.model.parameters()) for name, pipe in pipes.items()}

    labels = torch.arange(10)
    curves = {name: counted_decoding(pipe, labels, args.steps, guidance, options[name]) for name, pipe in pipes.items()}
    pipes["ENAT"].reuse = False
    curves["ENAT, no reuse"] = counted_decoding(pipes["ENAT"], labels, args.steps, guidance, options["ENAT"])
    pipes["ENAT"].reuse = True
    flops = {name: sum(c) / len(labels) for name, c in curves.items()}
    plot({name: [v / len(labels) for v in c] for name, c in curves.items()}, args.plot)

    seconds = wall_times(pipes, torch.arange(100) % 10, args.steps, guidance, options, args.repeats)

    scored = variants(trained)
    quality = {label: [] for label, _, _ in scored}
    for seed in args.seeds:
        for label, name, reuse in scored:
            pipe = use(pipes, name, reuse)
            sampler = lambda **kw: pipe(**kw, **options[name])  # noqa: E731 -- the recipe's sampling options
            sample_labels = torch.arange(args.num_samples) % 10
            images = generate(sampler, sample_labels, steps=args.steps, guidance_scale=guidance, seed=seed,
                              batch_size=500, desc=f"{label} seed {seed}")
            quality[label].append(score_samples(images, sample_labels, recipe))
    pipes["ENAT"].reuse = True

    result = {"steps": args.steps, "guidance": guidance, "params": params, "flops_per_image": flops,
              "flops_per_step_per_image": {k: [v / len(labels) for v in c] for k, c in curves.items()},
              "seconds_per_image": seconds, "quality": quality, "untrained": sorted(set(pipes) - set(trained))}
    print(f"| model | params | MFLOPs / image | FLOPs vs MaskGIT | s / image | time vs MaskGIT | FID | agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for name in [*pipes, "ENAT, no reuse"]:
        base = name.split(",")[0]
        scored = name in quality
        fids = [q["fid"] for q in quality.get(name, [])]
        agree = [q["classifier_agreement"] for q in quality.get(name, [])]
        spread = lambda v: f"{statistics.mean(v):.3g} +- {statistics.pstdev(v):.2g}"  # noqa: E731
        time_cells = (f"{seconds[name] * 1e3:.3g} ms | {seconds[name] / seconds['MaskGIT']:.2f}" if name in seconds
                      else "- | -")
        print(f"| {name} | {params[base] / 1e6:.2f}M | {flops[name] / 1e6:.3g} | {flops[name] / flops['MaskGIT']:.2f} "
              f"| {time_cells} | {spread(fids) if scored else '-'} | {spread(agree) if scored else '-'} |")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
