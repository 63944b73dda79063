"""The gf_ backbones on digits against timm's ResNet-18, side by side in one run.

Every model trains with the same recipe, ``recipes/backbones/resnet18_digits.yaml`` (digits
bilinearly resized to 32x32, AdamW, label smoothing, EMA; only ``model.name`` changes), for
each seed; its EMA weights are scored on the test split (top-1 accuracy, 15-bin ECE). Then
the training throughput (forward, backward and AdamW step on a batch of 64) and the
inference throughput (eval mode, batch of 256) of every model are timed in interleaved
rounds on this machine and reported as ratios to ResNet-18.

    python eval/benchmarks/backbones.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import timm
import torch

import genforge  # noqa: F401  (registers the gf_ models)
from genforge.config import load_recipe
from genforge.train.loop import train

RECIPE = "recipes/backbones/resnet18_digits.yaml"
MODELS = {  # name -> create_model kwargs needed at 32x32
    "resnet18": {},
    "gf_hornet_nano": {},
    "gf_moat_nano": {},
    "gf_revcol_nano": {},
    "gf_transnext_nano": {},
    "gf_rmt_nano": {},
    "gf_unireplknet_nano": {},
    "gf_resnet_nano_ibn_a": {},
    "gf_resnet_nano_ibn_b": {},
    "gf_resnet_nano_ws_bcn": {},
    "gf_identityformer_nano": {},
    "gf_randformer_nano": {"img_size": 32},
}


def train_one(name: str, kwargs: dict, seed: int, steps: int, root: Path) -> dict:
    out = root / f"{name}_seed{seed}"
    if not (out / "metrics.json").is_file():
        recipe = load_recipe(RECIPE, {"model.name": name, "model.kwargs": kwargs, "seed": seed,
                                      "output_dir": str(out), "train.max_steps": steps,
                                      "train.checkpoint_every": steps, "train.max_minutes": 30})
        start = time.perf_counter()
        train(recipe)
        metrics = json.loads((out / "metrics.json").read_text())
        metrics["train_seconds"] = time.perf_counter() - start
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return json.loads((out / "metrics.json").read_text())


def throughput(models: dict, rounds: int, iters: int) -> dict[str, tuple[float, float]]:
    """Images per second (train step, inference) of each model, timed in interleaved rounds."""
    nets = {}
    for name, kwargs in models.items():
        torch.manual_seed(0)
        net = timm.create_model(name, num_classes=10, in_chans=1, **kwargs)
        nets[name] = (net, torch.optim.AdamW(net.parameters(), lr=1e-3))
    x_train, y_train = torch.randn(64, 1, 32, 32), torch.randint(0, 10, (64,))
    x_eval = torch.randn(256, 1, 32, 32)
    times = {name: ([], []) for name in models}
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        for name, (net, opt) in nets.items():
            net.train()
            start = time.perf_counter()
            for _ in range(iters):
                loss = torch.nn.functional.cross_entropy(net(x_train), y_train)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            times[name][0].append(time.perf_counter() - start)
            net.eval()
            start = time.perf_counter()
            with torch.no_grad():
                for _ in range(iters):
                    net(x_eval)
            times[name][1].append(time.perf_counter() - start)
    return {name: (64 * iters / statistics.median(tr[1:]), 256 * iters / statistics.median(ev[1:]))
            for name, (tr, ev) in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", default="runs/bench/backbones")
    args = parser.parse_args()
    root = Path(args.out)
    models = {name: MODELS[name] for name in args.models}

    results = {}
    for name, kwargs in models.items():
        for seed in args.seeds:
            m = train_one(name, kwargs, seed, args.steps, root)
            results.setdefault(name, []).append(m)
            print(f"{name} seed {seed}: accuracy {100 * m['test_accuracy']:.2f}, ECE {m['test_ece']:.3f}, "
                  f"{m['train_seconds']:.0f} s", flush=True)
    speed = throughput(models, args.rounds, args.iters)
    base_train, base_eval = speed["resnet18"]

    print(f"\nDigits at 32x32, {args.steps} steps of the same recipe, mean ± std over seeds {args.seeds}")
    print("| model | parameters | test accuracy (%) | ECE | train img/s (vs ResNet-18) | inference img/s (vs ResNet-18) |")
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        accs = [100 * r["test_accuracy"] for r in runs]
        eces = [r["test_ece"] for r in runs]
        tr, ev = speed[name]
        print(f"| {name} | {runs[0]['num_params'] / 1e6:.3f}M | {statistics.fmean(accs):.2f} ± "
              f"{statistics.pstdev(accs):.2f} | {statistics.fmean(eces):.3f} | {tr:.0f} ({tr / base_train:.2f}x) | "
              f"{ev:.0f} ({ev / base_eval:.2f}x) |")
    (root / "summary.json").write_text(json.dumps({"runs": results, "throughput": speed}, indent=1))


if __name__ == "__main__":
    main()
