"""Benchmark: BK-SDM's and A-SDM's pruned UNets against the SD-1.5 teacher, and the redundancy report.

On a randomly initialised ``UNet2DConditionModel`` with SD-1.5's exact configuration (860M
parameters, built locally), batch ``--batch``, 64x64
latents (512 px), 77 text tokens, for the teacher and each student of
:func:`genforge.sd.prune`:

- parameters;
- MACs of one forward, counted by ``torch.utils.flop_counter.FlopCounterMode`` (attention
  scores included; the "conv+linear" column leaves them out, which is how BK-SDM's 339G/224G/218G/
  206G were counted);
- UNet forward latency: median of ``--repeats`` timed calls after ``--warmup``, teacher and
  student called alternately so that both see the same machine load;
- the pipeline step (for ``--pipeline-variants``): one denoising step of a stock diffusers
  ``StableDiffusionPipeline`` (classifier-free guidance, so the UNet runs on 2x the batch, plus
  the PNDM scheduler step), timed the same way.

Weights are N(0, 0.02) (speed does not depend on them); MACs are counted on the meta device.

``--step-table``: only the pipeline step, for every plan of ``--variants``, as a ratio to the
teacher measured in the same process: one warm-up teacher step, then ``--pipeline-repeats`` rounds
of teacher, plan 1, teacher, plan 2, ..., teacher; a plan's ratio in a round is its step time over
the mean of the two teacher steps around it (so both see the same machine load), and the table
gives the median over rounds.

The A-SDM rows separate its components: ``asdm`` (CLME-CondConv + GRI), ``asdm: CondConv only``,
``asdm: GRI only`` (both off is bk-small). Ratios are student / teacher from the same run.

``--redundancy``: the per-block table of :func:`genforge.sd.redundancy.redundancy_report`
(MAC share, latency share, output change when skipped) and a bar chart PNG, for the SD-1.5
teacher (MAC and latency shares only: on random weights the output change says nothing) or, with
``--teacher-run``, for a trained teacher UNet saved by ``recipes/asdm/teacher_digits.yaml``.

``--quality RUN ...``: the digits quality table from finished runs of
``recipes/asdm/teacher_digits.yaml`` and the distillation recipes (each run's
``sample_metrics.json`` and saved ``recipe.yaml``): runs that differ only in ``seed`` form one row,
FID (digits CNN) and classifier agreement as mean ± std over them, beside the UNet's parameters.
``--teacher-sampling-seeds`` samples and scores the teacher run's saved pipeline again at more
sampling seeds (the run itself scored one, seed + 1; the students of seeds 0-2 sample at 1-3),
so that the teacher's row has the sampling spread the students' rows have.

Run: ``OMP_NUM_THREADS=1 nice -n 5 python eval/benchmarks/asdm.py --out docs/benchmarks/asdm``
(about 10 CPU-minutes; defaults: one timed call each, no warm-up, as a busy 2-core machine allows).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml
from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from genforge.sd import SD15_UNET_CONFIG, prune
from genforge.sd.redundancy import count_macs, redundancy_report

VARIANTS = {
    "bk-base": ("bk-base", None),
    "bk-small": ("bk-small", None),
    "bk-tiny": ("bk-tiny", None),
    "asdm": ("asdm", {}),
    "asdm: CondConv only": ("asdm", {"gri": False}),
    "asdm: GRI only": ("asdm", {"condconv": False}),
}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def side_by_side(teacher_fn, student_fn, warmup: int, repeats: int, device: str) -> tuple[float, float]:
    """Median seconds of teacher and student, called alternately."""
    times = ([], [])
    for i in range(warmup + repeats):
        for j, fn in enumerate((teacher_fn, student_fn)):
            seconds = timed(fn, device)
            if i >= warmup:
                times[j].append(seconds)
    return statistics.median(times[0]), statistics.median(times[1])


def sd15_scheduler() -> PNDMScheduler:
    """SD-1.5's scheduler config (PNDM, scaled-linear betas)."""
    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                         steps_offset=1, set_alpha_to_one=False)


def pipeline_step(unet, embeds):
    """One denoising step of a stock StableDiffusionPipeline (CFG), latents out."""
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=sd15_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return lambda: pipe(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), num_inference_steps=1,
                        guidance_scale=7.5, output_type="latent", generator=torch.Generator().manual_seed(0))


def step_table(args) -> dict:
    """Pipeline-step seconds of each plan and of the teacher steps around it (see ``--step-table``)."""
    device, dtype = args.device, getattr(torch, args.dtype)
    teacher = random_unet(device, dtype)
    embeds = torch.randn(args.batch, 77, 768, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    teacher_step = pipeline_step(teacher, embeds)
    results = {name: {"step_s": [], "teacher_step_s": [], "ratios": []} for name in args.variants}
    with torch.inference_mode():
        timed(teacher_step, device)  # warm-up
        before = timed(teacher_step, device)
        for _ in range(args.pipeline_repeats):
            for name in args.variants:
                plan, options = VARIANTS[name]
                student = prune(teacher, plan, options).eval()
                seconds = timed(pipeline_step(student, embeds), device)
                del student
                after = timed(teacher_step, device)
                row = results[name]
                row["step_s"].append(seconds)
                row["teacher_step_s"].append([before, after])
                row["ratios"].append(seconds / ((before + after) / 2))
                row["ratio"] = statistics.median(row["ratios"])
                print(name, seconds, before, after, flush=True)
                before = after
    return results


def step_markdown(results: dict) -> str:
    lines = ["| UNet | pipeline step s (per round) | teacher steps around it, s | ratio per round | median step "
             "ratio | step faster |", "|---|---:|---:|---:|---:|---:|"]
    for name, row in results.items():
        lines.append(f"| {name} | {', '.join(f'{t:.1f}' for t in row['step_s'])} | "
                     f"{'; '.join(f'{a:.1f}, {b:.1f}' for a, b in row['teacher_step_s'])} | "
                     f"{', '.join(f'{r:.2f}' for r in row['ratios'])} | {row['ratio']:.2f} | {1 - row['ratio']:.0%} |")
    return "\n".join(lines)


def macs(unet, inputs) -> tuple[int, int]:
    """(all MACs, MACs without attention scores) of one forward."""
    count = count_macs(lambda: unet(*inputs))
    return count.total, count.total - count.attention


def random_unet(device, dtype) -> UNet2DConditionModel:
    """SD-1.5's UNet with N(0, 0.02) weights (built on the meta device, then filled: fast; timing and
    MACs do not depend on the values)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    unet = unet.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for param in unet.parameters():
            param.normal_(0, 0.02, generator=generator)
    return (unet if dtype == torch.float32 else unet.to(dtype)).eval()


def measure(args) -> dict:
    device, dtype = args.device, getattr(torch, args.dtype)
    with torch.device("meta"):
        meta_teacher = UNet2DConditionModel(**SD15_UNET_CONFIG)
        meta_inputs = (torch.zeros(args.batch, 4, 64, 64), torch.full((args.batch,), 500), torch.zeros(args.batch, 77, 768))
    teacher = random_unet(device, dtype)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(args.batch, 4, 64, 64, generator=generator).to(device, dtype)
    embeds = torch.randn(args.batch, 77, 768, generator=generator).to(device, dtype)
    inputs = (latents, torch.full((args.batch,), 500, device=device), embeds)
    results = {"teacher": {"params": teacher.num_parameters()}}
    with torch.inference_mode():
        results["teacher"]["macs"], results["teacher"]["macs_conv_linear"] = macs(meta_teacher, meta_inputs)
        for name in args.variants:
            plan, options = VARIANTS[name]
            row = {}
            row["macs"], row["macs_conv_linear"] = macs(prune(meta_teacher, plan, options), meta_inputs)
            student = prune(teacher, plan, options).eval()
            row["params"] = student.num_parameters()
            row["teacher_s"], row["s"] = side_by_side(lambda: teacher(*inputs), lambda: student(*inputs), args.warmup,
                                                      args.repeats, device)
            if name in args.pipeline_variants:
                row["teacher_step_s"], row["step_s"] = side_by_side(pipeline_step(teacher, embeds),
                                                                    pipeline_step(student, embeds), 0,
                                                                    args.pipeline_repeats, device)
            results[name] = row
            print(name, row, flush=True)
            del student
    return results


def table(results: dict) -> str:
    teacher = results["teacher"]
    lines = ["| UNet | params (M) | params ratio | GMACs | GMACs conv+linear | MACs ratio | forward s | forward ratio "
             "| forward faster | pipeline step s | step ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| SD-1.5 teacher | {teacher['params'] / 1e6:.1f} | 1.00 | {teacher['macs'] / 1e9:.1f} | "
             f"{teacher['macs_conv_linear'] / 1e9:.1f} | 1.00 | (per row) | 1.00 | 0% | (per row) | 1.00 |"]
    for name, row in results.items():
        if name == "teacher":
            continue
        forward = row["s"] / row["teacher_s"]
        step = "not measured | -"
        if "step_s" in row:
            step = f"{row['step_s']:.2f} (teacher {row['teacher_step_s']:.2f}) | {row['step_s'] / row['teacher_step_s']:.2f}"
        lines.append(f"| {name} | {row['params'] / 1e6:.1f} | {row['params'] / teacher['params']:.2f} | "
                     f"{row['macs'] / 1e9:.1f} | {row['macs_conv_linear'] / 1e9:.1f} | "
                     f"{row['macs'] / teacher['macs']:.2f} | {row['s']:.2f} (teacher {row['teacher_s']:.2f}) | "
                     f"{forward:.2f} | {1 - forward:.0%} | {step} |")
    return "\n".join(lines)


def redundancy(args) -> list[dict]:
    """The report for the random SD-1.5 UNet (random latents and embeddings), or for a trained digits
    teacher on noisy training digits with their class-name prompts."""
    if not args.teacher_run:
        generator = torch.Generator().manual_seed(1)
        inputs = (torch.randn(1, 4, 64, 64, generator=generator), torch.tensor([500]),
                  torch.randn(1, 77, 768, generator=generator))
        return redundancy_report(random_unet("cpu", torch.float32), *inputs, output_change=False, repeats=args.repeats)
    from genforge.data import build_dataset
    from genforge.sd.method import _scheduler, load_text_to_image_pipeline
    from genforge.sd.text import digit_prompt, encode_prompts

    pipe = load_text_to_image_pipeline(Path(args.teacher_run) / "pipeline")
    dataset = build_dataset("digits", split="train", image_size=pipe.unet.config.sample_size, resize="pad")
    images, labels = dataset.images[:args.redundancy_batch], dataset.labels[:args.redundancy_batch]
    timesteps = torch.linspace(20, 980, args.redundancy_batch).long()
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    noisy = _scheduler().add_noise(images, noise, timesteps)
    embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, [digit_prompt(int(y)) for y in labels])
    return redundancy_report(pipe.unet.eval(), noisy, timesteps, embeds, output_change=True, repeats=args.repeats)


def redundancy_outputs(rows: list[dict], out: Path, name: str, title: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("mac_share", "latency_share", "output_change") if rows[0].get(k) is not None]
    figure, axis = plt.subplots(figsize=(12, 4))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        axis.bar([x + i * width for x in range(len(rows))], [row[key] for row in rows], width, label=key)
    axis.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], [row["unit"] for row in rows], rotation=60)
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / f"{name}.png", dpi=100)
    lines = ["| block | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    lines += [f"| {row['unit']} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def run_label(recipe: dict) -> str:
    """A row name from a run's saved recipe: the teacher, or plan + incubation + distillation steps."""
    steps = recipe["train"]["max_steps"]
    if recipe["method"] == "sd_text_to_image":
        return f"teacher ({steps} steps)"
    model = recipe["model"]
    incubation = model.get("incubation_steps", 0)
    how = f", incubation {incubation}/stage" if incubation else (", no incubation" if model.get("plan") == "asdm" else "")
    return f"{model.get('plan', 'bk-small')} student ({steps} steps{how})"


def resample(run: Path, seed: int) -> dict:
    """FID and agreement of a finished digits run's saved pipeline, sampled as the run did but from ``seed``."""
    from genforge.config import load_recipe
    from genforge.methods.sampling import score_samples
    from genforge.sd.method import _generate, load_text_to_image_pipeline
    from genforge.sd.text import digit_prompt

    recipe = load_recipe(run / "recipe.yaml")
    pipe = load_text_to_image_pipeline(run / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(recipe.eval.num_samples) % 10
    images = _generate(pipe, [digit_prompt(int(y)) for y in labels], recipe, seed, f"sampling seed {seed}")
    return {**score_samples(images, labels, recipe), "unet_parameters": pipe.unet.num_parameters()}


def quality_table(runs: list[Path], teacher_seeds: list[int] = ()) -> str:
    """Mean ± std of FID and agreement over the seeds of each distinct recipe (and, for teacher runs, over
    ``teacher_seeds`` more sampling seeds)."""
    rows = defaultdict(list)
    for run in runs:
        metrics_file = run / "sample_metrics.json"
        if not metrics_file.is_file():
            raise SystemExit(f"{run}: no sample_metrics.json (the run has not finished)")
        recipe = yaml.safe_load((run / "recipe.yaml").read_text())
        rows[run_label(recipe)].append(json.loads(metrics_file.read_text()))
        if recipe["method"] == "sd_text_to_image":
            rows[run_label(recipe)] += [resample(run, seed) for seed in teacher_seeds]

    def stat(values, digits):
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"

    lines = ["| model | UNet params | runs | FID (digits CNN) | classifier agreement |", "|---|---:|---:|---:|---:|"]
    for label, found in rows.items():
        lines.append(f"| {label} | {found[0]['unet_parameters'] / 1e6:.2f}M | {len(found)} | "
                     f"{stat([m['fid'] for m in found], 1)} | {stat([m['classifier_agreement'] for m in found], 3)} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--pipeline-repeats", type=int, default=1)
    parser.add_argument("--pipeline-variants", nargs="*", default=["bk-small", "asdm"], choices=list(VARIANTS))
    parser.add_argument("--skip-latency", action="store_true", help="only the redundancy report")
    parser.add_argument("--step-table", action="store_true",
                        help="only the pipeline step of every --variants plan, ratios to the teacher")
    parser.add_argument("--redundancy", action="store_true")
    parser.add_argument("--redundancy-batch", type=int, default=256, help="digits teacher only")
    parser.add_argument("--teacher-run", help="a recipes/asdm/teacher_digits.yaml run directory (redundancy only)")
    parser.add_argument("--quality", nargs="+", type=Path, metavar="RUN",
                        help="only the digits quality table of these finished teacher/distillation runs")
    parser.add_argument("--teacher-sampling-seeds", nargs="*", type=int, default=[],
                        help="with --quality: score the teacher runs' pipelines at these sampling seeds too")
    parser.add_argument("--out", type=Path, default=Path("asdm_benchmark"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.quality:
        print(quality_table(args.quality, args.teacher_sampling_seeds))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {args.device}, {args.dtype}, {torch.get_num_threads()} threads, batch "
          f"{args.batch}")
    if args.step_table:
        results = step_table(args)
        (args.out / "pipeline_step.json").write_text(json.dumps(results, indent=1))
        print(step_markdown(results))
    elif not args.skip_latency:
        results = measure(args)
        (args.out / "latency.json").write_text(json.dumps(results, indent=1))
        print(table(results))
    if args.redundancy:
        rows = redundancy(args)
        name = "redundancy_digits" if args.teacher_run else "redundancy_sd15"
        (args.out / f"{name}.json").write_text(json.dumps(rows, indent=1))
        title = "digits teacher" if args.teacher_run else "SD-1.5 UNet, random init (no output change)"
        print(redundancy_outputs(rows, args.out, name, title))


if __name__ == "__main__":
    main()
