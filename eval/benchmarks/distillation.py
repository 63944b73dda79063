"""Dataset distillation on the bundled digits or MNIST-5k: the spec's CPU protocol, side by side.

For each IPC (digits: 1, 5 and 10; ``--dataset mnist5k``: 1, 10 and 50) and every distillation
seed, this distils the train split with each engine and evaluates every synthetic set with the
same train-on-synthetic protocol (ConvNet of width 32 and depth 2 on the 8x8 digits, depth 3 --
ConvNet-D3, the field's MNIST network -- on MNIST-5k padded to 32x32; 300 epochs, SGD lr 0.01
-> 0.001 at epoch 151, DSA without flip, final iterate, ``--num-eval`` fresh networks per set):

- random real subset (the baseline), DM, DataDAM (p = 4), DataDAM + FYI;
- DWA (rho = 15e-3) and SRe2L (rho = 0) against a ConvNetBN teacher of the same depth trained
  per seed (only when a DWA row is run), each evaluated with hard labels and with the teacher's
  soft labels (KD, T = 4, mixup); ``--rhos`` adds DWA rows at other rho (the spec's sweep for
  small teachers: ``--rhos 0.005 0.05`` next to 0 and 15e-3);
- the full train split as the upper bound (``--full-evals`` networks per seed), after the IPCs.

``--methods`` runs a subset of the rows (by label); runs go IPC by IPC, seed by seed, so a
partial run has every method of the first seed first.

It prints mean ± std test accuracy over seeds x networks, each method's gap to the random
subset in pooled standard deviations, the wall time of one distillation iteration (one
update of the whole synthetic set) as a ratio to DM's at the same IPC (timed in interleaved
rounds), DWA's within-class diversity against SRe2L's, the wall and CPU time of each row
(distillation and evaluation, as run), and FYI's positive control on "mirror
digits" (half of the images mirrored, so that left and right are equivalent as FYI assumes;
distillation and evaluation then use DSA with flip, as the field does on natural images). Results (and
every accuracy) are written to ``--out`` as JSON after each run; a finished (method, ipc,
seed), teacher or full-split seed is reused when the script is run again, so a killed run
resumes and the work can be split across sessions (the report marks cells not yet run).

    python eval/benchmarks/distillation.py --seeds 0 1 2 --num-eval 5
    python eval/benchmarks/distillation.py --dataset mnist5k --no-control --out runs/bench/distillation_mnist5k.json
    python eval/benchmarks/distillation.py --dataset mnist5k --out runs/bench/distillation_mnist5k.json --report-only

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

from genforge.core.io import atomic_write, write_json
from genforge.distill import EvalOptions, RealData, distill_dataset, evaluate_synthetic, load_real
from genforge.distill.dwa import DWAOptions, load_teacher, train_teacher
from genforge.distill.evaluate import accuracy_on
from genforge.distill.seeding import stream

WITH_FLIP = "color_crop_cutout_flip_scale_rotate"
# name -> (load_real arguments, ConvNet depth, default IPCs)
DATASETS = {
    "digits": (dict(name="digits"), 2, [1, 5, 10]),
    "mnist5k": (dict(name="mnist5k", image_size=32, resize="pad"), 3, [1, 10, 50]),
}


def matching(depth: int) -> dict:
    """DM/DataDAM's matching-network settings at the dataset's depth."""
    return dict(net_width=32, net_depth=depth, dsa_strategy="color_crop_cutout_scale_rotate", batch_real=64)


def engines(depth: int, rhos: list[float] = ()) -> list[tuple[str, str, bool, dict]]:
    """(label, engine, flip, options); every DWA row (SRe2L: rho 0) is evaluated with hard and soft labels."""
    match = matching(depth)
    return [
        ("random", "random", False, {}),
        ("DM", "dm", False, match),
        ("DataDAM", "datadam", False, dict(match, power=4.0)),
        ("DataDAM+FYI", "datadam", True, dict(match, power=4.0)),
        ("DWA", "dwa", False, dict(rho=15e-3, steps=12, jitter=1)),
        ("SRe2L", "dwa", False, dict(rho=0.0, steps=12, jitter=1)),
    ] + [(f"DWA rho={rho:g}", "dwa", False, dict(rho=rho, steps=12, jitter=1)) for rho in rhos]


def mirrored(real: RealData, seed: int) -> RealData:
    """The same data with a random half of the images mirrored (labels unchanged)."""
    flip = torch.rand(len(real.labels), generator=stream(seed, 99)) < 0.5
    pixels = real.to_pixels(real.images)
    pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    return RealData(pixels, real.labels, real.num_classes, normalisation=real.normalisation)


def iteration_costs(real: RealData, ipcs: list[int], rows: list, teacher, rounds: int, iterations: int = 20) -> dict:
    """Seconds per iteration (one update of the whole synthetic set) of each engine, interleaved.

    Every round times ``iterations`` iterations of each engine back to back, so the engines
    share the machine's state; the median over rounds is kept. A DWA iteration is one pixel
    step of each of its ``ipc`` batches.
    """
    timed = [(label, engine, flip, options) for label, engine, flip, options in rows if engine != "random"]
    times = {f"{label}|{ipc}": [] for label, *_ in timed for ipc in ipcs}
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        for ipc in ipcs:
            for label, engine, flip, options in timed:
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


def timed(fn, *args, **kwargs) -> tuple:
    """``fn(*args, **kwargs)``, its wall time and this process's CPU time, in seconds (on a shared
    machine the CPU time is the steadier cost: with one thread it is what an idle core would take)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def timed_eval(*args, **kwargs) -> tuple[list[float], float, float]:
    """``evaluate_synthetic``'s accuracies, its wall and CPU time in seconds."""
    result, wall, cpu = timed(evaluate_synthetic, *args, progress=False, **kwargs)
    return result.accuracies, wall, cpu


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="digits")
    parser.add_argument("--ipcs", type=int, nargs="+", help="default: 1 5 10 (digits), 1 10 50 (mnist5k)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", help="row labels to run (default: all, then the full split)")
    parser.add_argument("--rhos", type=float, nargs="*", default=[], help="extra DWA rows at these rho")
    parser.add_argument("--num-eval", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=1000, help="DM/DataDAM iterations")
    parser.add_argument("--dwa-iterations", type=int, default=500, help="DWA/SRe2L pixel steps per batch")
    parser.add_argument("--epochs", type=int, default=300, help="evaluation epochs")
    parser.add_argument("--teacher-epochs", type=int, default=300, help="DWA teacher training epochs")
    parser.add_argument("--full-evals", type=int, default=1, help="networks per seed trained on the full split")
    parser.add_argument("--out", default="runs/bench/distillation.json")
    parser.add_argument("--no-control", action="store_true",
                        help="skip the mirror-digits FYI control and the iteration timing")
    parser.add_argument("--timing-rounds", type=int, default=3)
    parser.add_argument("--merge", nargs="*", default=[],
                        help="result files of runs over other IPCs (same seeds) to report together")
    parser.add_argument("--report-only", action="store_true", help="print the tables of --out, run nothing")
    args = parser.parse_args()
    load_kwargs, args.depth, default_ipcs = DATASETS[args.dataset]
    args.load_kwargs, args.ipcs = load_kwargs, args.ipcs or default_ipcs
    args.rows = engines(args.depth, args.rhos)
    labels = [label for label, *_ in args.rows]
    unknown = sorted(set(args.methods or []) - set(labels + ["full"]))
    if unknown:
        parser.error(f"unknown --methods {unknown}; expected some of {labels + ['full']}")
    return args


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.is_file() else {}
    if results.setdefault("dataset", args.dataset) != args.dataset:
        raise SystemExit(f"{out} holds {results['dataset']} results, not {args.dataset}")
    for other in args.merge:
        extra = json.loads(Path(other).read_text())
        for key in ("runs", "full_runs", "teacher", "teacher_seconds", "teacher_cpu_seconds"):
            results.setdefault(key, {}).update(extra.get(key, {}))
    if args.report_only:
        report(results, args)
        return

    def save():
        write_json(out, results, indent=1)

    real, test = load_real(**args.load_kwargs)
    hard = EvalOptions(num_eval=args.num_eval, epochs=args.epochs, net_depth=args.depth)
    soft = EvalOptions(num_eval=args.num_eval, epochs=args.epochs, net_depth=args.depth, soft="teacher")
    teachers = {}

    def teacher(seed: int):
        """The seed's ConvNetBN teacher, trained (and cached next to ``--out``, named by dataset) on first use."""
        if seed not in teachers:
            tag = "" if args.dataset == "digits" else f"{args.dataset}_"
            file = out.with_name(f"teacher_{tag}seed{seed}.safetensors")
            options = DWAOptions(teacher_width=32, teacher_depth=args.depth, teacher_epochs=args.teacher_epochs)
            if file.is_file():
                teachers[seed] = load_teacher(file, real, options)
            else:
                teachers[seed], wall, cpu = timed(train_teacher, real, options, seed, progress=False)
                results.setdefault("teacher_seconds", {})[str(seed)] = wall
                results.setdefault("teacher_cpu_seconds", {})[str(seed)] = cpu
                with atomic_write(file) as tmp:
                    save_file({k: v.contiguous() for k, v in teachers[seed].state_dict().items()}, str(tmp))
            results.setdefault("teacher", {})[str(seed)] = accuracy_on(teachers[seed], test)
            save()
            print(f"teacher seed {seed}: {100 * results['teacher'][str(seed)]:.2f}%", flush=True)
        return teachers[seed]

    runs = results.setdefault("runs", {})
    chosen = [row for row in args.rows if args.methods is None or row[0] in args.methods]
    for ipc in args.ipcs:
        for seed in args.seeds:
            for label, engine, flip, options in chosen:
                key = f"{label}|{ipc}|{seed}"
                if key in runs:
                    continue
                kwargs = dict(options)
                if engine in ("dm", "datadam"):
                    kwargs["iterations"] = args.iterations
                elif engine == "dwa":
                    kwargs.update(iterations=args.dwa_iterations, teacher=teacher(seed))
                syn, seconds, cpu = timed(distill_dataset, engine, real, ipc, seed=seed, flip=flip,
                                          progress=False, **kwargs)
                row = {"distill_seconds": seconds, "distill_cpu_seconds": cpu,
                       "iterations": kwargs.get("iterations", 0)}
                row["hard"], row["eval_seconds"], row["eval_cpu_seconds"] = timed_eval(syn, test, hard, seed=seed)
                if engine == "dwa":
                    row["soft"], row["soft_eval_seconds"], row["soft_eval_cpu_seconds"] = timed_eval(
                        syn, test, soft, seed=seed, teacher=teacher(seed))
                    row["diversity"] = within_class_diversity(syn.images, syn.labels, teacher(seed))
                runs[key] = row
                save()
                print(f"{key}: hard {100 * statistics.fmean(row['hard']):.2f}"
                      + (f" soft {100 * statistics.fmean(row['soft']):.2f}" if "soft" in row else "")
                      + f" ({seconds:.1f} s + {row['eval_seconds']:.1f} s)", flush=True)

    full_runs = results.setdefault("full_runs", {})
    full = EvalOptions(num_eval=args.full_evals, epochs=args.epochs, net_depth=args.depth)
    for seed in args.seeds if args.methods is None or "full" in args.methods else []:
        if str(seed) not in full_runs:
            accs, seconds, cpu = timed_eval(real.images, test, full, labels=real.labels, seed=seed)
            full_runs[str(seed)] = {"accs": accs, "eval_seconds": seconds, "eval_cpu_seconds": cpu}
            save()
            print(f"full train split, seed {seed}: {100 * statistics.fmean(accs):.2f} ({seconds:.1f} s)", flush=True)

    control = results.setdefault("mirror_control", {})
    mirror_eval = EvalOptions(num_eval=args.num_eval, epochs=args.epochs, dsa_strategy=WITH_FLIP, net_depth=args.depth)
    for seed in [] if args.no_control else args.seeds:
        m_real, m_test = mirrored(real, seed), mirrored(test, seed + 1000)
        for label, flip in (("DM", False), ("DM+FYI", True)):
            key = f"{label}|1|{seed}"
            if key not in control:
                syn = distill_dataset("dm", m_real, 1, seed=seed, flip=flip, progress=False,
                                      iterations=args.iterations,
                                      **dict(matching(args.depth), dsa_strategy=WITH_FLIP))
                control[key] = evaluate_synthetic(syn, m_test, mirror_eval, seed=seed, progress=False).accuracies
                save()
    if not args.no_control and "timing" not in results:
        results["timing"] = iteration_costs(real, args.ipcs, args.rows, teacher(args.seeds[0]), args.timing_rounds)
        save()
    report(results, args)


def report(results: dict, args) -> None:
    """The tables of every finished run; a cell short of its seeds shows how many it has."""
    runs, seeds = results.get("runs", {}), args.seeds
    labels = [label for label, *_ in args.rows]

    def pooled(label, ipc, kind="hard"):
        found = [runs[f"{label}|{ipc}|{s}"] for s in seeds if f"{label}|{ipc}|{s}" in runs]
        accs = [a for row in found if kind in row for a in row[kind]]
        return summary(accs) | {"seeds": len(found)} if accs else None

    def cell(s) -> str:
        if s is None:
            return "not run"
        partial = f" ({s['seeds']}/{len(seeds)} seeds)" if s["seeds"] < len(seeds) else ""
        return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}{partial}"

    dwa_rows = [label for label, engine, *_ in args.rows if engine == "dwa"]
    rows = [(lbl, "hard") for lbl in labels] + [(lbl, "soft") for lbl in dwa_rows]
    print(f"\nTest accuracy (%) on {args.dataset}, mean ± std over seeds {seeds} x {args.num_eval} networks")
    header = "| method | labels | " + " | ".join(f"IPC {i}" for i in args.ipcs) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for label, kind in rows:
        print(f"| {label} | {kind} | " + " | ".join(cell(pooled(label, ipc, kind)) for ipc in args.ipcs) + " |")
    full = [results["full_runs"][str(s)] for s in seeds if str(s) in results.get("full_runs", {})]
    full_cell = cell(summary([a for f in full for a in f["accs"]]) | {"seeds": len(full)}) if full else "not run"
    print(f"| full train split (upper bound) | hard | {full_cell} |")

    print("\nGap to the random subset in pooled stds ((method - random) / sqrt((sd_m^2 + sd_r^2) / 2)):")
    for label in labels[1:]:
        gaps = []
        for ipc in args.ipcs:
            m, r = pooled(label, ipc), pooled("random", ipc)
            if m is None or r is None:
                continue
            sd = math.sqrt((m["std"] ** 2 + r["std"] ** 2) / 2) or float("nan")
            gaps.append(f"IPC {ipc}: {100 * (m['mean'] - r['mean']):+.2f} pts = {(m['mean'] - r['mean']) / sd:+.1f} sd")
        if gaps:
            print(f"  {label}: " + "; ".join(gaps))
    for ipc in args.ipcs:
        dam, dm = pooled("DataDAM", ipc), pooled("DM", ipc)
        if dam and dm:
            print(f"  DataDAM - DM at IPC {ipc}: {100 * (dam['mean'] - dm['mean']):+.2f} pts "
                  f"({(dam['mean'] - dm['mean']) / (dm['std'] or float('nan')):+.1f} DM std)")

    def cost(found: list[dict], keys: list[str]) -> str:
        """Mean wall seconds of each part joined by +, then the mean CPU seconds where every run has them."""
        keys = [k for k in keys if k in found[0]]
        text = " + ".join(f"{statistics.fmean(r[k] for r in found):.0f}" for k in keys)
        cpu = [k.replace("_seconds", "_cpu_seconds") for k in keys]
        if all(k in r for r in found for k in cpu):
            text += " (CPU " + " + ".join(f"{statistics.fmean(r[k] for r in found):.0f}" for k in cpu) + ")"
        return text

    print("\nWall time per row (s, mean over the seeds run): distillation + evaluation of "
          f"{args.num_eval} networks (+ soft-label evaluation); CPU time of the process where recorded")
    print("| method | " + " | ".join(f"IPC {i}" for i in args.ipcs) + " |")
    print("|---|" + "---|" * len(args.ipcs))
    for label in labels:
        cells = []
        for ipc in args.ipcs:
            found = [runs[f"{label}|{ipc}|{s}"] for s in seeds if f"{label}|{ipc}|{s}" in runs]
            cells.append(cost(found, ["distill_seconds", "eval_seconds", "soft_eval_seconds"]) if found else "not run")
        print(f"| {label} | " + " | ".join(cells) + " |")
    if full:
        print(f"| full train split ({args.full_evals} network per seed) | {cost(full, ['eval_seconds'])} |")
    if results.get("teacher_seconds"):
        cpu = results.get("teacher_cpu_seconds", {})
        print("  DWA teacher training (once per seed, shared by every DWA row): " + ", ".join(
            f"seed {s}: {v:.0f} s" + (f" (CPU {cpu[s]:.0f})" if s in cpu else "")
            for s, v in results["teacher_seconds"].items()))

    if "timing" in results:
        timing = results["timing"]
        others = [lbl for lbl, eng, *_ in args.rows
                  if eng not in ("random", "dm") and f"{lbl}|{args.ipcs[0]}" in timing]
        print("\nWall time of one distillation iteration, as a ratio to DM's at the same IPC (interleaved rounds)")
        print("| IPC | DM (s) | " + " | ".join(others) + " |")
        print("|---|---|" + "---|" * len(others))
        for ipc in args.ipcs:
            dm = timing[f"DM|{ipc}"]
            print(f"| {ipc} | {dm:.4f} | " + " | ".join(f"{timing[f'{lbl}|{ipc}'] / dm:.2f}" for lbl in others) + " |")

    print("\nDWA within-class diversity (mean pairwise teacher-embedding distance), ratio to SRe2L's:")
    for ipc in [i for i in args.ipcs if i > 1]:
        base = [runs[f"SRe2L|{ipc}|{s}"]["diversity"] for s in seeds if f"SRe2L|{ipc}|{s}" in runs]
        for label in [lbl for lbl in dwa_rows if lbl != "SRe2L"]:
            found = [runs[f"{label}|{ipc}|{s}"]["diversity"] for s in seeds if f"{label}|{ipc}|{s}" in runs]
            if base and found:
                d, r = statistics.fmean(found), statistics.fmean(base)
                print(f"  IPC {ipc}: {label} {d:.3f} vs SRe2L {r:.3f} (ratio {d / r:.3f})")
    if results.get("teacher"):
        print("  teacher test accuracy: " + ", ".join(f"{100 * v:.2f}" for v in results["teacher"].values()))

    control = results.get("mirror_control", {})
    for label in ("DM", "DM+FYI"):
        accs = [a for seed in seeds for a in control.get(f"{label}|1|{seed}", [])]
        if accs:
            s = summary(accs)
            print(f"mirror digits, IPC 1, {label}: {100 * s['mean']:.2f} ± {100 * s['std']:.2f}")


if __name__ == "__main__":
    main()
