"""Dataset distillation on the bundled digits: the spec's CPU protocol, side by side in one run.

For IPC 1, 5 and 10 and every distillation seed, this distils the digits train split with
each engine and evaluates every synthetic set with the same train-on-synthetic protocol
(ConvNet-D2 width 32, 300 epochs, SGD lr 0.01 -> 0.001 at epoch 151, DSA without flip,
final iterate, ``--num-eval`` fresh networks per set):

- random real subset (the baseline), DM, DataDAM (p = 4), DataDAM + FYI;
- DWA (rho = 15e-3) and SRe2L (rho = 0) against a ConvNetBN-D2 teacher trained per seed,
  each evaluated with hard labels and with the teacher's soft labels (KD, T = 4, mixup);
- the full train split as the upper bound (``--full-evals`` networks per seed).

It prints mean ± std test accuracy over seeds x networks, each method's gap to the random
subset in pooled standard deviations, the wall time of one distillation iteration (one
update of the whole synthetic set) as a ratio to DM's at the same IPC (timed in interleaved
rounds), DWA's within-class diversity against SRe2L's, and FYI's positive control on "mirror
digits" (half of the images mirrored, so that left and right are equivalent as FYI assumes;
distillation and evaluation then use DSA with flip, as the field does on natural images). Results (and
every accuracy) are written to ``--out`` as JSON; a finished (method, ipc, seed) is
reused when the script is run again.

    python eval/benchmarks/distillation.py --seeds 0 1 2 --num-eval 5

On a 2-core machine, two single-threaded processes over disjoint IPCs halve the wall time;
iteration-cost ratios are then still measured within one process per IPC:

    OMP_NUM_THREADS=1 python eval/benchmarks/distillation.py --ipcs 10 --no-control --out b.json &
    OMP_NUM_THREADS=1 python eval/benchmarks/distillation.py --ipcs 1 5 --out a.json
    python eval/benchmarks/distillation.py --ipcs 1 5 10 --out a.json --merge b.json   # the table
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from genforge.distill import EvalOptions, RealData, distill_dataset, evaluate_synthetic, load_real
from genforge.distill.dwa import DWAOptions, load_teacher, train_teacher
from genforge.distill.evaluate import accuracy_on
from genforge.distill.seeding import stream

WITH_FLIP = "color_crop_cutout_flip_scale_rotate"
MATCH = dict(net_width=32, net_depth=2, dsa_strategy="color_crop_cutout_scale_rotate", batch_real=64)
# (label, engine, flip, options); DWA and SRe2L rows are evaluated twice (hard and soft labels)
ENGINES = [
    ("random", "random", False, {}),
    ("DM", "dm", False, MATCH),
    ("DataDAM", "datadam", False, dict(MATCH, power=4.0)),
    ("DataDAM+FYI", "datadam", True, dict(MATCH, power=4.0)),
    ("DWA", "dwa", False, dict(rho=15e-3, steps=12, jitter=1)),
    ("SRe2L", "dwa", False, dict(rho=0.0, steps=12, jitter=1)),
]


def mirrored(real: RealData, seed: int) -> RealData:
    """The same data with a random half of the images mirrored (labels unchanged)."""
    flip = torch.rand(len(real.labels), generator=stream(seed, 99)) < 0.5
    pixels = real.to_pixels(real.images)
    pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    return RealData(pixels, real.labels, real.num_classes, normalisation=real.normalisation)


def iteration_costs(real: RealData, ipcs: list[int], teacher, rounds: int, iterations: int = 20) -> dict:
    """Seconds per iteration (one update of the whole synthetic set) of each engine, interleaved.

    Every round times ``iterations`` iterations of each engine back to back, so the engines
    share the machine's state; the median over rounds is kept. A DWA iteration is one pixel
    step of each of its ``ipc`` batches.
    """
    engines = [(label, engine, flip, options) for label, engine, flip, options in ENGINES if engine != "random"]
    times = {f"{label}|{ipc}": [] for label, *_ in engines for ipc in ipcs}
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        for ipc in ipcs:
            for label, engine, flip, options in engines:
                kwargs = dict(options, iterations=iterations)
                if engine == "dwa":
                    kwargs["teacher"] = teacher
                start = time.perf_counter()
                distill_dataset(engine, real, ipc, seed=0, flip=flip, progress=False, **kwargs)
                times[f"{label}|{ipc}"].append((time.perf_counter() - start) / iterations)
    return {key: statistics.median(values[1:]) for key, values in times.items()}


def within_class_diversity(images: torch.Tensor, labels: torch.Tensor, teacher) -> float:
    """Mean pairwise distance of teacher embeddings between images of the same class."""
    with torch.no_grad():
        emb = teacher.embed(images)
    distances = [torch.pdist(emb[labels == c]).mean() for c in labels.unique() if (labels == c).sum() > 1]
    return float(torch.stack(distances).mean()) if distances else float("nan")


def summary(accs: list[float]) -> dict:
    return {"mean": statistics.fmean(accs), "std": statistics.pstdev(accs), "n": len(accs), "accs": accs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ipcs", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-eval", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=1000, help="DM/DataDAM iterations")
    parser.add_argument("--dwa-iterations", type=int, default=500, help="DWA/SRe2L pixel steps per batch")
    parser.add_argument("--epochs", type=int, default=300, help="evaluation epochs")
    parser.add_argument("--full-evals", type=int, default=1, help="networks per seed trained on the full split")
    parser.add_argument("--out", default="runs/bench/distillation.json")
    parser.add_argument("--no-control", action="store_true",
                        help="skip the mirror-digits FYI control and the iteration timing")
    parser.add_argument("--timing-rounds", type=int, default=3)
    parser.add_argument("--merge", nargs="*", default=[],
                        help="result files of runs over other IPCs (same seeds) to report together")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for other in args.merge:
        extra = json.loads(Path(other).read_text())
        results.setdefault("runs", {}).update(extra.get("runs", {}))

    def save():
        out.write_text(json.dumps(results, indent=1))

    real, test = load_real("digits")
    hard = EvalOptions(num_eval=args.num_eval, epochs=args.epochs)
    soft = EvalOptions(num_eval=args.num_eval, epochs=args.epochs, soft="teacher")
    teachers = {}
    for seed in args.seeds:
        file = out.with_name(f"teacher_seed{seed}.safetensors")
        options = DWAOptions(teacher_width=32, teacher_depth=2)
        if file.is_file():
            teachers[seed] = load_teacher(file, real, options)
        else:
            teachers[seed] = train_teacher(real, options, seed, progress=False)
            save_file({k: v.contiguous() for k, v in teachers[seed].state_dict().items()}, str(file))
        results.setdefault("teacher", {})[str(seed)] = accuracy_on(teachers[seed], test)
        print(f"teacher seed {seed}: {100 * results['teacher'][str(seed)]:.2f}%", flush=True)

    if "full" not in results:
        accs = []
        full = EvalOptions(num_eval=args.full_evals, epochs=args.epochs)
        for seed in args.seeds:
            accs += evaluate_synthetic(real.images, test, full, labels=real.labels, seed=seed, progress=False).accuracies
        results["full"] = summary(accs)
        save()
    print(f"full train split: {100 * results['full']['mean']:.2f} ± {100 * results['full']['std']:.2f}", flush=True)

    runs = results.setdefault("runs", {})
    for ipc in args.ipcs:
        for label, engine, flip, options in ENGINES:
            for seed in args.seeds:
                key = f"{label}|{ipc}|{seed}"
                if key in runs:
                    continue
                kwargs = dict(options)
                if engine in ("dm", "datadam"):
                    kwargs["iterations"] = args.iterations
                elif engine == "dwa":
                    kwargs.update(iterations=args.dwa_iterations, teacher=teachers[seed])
                start = time.perf_counter()
                syn = distill_dataset(engine, real, ipc, seed=seed, flip=flip, progress=False, **kwargs)
                seconds = time.perf_counter() - start
                row = {"distill_seconds": seconds,
                       "iterations": kwargs.get("iterations", 0),
                       "hard": evaluate_synthetic(syn, test, hard, seed=seed, progress=False).accuracies}
                if engine == "dwa":
                    row["soft"] = evaluate_synthetic(syn, test, soft, seed=seed, teacher=teachers[seed],
                                                     progress=False).accuracies
                    row["diversity"] = within_class_diversity(syn.images, syn.labels, teachers[seed])
                runs[key] = row
                save()
                print(f"{key}: hard {100 * statistics.fmean(row['hard']):.2f}"
                      + (f" soft {100 * statistics.fmean(row['soft']):.2f}" if "soft" in row else "")
                      + f" ({seconds:.1f} s)", flush=True)

    control = results.setdefault("mirror_control", {})
    mirror_eval = EvalOptions(num_eval=args.num_eval, epochs=args.epochs, dsa_strategy=WITH_FLIP)
    for seed in [] if args.no_control else args.seeds:
        m_real, m_test = mirrored(real, seed), mirrored(test, seed + 1000)
        for label, flip in (("DM", False), ("DM+FYI", True)):
            key = f"{label}|1|{seed}"
            if key not in control:
                syn = distill_dataset("dm", m_real, 1, seed=seed, flip=flip, progress=False,
                                      iterations=args.iterations, **dict(MATCH, dsa_strategy=WITH_FLIP))
                control[key] = evaluate_synthetic(syn, m_test, mirror_eval, seed=seed, progress=False).accuracies
                save()
    if "timing" not in results:
        results["timing"] = iteration_costs(real, args.ipcs, teachers[args.seeds[0]], args.timing_rounds)
        save()
    if not args.no_control:
        report(results, args)


def report(results: dict, args) -> None:
    runs = results["runs"]

    def pooled(label, ipc, kind="hard"):
        accs = [a for s in args.seeds for a in runs[f"{label}|{ipc}|{s}"][kind]]
        return summary(accs)

    rows = [(lbl, "hard") for lbl, *_ in ENGINES] + [("DWA", "soft"), ("SRe2L", "soft")]
    print(f"\nTest accuracy (%) on digits, mean ± std over {len(args.seeds)} seeds x {args.num_eval} networks")
    header = "| method | labels | " + " | ".join(f"IPC {i}" for i in args.ipcs) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for label, kind in rows:
        cells = []
        for ipc in args.ipcs:
            s = pooled(label, ipc, kind)
            cells.append(f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}")
        print(f"| {label} | {kind} | " + " | ".join(cells) + " |")
    full = results["full"]
    print("| full train split (upper bound) | hard | " + " | ".join(
        f"{100 * full['mean']:.2f} ± {100 * full['std']:.2f}" for _ in args.ipcs) + " |")

    timing = results["timing"]
    print("\nWall time of one distillation iteration, as a ratio to DM's at the same IPC (interleaved rounds)")
    print("| IPC | DM (s) | " + " | ".join(lbl for lbl, eng, *_ in ENGINES if eng not in ("random", "dm")) + " |")
    print("|---|---|" + "---|" * (len(ENGINES) - 2))
    for ipc in args.ipcs:
        dm = timing[f"DM|{ipc}"]
        print(f"| {ipc} | {dm:.4f} | " + " | ".join(f"{timing[f'{lbl}|{ipc}'] / dm:.2f}" for lbl, eng, *_ in ENGINES
                                                  if eng not in ("random", "dm")) + " |")

    print("\nGap to the random subset in pooled stds ((method - random) / sqrt((sd_m^2 + sd_r^2) / 2)):")
    for label in ("DM", "DataDAM", "DataDAM+FYI", "DWA", "SRe2L"):
        gaps = []
        for ipc in args.ipcs:
            m, r = pooled(label, ipc), pooled("random", ipc)
            sd = math.sqrt((m["std"] ** 2 + r["std"] ** 2) / 2) or float("nan")
            gaps.append(f"IPC {ipc}: {100 * (m['mean'] - r['mean']):+.2f} pts = {(m['mean'] - r['mean']) / sd:+.1f} sd")
        print(f"  {label}: " + "; ".join(gaps))
    for ipc in args.ipcs:
        dam, dm = pooled("DataDAM", ipc), pooled("DM", ipc)
        print(f"  DataDAM - DM at IPC {ipc}: {100 * (dam['mean'] - dm['mean']):+.2f} pts "
              f"({(dam['mean'] - dm['mean']) / (dm['std'] or float('nan')):+.1f} DM std)")

    print("\nDWA within-class diversity (mean pairwise teacher-embedding distance), DWA vs SRe2L:")
    for ipc in [i for i in args.ipcs if i > 1]:
        d = statistics.fmean(runs[f"DWA|{ipc}|{s}"]["diversity"] for s in args.seeds)
        r = statistics.fmean(runs[f"SRe2L|{ipc}|{s}"]["diversity"] for s in args.seeds)
        print(f"  IPC {ipc}: DWA {d:.3f} vs SRe2L {r:.3f} (ratio {d / r:.3f})")
    print("  teacher test accuracy: " + ", ".join(f"{100 * v:.2f}" for v in results["teacher"].values()))

    control = results["mirror_control"]
    for label in ("DM", "DM+FYI"):
        s = summary([a for seed in args.seeds for a in control[f"{label}|1|{seed}"]])
        print(f"mirror digits, IPC 1, {label}: {100 * s['mean']:.2f} ± {100 * s['std']:.2f}")


if __name__ == "__main__":
    main()
