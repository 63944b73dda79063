"""DiMR against a DiT-style baseline and diffusers' UNet2DModel on digits, at equal wall time.

Each model trains from its recipe in ``recipes/dimr/`` (matched parameter counts: DiMR 1.19M,
diffusers' DiT 1.18M, UNet2DModel 1.20M; same data, noise schedule, optimiser, EMA and sampler) for the
same number of minutes on this machine, one run at a time so none competes for the CPU. Every
run then samples class-balanced digits with CFG and is scored by FID on the digits CNN's
features (torch-fidelity) against the training split, and by classifier agreement. The table
gives mean +- std over seeds and each baseline's FID and agreement relative to DiMR's; a
"real test split" row gives the floor (held-out real digits scored the same way).

    python eval/benchmarks/dimr_vs_baselines.py --minutes 3 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from genforge.train import latest_checkpoint

RECIPES = {"DiMR": "recipes/dimr/digits.yaml", "DiT (adaLN-Zero)": "recipes/dimr/dit_digits.yaml",
           "UNet2DModel": "recipes/dimr/unet2d_digits.yaml"}


def run_one(recipe: str, out: Path, seed: int, minutes: float, num_samples: int) -> dict:
    """Train one recipe for ``minutes`` in a subprocess and return its metrics and step count."""
    if not (out / "metrics.json").is_file():
        command = [sys.executable, "-m", "genforge.train", recipe, "--output-dir", str(out),
                   "--set", f"seed={seed}", "--set", f"train.max_minutes={minutes}",
                   "--set", f"eval.num_samples={num_samples}", "--auto-resume"]
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "train_output.log", "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["steps"] = int(latest_checkpoint(out).name.removeprefix("step_"))
    return metrics


def real_reference(num_samples: int) -> dict:
    """FID and agreement of the held-out real test split (the floor for any generator)."""
    from genforge.data import DigitsDataset
    from genforge.metrics import classifier_agreement, compute_fidelity

    train, test = DigitsDataset("train", image_size=8), DigitsDataset("test", image_size=8)
    fid = compute_fidelity(train.images, test.images[:num_samples])["fid"]
    return {"fid": fid, "classifier_agreement": classifier_agreement(test.images, test.labels)}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def parameter_counts() -> dict[str, float]:
    from genforge.config import load_recipe
    from genforge.train import get_method

    counts = {}
    for name, recipe_path in RECIPES.items():
        recipe = load_recipe(recipe_path)
        model = get_method(recipe.method)(recipe).build_model()
        counts[name] = sum(p.numel() for p in model.parameters()) / 1e6
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="training wall time per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--out", default="runs/bench_dimr_vs_baselines")
    args = parser.parse_args()
    out = Path(args.out)
    results = {name: [run_one(recipe, out / f"{name.split()[0].lower()}_seed{seed}", seed, args.minutes,
                              args.num_samples) for seed in args.seeds] for name, recipe in RECIPES.items()}
    reference = real_reference(args.num_samples)
    params = parameter_counts()
    (out / "results.json").write_text(json.dumps({"runs": results, "real": reference, "params": params}, indent=2))

    dimr_fid = mean_std([r["fid"] for r in results["DiMR"]])[0]
    dimr_agree = mean_std([r["classifier_agreement"] for r in results["DiMR"]])[0]
    print(f"\n{args.minutes:g} min training per run, seeds {args.seeds}, {args.num_samples} samples each\n")
    print("| model | params (M) | steps | FID (digits CNN) | agreement | FID / DiMR FID | agreement / DiMR |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, runs in results.items():
        fid, fid_std = mean_std([r["fid"] for r in runs])
        agree, agree_std = mean_std([r["classifier_agreement"] for r in runs])
        steps = statistics.mean(r["steps"] for r in runs)
        print(f"| {name} | {params[name]:.2f} | {steps:.0f} | {fid:.2f} ± {fid_std:.2f} | "
              f"{agree:.3f} ± {agree_std:.3f} | {fid / dimr_fid:.2f} | {agree / dimr_agree:.2f} |")
    print(f"| real test split | – | – | {reference['fid']:.2f} | {reference['classifier_agreement']:.3f} | – | – |")


if __name__ == "__main__":
    main()
