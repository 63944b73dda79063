"""Benchmarks of ARFlow (arXiv 2501.16085): hybrid attention cost, per-step sampling cost, ARFlow vs SiT.

Three subcommands, each printing markdown tables for docs/benchmarks.md:

- ``attention``: :func:`genforge.core.attention.chunk_hybrid_attention` against full softmax
  attention over the whole sequence, at 2, 4, 8, 16 and 32 chunks of 64 tokens (B=1, H=6, D=64,
  float32; forward + backward, as in training). Full attention runs twice: fused
  (:func:`genforge.core.attention.attention`, SDPA's flash kernel on CPU, which never forms the
  score matrix) and materialised (:func:`naive_attention`, the (L x L) matrix). Time: median of
  ``--repeats`` calls; peak memory: growth of the peak resident set of a fresh interpreter during
  one forward + backward (the method of eval/benchmarks/attention.py, whose helpers are used,
  with glibc's mmap threshold fixed at 64 KiB so that it follows the live tensors; see peak_mib).
  The exponent a of cost ~ chunks^a is a least-squares fit in log-log over the five sizes.
- ``sampling``: the cost of one sampling step as the carried state absorbs more iterates. The
  ARFlow ``digits`` network (random weights) samples 250 SDE steps with CFG; every network call
  is timed, and its FLOPs counted by torch's FlopCounterMode at calls 1, 2 and 250.
- ``vs-sit``: ``recipes/arflow/digits.yaml`` against ``recipes/arflow/sit_digits.yaml`` (equal
  parameters, same objective, sampler and images per step) at equal wall time: the seconds per
  training step of both are measured side by side in this process (alternating, ``--probe-steps``
  each), the SiT step budget is ARFlow's ``--steps`` times the ratio, and both recipes are then
  trained and scored (FID on the digits CNN, classifier agreement) for each ``--seeds``.

Run (from the repository root): ``python eval/benchmarks/arflow.py attention``,
``... sampling``, ``... vs-sit --steps 500 --seeds 0``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention as attention_benchmark  # noqa: E402  (eval/benchmarks/attention.py: RSS helpers)

from genforge.core.attention import attention, chunk_hybrid_attention, naive_attention  # noqa: E402

CHUNK, HEADS, HEAD_DIM = 64, 6, 64
IMPLEMENTATIONS = {
    "hybrid": lambda q, k, v, g: chunk_hybrid_attention(q, k, v, g, CHUNK)[0],
    "full (SDPA, fused)": lambda q, k, v, g: attention(q, k, v),
    "full (materialised)": lambda q, k, v, g: naive_attention(q, k, v),
}


def attention_inputs(chunks: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(chunks)
    length = chunks * CHUNK
    q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM, generator=generator) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(1, HEADS, length, generator=generator)) / 16
    return [t.requires_grad_() for t in (q, k, v, g)]


def forward_backward(name: str, inputs: list[torch.Tensor]) -> None:
    IMPLEMENTATIONS[name](*inputs).square().mean().backward()
    for t in inputs:
        t.grad = None


def time_ms(name: str, chunks: int, repeats: int) -> float:
    inputs = attention_inputs(chunks)
    forward_backward(name, inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward_backward(name, inputs)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure_rss(name: str, chunks: int) -> None:
    """Child-process mode: print the peak RSS growth (MiB) of one forward + backward."""
    inputs = attention_inputs(chunks)
    forward_backward(name, attention_inputs(1))  # load kernels, start the thread pool
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = attention_benchmark.proc_status_kib("VmRSS")
    forward_backward(name, inputs)
    print((attention_benchmark.proc_status_kib("VmHWM") - before) / 1024)


def peak_mib(name: str, chunks: int) -> float:
    """Peak RSS growth of one forward + backward in a fresh interpreter whose glibc malloc maps
    every block over 64 KiB on its own (``MALLOC_MMAP_THRESHOLD_``) and unmaps it when freed. With
    glibc's default, dynamic threshold, freed blocks below the largest freed so far stay in the
    heap, so the high-water mark depends on the order of allocations (it varied by +-10 MiB
    between identical runs of the hybrid); with a fixed threshold it follows the live tensors
    (+-0.1 MiB)."""
    command = [sys.executable, os.path.abspath(__file__), "measure-rss", name, str(chunks)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return float(result.stdout.strip().splitlines()[-1])


def exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def run_attention(args: argparse.Namespace) -> None:
    print(f"B=1 H={HEADS} D={HEAD_DIM} chunk={CHUNK} float32 forward+backward threads={torch.get_num_threads()} "
          f"torch={torch.__version__}, median of {args.repeats}\n")
    names = list(IMPLEMENTATIONS)
    rows = {name: {"ms": [], "mib": []} for name in names}
    print("| chunks | tokens | " + " | ".join(f"{n} ms" for n in names) + " | "
          + " | ".join(f"{n} MiB" for n in names) + " | time full/hybrid (fused, materialised) | "
          "memory full/hybrid (fused, materialised) |")
    print("|" + "---:|" * (2 + 2 * len(names) + 2))
    for chunks in args.chunks:
        for name in names:
            rows[name]["ms"].append(time_ms(name, chunks, args.repeats))
            rows[name]["mib"].append(peak_mib(name, chunks))
        ms = [rows[n]["ms"][-1] for n in names]
        mib = [rows[n]["mib"][-1] for n in names]
        print(f"| {chunks} | {chunks * CHUNK} | " + " | ".join(f"{x:.1f}" for x in ms) + " | "
              + " | ".join(f"{x:.1f}" for x in mib) + f" | {ms[1] / ms[0]:.2f}, {ms[2] / ms[0]:.2f} | "
              f"{mib[1] / max(mib[0], 1e-9):.2f}, {mib[2] / max(mib[0], 1e-9):.2f} |", flush=True)
    print("\n| implementation | time exponent | memory exponent |\n|---|---:|---:|")
    for name in names:
        print(f"| {name} | {exponent(args.chunks, rows[name]['ms']):.2f} | "
              f"{exponent(args.chunks, rows[name]['mib']):.2f} |")


def run_sampling(args: argparse.Namespace) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from genforge.models.arflow import ARFlowModel, arflow_config
    from genforge.pipelines.arflow import ARFlowPipeline

    torch.manual_seed(0)
    model = ARFlowModel(**arflow_config("digits")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    seconds, flops, starts = [], [], []
    model.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
    model.register_forward_hook(lambda *_: seconds.append(time.perf_counter() - starts[-1]))
    counter_at = {1, 2, args.steps}  # call 1 starts from an empty state, calls 2.. carry one

    class Counted(ARFlowPipeline):
        def model_velocity(self, x, t, labels, cache):
            if len(seconds) + 1 in counter_at:
                with FlopCounterMode(display=False) as counter:
                    out = super().model_velocity(x, t, labels, cache)
                flops.append(counter.get_total_flops())
                return out
            return super().model_velocity(x, t, labels, cache)

    pipe = Counted(model)
    pipe.set_progress_bar_config(disable=True)
    pipe(torch.arange(args.batch) % 10, guidance_scale=2.0, num_inference_steps=args.steps, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    first, last = statistics.median(seconds[:10]), statistics.median(seconds[-10:])
    print(f"ARFlow digits network (1.18M parameters), batch {args.batch} with CFG ({2 * args.batch} rows per call), "
          f"{args.steps} SDE steps, threads={torch.get_num_threads()}\n")
    print("| | steps 1-10 | steps " + f"{args.steps - 9}-{args.steps}" + " | ratio |\n|---|---:|---:|---:|")
    print(f"| median ms per call | {1000 * first:.2f} | {1000 * last:.2f} | {last / first:.3f} |")
    print(f"| FLOPs of call 2 / call {args.steps} | {flops[1]:,} | {flops[2]:,} | {flops[2] / flops[1]:.3f} |")
    print(f"\n(Call 1 starts from an empty state and skips the cross-image term: {flops[0]:,} FLOPs.)")


def step_seconds(recipes: list[str], probe_steps: int) -> list[float]:
    """Seconds per training step of each recipe, measured alternately in this process."""
    from genforge.config import load_recipe
    from genforge.train import get_method

    runs = []
    for path in recipes:
        recipe = load_recipe(path)
        method = get_method(recipe.method)(recipe)
        model = method.build_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loader = torch.utils.data.DataLoader(method.train_dataset(), batch_size=recipe.data.batch_size, shuffle=True)
        runs.append((method, model, optimizer, iter(loader)))
    totals = [0.0] * len(runs)
    for _ in range(probe_steps):
        for i, (method, model, optimizer, batches) in enumerate(runs):
            start = time.perf_counter()
            loss, _ = method.training_step(model, next(batches))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            totals[i] += time.perf_counter() - start
    return [total / probe_steps for total in totals]


def run_vs_sit(args: argparse.Namespace) -> None:
    recipes = ["recipes/arflow/digits.yaml", "recipes/arflow/sit_digits.yaml"]
    if args.sit_steps is None:
        arflow_s, sit_s = step_seconds(recipes, args.probe_steps)
        sit_steps = round(args.steps * arflow_s / sit_s)
        print(f"seconds per step side by side: ARFlow {arflow_s:.3f}, SiT {sit_s:.3f}; ", end="")
    else:
        sit_steps = args.sit_steps
    print(f"budgets: ARFlow {args.steps}, SiT {sit_steps} steps\n", flush=True)
    results = {}
    for path, steps in zip(recipes, (args.steps, sit_steps)):
        for seed in args.seeds:
            out = Path(args.output_dir) / f"{Path(path).stem}_seed{seed}"
            command = [sys.executable, "-m", "genforge.train", path, "--max-steps", str(steps), "--output-dir",
                       str(out), "--set", f"seed={seed}"]
            start, wall = time.perf_counter(), float("nan")
            if (out / "checkpoints" / f"step_{steps:07d}").is_dir() and (out / "metrics.json").is_file():
                print(f"{out}: finished at step {steps}, not run again (wall time not re-measured)")
            else:
                subprocess.run(command, check=True, capture_output=True, text=True)
                wall = time.perf_counter() - start
            metrics = json.loads((out / "metrics.json").read_text())
            results.setdefault(path, []).append((metrics["fid"], metrics["classifier_agreement"], wall))
            print(f"{path} seed {seed}: {results[path][-1]}", flush=True)
    print("\n| recipe | steps | FID (digits CNN) | agreement | wall time of the run (s) |\n|---|---:|---:|---:|---:|")
    for path, steps in zip(recipes, (args.steps, sit_steps)):
        fid, agreement, wall = zip(*results[path])
        wall = [w for w in wall if w == w] or [float("nan")]  # runs timed in this call only
        spread = lambda xs: f"{statistics.fmean(xs):.3f}" + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")  # noqa: E731
        print(f"| {path} | {steps} | {spread(fid)} | {spread(agreement)} | {spread(wall)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    att = commands.add_parser("attention", help="hybrid vs full attention cost")
    att.add_argument("--chunks", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    att.add_argument("--repeats", type=int, default=5)
    sam = commands.add_parser("sampling", help="per-step sampling cost, step 1 vs the last")
    sam.add_argument("--steps", type=int, default=250)
    sam.add_argument("--batch", type=int, default=8)
    vs = commands.add_parser("vs-sit", help="ARFlow vs SiT on digits at equal wall time")
    vs.add_argument("--steps", type=int, default=500, help="ARFlow's step budget")
    vs.add_argument("--probe-steps", type=int, default=10)
    vs.add_argument("--sit-steps", type=int, help="SiT's step budget (default: ARFlow's times the seconds-per-step "
                    "ratio measured side by side now); give the first run's to add seeds to it")
    vs.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    vs.add_argument("--output-dir", default="runs/arflow_vs_sit")
    rss = commands.add_parser("measure-rss", help=argparse.SUPPRESS)
    rss.add_argument("name")
    rss.add_argument("chunks", type=int)
    args = parser.parse_args()
    if args.command == "measure-rss":
        measure_rss(args.name, args.chunks)
    else:
        {"attention": run_attention, "sampling": run_sampling, "vs-sit": run_vs_sit}[args.command](args)


if __name__ == "__main__":
    main()
