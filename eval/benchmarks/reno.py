"""ReNO (arXiv 2406.04312) against best-of-N at equal wall time on digits, and its memory.

``digits``: on a trained digits pipeline (``genforge train recipes/dimr/digits.yaml`` writes
``runs/dimr_digits/pipeline``), for each seed, ``--per-class`` latents per class are
(a) sampled as they are (the initial images), (b) optimised by ReNO with the shipped digits
CNN's log p(class) as the reward, (c) replaced by the best of N random latents under the same
reward, with N = n_iters x (seconds of a ReNO iteration / seconds of a best-of-N candidate),
that ratio measured side by side in this process just before (alternating short runs), so
that both get the same wall time; the actual seconds of each are reported too. Every set is judged by an independent classifier that is not the reward (an
MLP, another architecture, trained with another seed by ``train-judge``; its own test accuracy
is printed and stored next to it): agreement with the wanted class, its mean log p(class), and
FID against the digits train split twice: on the judge's own 64-d features (independent of the
reward) and on the digits CNN's (torch-fidelity's extractor; that network is also the reward, so
that FID after optimisation is not independent of it). The reward classifier's own agreement is
shown too (how far the reward itself was pushed). ``--unconditional`` renders every latent with
the pipeline's null class (no conditioning) and asks the reward for the wanted class
(``reward_prompt``): a setting where a random draw is often not the wanted class (the
unconditional DiMR digits model makes an 8 about 38% of the time and a 2 about 1%), as a
compositional prompt often is not satisfied by a random text-to-image draw.

``memory``: a small SD-shaped text-to-image pipeline (random weights, the UNet/VAE of
diffusers' fast tests at ``--size`` pixels, a tiny CLIP reward): seconds per ReNO iteration
and peak memory with and without gradient checkpointing, each in a fresh process: on CPU the
growth of the peak resident size (``VmHWM``, reset after a no-grad render) over the resident
size then, as eval/benchmarks/attention.py measures it; on a GPU ``max_memory_allocated`` above
the memory allocated after that render.

    python eval/benchmarks/reno.py train-judge --out runs/bench_reno/judge_mlp.safetensors
    python eval/benchmarks/reno.py digits --pipeline runs/dimr_digits/pipeline --seeds 0 1 2
    python eval/benchmarks/reno.py digits --pipeline runs/dimr_digits/pipeline --seeds 0 1 2 --unconditional
    python eval/benchmarks/reno.py memory --size 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import proc_status_kib  # eval/benchmarks/attention.py, beside this script

from genforge.metrics.digits_classifier import INPUT_SIZE, JudgeCNN


class DigitsMLP(JudgeCNN):
    """The independent judge: a two-hidden-layer MLP on the 16x16 grey digit (no convolution)."""

    input_size = INPUT_SIZE

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(INPUT_SIZE * INPUT_SIZE, 256)
        self.fc2 = nn.Linear(256, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, self.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc2(F.relu(self.fc1(self.prepare(x).flatten(1)))))


def train_judge(out: Path, seed: int, epochs: int) -> dict:
    """Train :class:`DigitsMLP` like the digits CNN (both layouts, shifts) with ``seed``; save it."""
    from safetensors.torch import save_file

    from genforge.data.digits import DigitsDataset
    from genforge.metrics.digits_classifier import LAYOUTS, digits_test_accuracy, fit_classifier

    train = [DigitsDataset("train", image_size=INPUT_SIZE, resize=mode) for mode in LAYOUTS]
    torch.manual_seed(seed)
    model = fit_classifier(DigitsMLP(), torch.stack([d.images for d in train]), train[0].labels, seed=seed,
                           epochs=epochs, batch_size=64, lr=3e-3, max_shift=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    facts = {"architecture": "DigitsMLP (256-256-64-10)", "seed": seed, "epochs": epochs,
             "test_accuracy": {mode: round(digits_test_accuracy(model, mode), 4) for mode in LAYOUTS},
             "command": f"python eval/benchmarks/reno.py train-judge --out {out} --seed {seed} --epochs {epochs}"}
    out.with_suffix(".json").write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def judge_sets(sets: dict[str, tuple[torch.Tensor, torch.Tensor]], labels: torch.Tensor,
               judge: nn.Module) -> dict[str, dict]:
    """Per set of (images in [0, 1], reward losses): the judge's agreement, mean log p(class)
    and FID on its own features, the reward CNN's agreement and FID on its features (both FIDs
    against the digits train split), and the mean reward loss."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    from genforge.data.digits import DigitsDataset
    from genforge.metrics import classifier_agreement, compute_fidelity, load_digits_classifier

    real = DigitsDataset("train", image_size=8).images
    reward_cnn = load_digits_classifier()
    with torch.no_grad():
        real_stats = fid_features_to_statistics(judge.features(real).double())
    rows = {}
    for name, (images, reward_loss) in sets.items():
        signed = images * 2 - 1
        with torch.no_grad():
            judge_logp = judge(signed).log_softmax(-1).gather(1, labels[:, None]).mean().item()
            fake_stats = fid_features_to_statistics(judge.features(signed).double())
        judge_fid = fid_statistics_to_metric(fake_stats, real_stats, verbose=False)["frechet_inception_distance"]
        rows[name] = {"judge_agreement": classifier_agreement(signed, labels, judge), "judge_log_p": judge_logp,
                      "judge_fid": float(judge_fid),
                      "reward_cnn_agreement": classifier_agreement(signed, labels, reward_cnn),
                      "reward_loss": reward_loss.mean().item(), "fid": compute_fidelity(real, signed)["fid"]}
    return rows


def cost_ratio(pipe, labels, rewards, common, rounds: int = 2, k: int = 3) -> float:
    """Seconds of one ReNO iteration over seconds of one best-of-N candidate, measured side by
    side (alternating runs of ``k`` of each, ``rounds`` times, medians) so that the machine's
    load changes both alike."""
    from genforge.pipelines.reno import best_of_n, optimize

    reno, select = [], []
    for _ in range(rounds):
        history = optimize(pipe, labels, rewards, n_iters=k + 1, **common).history[:-1]  # the last takes no step
        reno += [float(h["seconds"]) for h in history]
        select += [float(h["seconds"]) for h in best_of_n(pipe, labels, rewards, n=k, **common).history]
    return statistics.median(reno) / statistics.median(select)


def digits(args) -> dict:
    import genforge.models  # noqa: F401 -- a saved DiMR pipeline names genforge.models.dimr, which must be imported
    from genforge.core.embed import null_class_of
    from genforge.metrics.digits_classifier import load_judge
    from genforge.pipelines import load_saved_pipeline
    from genforge.pipelines.reno import best_of_n, optimize

    judge_path = Path(args.judge)
    if not judge_path.is_file():
        print("training the independent judge:", json.dumps(train_judge(judge_path, args.judge_seed, args.judge_epochs)))
    judge = load_judge(DigitsMLP, judge_path, "eval.benchmarks.reno")
    judge_facts = json.loads(judge_path.with_suffix(".json").read_text())
    pipe = load_saved_pipeline(args.pipeline)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    # what the pipeline is conditioned on: the wanted class, or its null class (unconditional)
    condition = torch.full_like(labels, null_class_of(pipe.model)) if args.unconditional else labels
    rewards = {"digits-cnn": 1.0}
    common = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale, reward_prompt=labels)
    per_seed = []
    for seed in args.seeds:
        ratio = cost_ratio(pipe, condition, rewards, common)
        n = max(1, round(args.n_iters * ratio))
        start = time.perf_counter()
        reno = optimize(pipe, condition, rewards, n_iters=args.n_iters, lr=args.lr, grad_clip=args.grad_clip,
                        seed=seed, progress=True, **common)
        reno_seconds = time.perf_counter() - start
        start = time.perf_counter()
        select = best_of_n(pipe, condition, rewards, n=n, seed=seed, progress=True, **common)
        select_seconds = time.perf_counter() - start
        rows = judge_sets({"initial": (reno.initial_images, reno.initial_rewards["total"]),
                           "ReNO": (reno.images, reno.best_rewards["total"]),
                           "best-of-N": (select.images, select.best_rewards["total"])}, labels, judge)
        rows["ReNO"]["seconds"], rows["best-of-N"]["seconds"], rows["best-of-N"]["n"] = reno_seconds, select_seconds, n
        rows["best-of-N"]["cost_ratio"] = ratio
        per_seed.append(rows)
        print(f"seed {seed}: " + json.dumps(rows))
    summary = {name: {key: statistics.mean(r[name][key] for r in per_seed) for key in per_seed[0][name]}
               for name in per_seed[0]}
    spread = {name: {key: statistics.stdev(r[name][key] for r in per_seed) if len(per_seed) > 1 else 0.0
                     for key in ("judge_agreement", "judge_log_p", "judge_fid", "fid")} for name in per_seed[0]}
    result = {"judge": judge_facts, "settings": vars(args), "per_seed": per_seed, "mean": summary, "std": spread}
    print(f"\nindependent judge {judge_facts['architecture']}, test accuracy {judge_facts['test_accuracy']}")
    print(f"{'':10} {'judge agreement':>17} {'judge log p':>17} {'FID (judge)':>17} {'FID (digits CNN)':>18} "
          f"{'reward-CNN agr.':>16} {'-log p reward':>14} {'seconds':>8}")
    for name in summary:
        m, s = summary[name], spread[name]
        print(f"{name:10} {m['judge_agreement']:9.3f} ± {s['judge_agreement']:.3f} {m['judge_log_p']:9.3f} ± "
              f"{s['judge_log_p']:.3f} {m['judge_fid']:9.2f} ± {s['judge_fid']:5.2f} {m['fid']:10.2f} ± "
              f"{s['fid']:5.2f} {m['reward_cnn_agreement']:16.3f} {m['reward_loss']:14.4f} "
              f"{m.get('seconds', float('nan')):8.1f}")
    return result


def memory_probe(size: int, n_iters: int, checkpointing: str) -> dict:
    """One configuration in this (fresh) process: peak memory and seconds per iteration."""
    sys.path.insert(0, str(Path(__file__).parents[2] / "tests"))
    from tiny_reno_models import tiny_clip_model, write_clip_tokenizer

    from genforge.pipelines.reno import optimize, render
    from genforge.rewards import CLIPReward

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = write_clip_tokenizer(Path(f"/tmp/genforge_reno_bench_tok_{size}"))
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=size // 2, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37,
                                        num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=1000))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, safety_checker=None,
                                   scheduler=EulerDiscreteScheduler(timestep_spacing="trailing", steps_offset=1),
                                   feature_extractor=None, requires_safety_checker=False).to(device)
    reward = CLIPReward(tiny_clip_model(image_size=224), tokenizer, offset=100.0)
    with torch.no_grad():
        render(pipe, torch.randn(1, 4, size // 2, size // 2, device=device), ["a cat"])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:  # Linux: reset the peak-RSS counter (ru_maxrss would carry the parent's peak, see attention.py)
        Path("/proc/self/clear_refs").write_text("5")
        before = proc_status_kib("VmRSS") * 1024
    result = optimize(pipe, "a red cat", {"clip": 1.0}, models={"clip": reward}, n_iters=n_iters,
                      gradient_checkpointing=checkpointing == "on")
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else proc_status_kib("VmHWM") * 1024
    seconds = [float(h["seconds"]) for h in result.history[1:-1]] or [float(result.history[0]["seconds"])]
    return {"device": device, "size": size, "checkpointing": checkpointing,
            "peak_above_render_mib": (peak - before) / 2**20,
            "seconds_per_iteration": statistics.median(seconds)}


def memory(args) -> dict:
    rows = {}
    for setting in ("off", "on"):
        command = [sys.executable, __file__, "memory-probe", "--size", str(args.size), "--n-iters", str(args.n_iters),
                   "--checkpointing", setting]
        rows[setting] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    ratio = rows["on"]["peak_above_render_mib"] / rows["off"]["peak_above_render_mib"]
    print(f"{'checkpointing':14} {'peak MiB above a no-grad render':>32} {'s / iteration':>14}")
    for setting, row in rows.items():
        print(f"{setting:14} {row['peak_above_render_mib']:32.1f} {row['seconds_per_iteration']:14.3f}")
    print(f"memory ratio on/off: {ratio:.2f}; time ratio on/off: "
          f"{rows['on']['seconds_per_iteration'] / rows['off']['seconds_per_iteration']:.2f}")
    return {"rows": rows, "memory_ratio_on_off": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    judge = commands.add_parser("train-judge", help="train the independent digits judge (an MLP)")
    judge.add_argument("--out", default="runs/bench_reno/judge_mlp.safetensors")
    judge.add_argument("--seed", type=int, default=1)
    judge.add_argument("--epochs", type=int, default=40)
    dig = commands.add_parser("digits", help="ReNO vs best-of-N at equal wall time on a digits pipeline")
    dig.add_argument("--pipeline", default="runs/dimr_digits/pipeline")
    dig.add_argument("--judge", default="runs/bench_reno/judge_mlp.safetensors")
    dig.add_argument("--judge-seed", type=int, default=1)
    dig.add_argument("--judge-epochs", type=int, default=40)
    dig.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    dig.add_argument("--per-class", type=int, default=20)
    dig.add_argument("--n-iters", type=int, default=50)
    dig.add_argument("--lr", type=float, default=5.0)
    dig.add_argument("--grad-clip", type=float, default=0.1)
    dig.add_argument("--steps", type=int, default=4, help="sampler steps of the rendered pipeline")
    dig.add_argument("--guidance-scale", type=float, default=1.0)
    dig.add_argument("--unconditional", action="store_true",
                     help="render with the null class; only the reward asks for the wanted class")
    dig.add_argument("--out", default="runs/bench_reno/digits.json")
    mem = commands.add_parser("memory", help="peak memory and s/iteration with and without gradient checkpointing")
    mem.add_argument("--size", type=int, default=128, help="image size in pixels (latents are size / 2)")
    mem.add_argument("--n-iters", type=int, default=4)
    mem.add_argument("--out", default="runs/bench_reno/memory.json")
    probe = commands.add_parser("memory-probe", help=argparse.SUPPRESS)
    probe.add_argument("--size", type=int, required=True)
    probe.add_argument("--n-iters", type=int, required=True)
    probe.add_argument("--checkpointing", choices=["on", "off"], required=True)
    args = parser.parse_args()
    if args.command == "memory-probe":
        print(json.dumps(memory_probe(args.size, args.n_iters, args.checkpointing)))
        return
    if args.command == "train-judge":
        print(json.dumps(train_judge(Path(args.out), args.seed, args.epochs), indent=2))
        return
    result = digits(args) if args.command == "digits" else memory(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
