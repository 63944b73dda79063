"""DiMR against diffusers' DiT and UNet2DModel at matched parameters and equal training time.

Each model trains from its recipe in ``recipes/dimr/`` (``--dataset digits``: 8x8 digits, DiMR
1.19M / DiT 1.18M / UNet2DModel 1.20M parameters; ``--dataset mnist5k``: MNIST-5k at 32x32,
DiMR 1.34M with a Transformer on 8x8 tokens and ConvNeXt branches at 16 and 32, DiT 1.34M,
UNet2DModel 1.34M; same data, noise schedule, optimiser, EMA and sampler).

Equal wall time without a noisy wall-time cap: the models' seconds per training step are first
measured side by side in one process (the fastest of interleaved rounds, one thread, the
recipe's batch), saved in ``calibration.json`` and reused by every later call, so runs split
across sessions keep the same budgets. A budget of M minutes gives each model ``M * 60 / seconds_per_step``
steps. The LR is constant after warm-up, so a longer budget resumes the shorter budget's run
and continues it. After each budget the run samples class-balanced images with CFG, scored by
FID on the dataset's judge (digits CNN / MNIST CNN, through torch-fidelity) against the
training split, and by the judge's agreement with the asked class. The table gives mean +- std
over seeds and each baseline's FID and agreement relative to DiMR's; a "real test split" row
gives the floor. Finished stages are skipped when the command is run again, and a stage cut
short (a session's end) resumes from its last checkpoint (every ``--checkpoint-every`` steps,
exact resume); its ``wall_seconds`` then counts the last attempt only and ``resumed_from_step``
says where it began.

    python eval/benchmarks/dimr_vs_baselines.py --dataset mnist5k --budgets 10 30 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from genforge.core.io import write_json

RECIPES = {
    "digits": {"DiMR": "recipes/dimr/digits.yaml", "DiT (adaLN-Zero)": "recipes/dimr/dit_digits.yaml",
               "UNet2DModel": "recipes/dimr/unet2d_digits.yaml"},
    "mnist5k": {"DiMR": "recipes/dimr/mnist.yaml", "DiT (adaLN-Zero)": "recipes/dimr/dit_mnist.yaml",
                "UNet2DModel": "recipes/dimr/unet2d_mnist.yaml"},
}


def _key(name: str) -> str:
    return name.split()[0].lower()


def _method(recipe_path: str):
    from genforge.config import load_recipe
    from genforge.train import get_method

    recipe = load_recipe(recipe_path)
    return get_method(recipe.method)(recipe)


def calibrate(recipes: dict[str, str], rounds: int, steps: int) -> dict[str, float]:
    """Seconds per training step of each recipe: the fastest of interleaved rounds (the round
    least disturbed by other load on a shared machine)."""
    import torch

    torch.set_num_threads(1)
    setups = {}
    for name, path in recipes.items():
        method = _method(path)
        torch.manual_seed(0)
        model = method.build_model().train()
        data = method.train_dataset()
        loader = torch.utils.data.DataLoader(data, batch_size=method.recipe.data.batch_size, shuffle=True,
                                             drop_last=True, generator=torch.Generator().manual_seed(0))
        setups[name] = (method, model, torch.optim.AdamW(model.parameters(), lr=1e-4), loader)
    times = {name: [] for name in recipes}
    for _ in range(rounds):
        for name, (method, model, optimizer, loader) in setups.items():
            batches = iter(loader)
            method.training_step(model, next(batches))[0].backward()  # warm the allocator
            optimizer.zero_grad(set_to_none=True)
            start = time.perf_counter()
            for _ in range(steps):
                loss, _ = method.training_step(model, next(batches))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: min(values) for name, values in times.items()}


def load_calibration(out: Path, recipes: dict[str, str], rounds: int, steps: int) -> dict:
    path = out / "calibration.json"
    if path.is_file():
        return json.loads(path.read_text())
    calibration = {"seconds_per_step": calibrate(recipes, rounds, steps), "threads": 1,
                   "rounds": rounds, "steps_per_round": steps,
                   "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, calibration, indent=2)
    return calibration


def run_stage(recipe: str, run_dir: Path, seed: int, steps: int, minutes: float, num_samples: int,
              warmup: int, checkpoint_every: int) -> dict:
    """Train (or continue) one run to ``steps`` and keep its metrics as ``metrics_<minutes>min.json``."""
    from genforge.train.checkpoint import checkpoint_step, latest_checkpoint

    stage = run_dir / f"metrics_{minutes:g}min.json"
    if not stage.is_file():
        command = [sys.executable, "-m", "genforge.train", recipe, "--output-dir", str(run_dir),
                   "--set", f"seed={seed}", "--set", f"train.max_steps={steps}",
                   "--set", f"train.warmup_steps={warmup}",
                   "--set", f"train.checkpoint_every={min(steps, checkpoint_every)}",
                   "--set", f"eval.num_samples={num_samples}", "--auto-resume"]
        run_dir.mkdir(parents=True, exist_ok=True)
        latest = latest_checkpoint(run_dir)
        start_step = 0 if latest is None else checkpoint_step(latest)
        start = time.monotonic()
        with open(run_dir / f"train_{minutes:g}min.log", "a") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        metrics.update(steps=steps, wall_seconds=time.monotonic() - start, resumed_from_step=start_step)
        write_json(stage, metrics, indent=2)
        shutil.copy(run_dir / "samples_grid.png", run_dir / f"samples_grid_{minutes:g}min.png")
    return json.loads(stage.read_text())


def real_reference(recipe_path: str, num_samples: int) -> dict:
    """FID and agreement of the held-out real test split (the floor for any generator)."""
    from genforge.data import build_dataset
    from genforge.metrics import classifier_agreement, compute_fidelity, judge_for

    data = _method(recipe_path).recipe.data
    train, test = (build_dataset(data.name, split=split, image_size=data.image_size, resize=data.resize)
                   for split in ("train", "test"))
    extractor, judge = judge_for(data.name)
    fid = compute_fidelity(train.images, test.images[:num_samples], feature_extractor=extractor)["fid"]
    return {"fid": fid, "classifier_agreement": classifier_agreement(test.images, test.labels, judge)}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def print_table(minutes: float, runs: dict[str, list[dict]], params: dict, reference: dict, judge: str) -> None:
    dimr_fid = mean_std([r["fid"] for r in runs["DiMR"]])[0]
    dimr_agree = mean_std([r["classifier_agreement"] for r in runs["DiMR"]])[0]
    seeds = len(runs["DiMR"])
    print(f"\n{minutes:g} min of training per run (calibrated steps), {seeds} seed(s)\n")
    print(f"| model | params (M) | steps | FID ({judge}) | agreement | FID / DiMR FID | agreement / DiMR |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, results in runs.items():
        fid, fid_std = mean_std([r["fid"] for r in results])
        agree, agree_std = mean_std([r["classifier_agreement"] for r in results])
        print(f"| {name} | {params[name]:.2f} | {results[0]['steps']} | {fid:.2f} ± {fid_std:.2f} | "
              f"{agree:.3f} ± {agree_std:.3f} | {fid / dimr_fid:.2f} | {agree / dimr_agree:.2f} |")
    print(f"| real test split | – | – | {reference['fid']:.2f} | {reference['classifier_agreement']:.3f} | – | – |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(RECIPES), default="digits")
    parser.add_argument("--budgets", type=float, nargs="+", default=[3.0],
                        help="training minutes per run (calibrated into steps); a longer budget continues the shorter")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--warmup-steps", type=int, default=50, help="LR warm-up of every run (the same for all)")
    parser.add_argument("--checkpoint-every", type=int, default=100,
                        help="steps between checkpoints inside a stage (an interrupted stage resumes from the last)")
    parser.add_argument("--calibration-rounds", type=int, default=5)
    parser.add_argument("--calibration-steps", type=int, default=3)
    parser.add_argument("--out", help="default runs/bench_dimr_vs_baselines_<dataset>")
    args = parser.parse_args()
    recipes = RECIPES[args.dataset]
    out = Path(args.out or f"runs/bench_dimr_vs_baselines_{args.dataset}")
    calibration = load_calibration(out, recipes, args.calibration_rounds, args.calibration_steps)
    seconds = calibration["seconds_per_step"]
    print("seconds per step (one thread, side by side):",
          ", ".join(f"{name} {s:.2f}" for name, s in seconds.items()), flush=True)
    params = {name: sum(p.numel() for p in _method(path).build_model().parameters()) / 1e6
              for name, path in recipes.items()}
    results = {}
    for minutes in sorted(args.budgets):
        runs = {name: [] for name in recipes}
        for seed in args.seeds:  # seed-major: an interrupted benchmark leaves whole seeds
            for name, path in recipes.items():
                runs[name].append(run_stage(path, out / f"{_key(name)}_seed{seed}", seed,
                                            max(1, round(minutes * 60 / seconds[name])), minutes,
                                            args.num_samples, args.warmup_steps,
                                            args.checkpoint_every))
        results[minutes] = runs
    reference = real_reference(recipes["DiMR"], args.num_samples)
    write_json(out / "results.json", {"runs": {f"{m:g}": r for m, r in results.items()}, "real": reference,
                                      "params": params, "calibration": calibration}, indent=2)
    judge = _method(recipes["DiMR"]).recipe.eval.feature_extractor
    for minutes, runs in results.items():
        print_table(minutes, runs, params, reference, judge)


if __name__ == "__main__":
    main()
