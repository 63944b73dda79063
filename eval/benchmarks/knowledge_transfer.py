"""Knowledge transfer on digits or MNIST-5k: a small student from scratch, with classic KD, MEAL V2,
from a reinforced dataset, a modular MoE student trained end to end with and without m2mKD first,
and knowledge concentration.

Every run is a shipped recipe of ``recipes/kd/`` with only its output directory, seed and (for
the students) teacher paths changed, trained through the one training loop and scored on the
test split (top-1 accuracy and 15-bin ECE of the EMA model). The recipes named ``*_digits``
below are the default; ``--dataset mnist5k`` runs their ``*_mnist`` twins instead (MNIST-5k
padded to 32x32, 1,000 student steps: the scratch control then trains 2,000):

- teachers (seed 0): ``teacher_resnet18_digits`` and ``teacher_moat_digits``;
- per seed, the ``test_efficientnet`` student of ``student_scratch_digits`` (300 steps),
  ``kd_digits``, ``meal_v2_digits`` (from scratch, equal steps), ``reinforced_student_digits``
  (on one reinforced dataset built by ``reinforce_digits`` from the same two teachers), and two
  controls: MEAL V2 started from that seed's scratch student (the paper's initialisation, 300
  more steps) and the scratch student trained for 600 steps (the same total);
- m2mKD: the ViT teacher and meta model (seed 0), then per seed ``m2mkd_digits`` and
  ``modular_student_digits`` from its modules against the same student from scratch;
- knowledge concentration, per seed: the three specialists of ``specialists_digits`` (one
  resnet10t per vertical {0,1,2}, {3,4,5,6}, {7,8,9}), the ``concentration_digits`` student
  taught by them, and two students of all 10 classes with the same budget (the
  concentration recipe's data, steps, optimiser and EMA): the same network (resnet10t under
  the FC-SC head with the self-paced scale) and loss (sigmoid CE) with one-hot targets instead
  of the specialists' (a control registered here, ``concentration_onehot_control``), and a
  plain resnet10t classifier (``classifier`` method, softmax CE). Every model is also scored
  within the verticals: a test digit counts as right when the argmax over its own vertical's
  classes is its label, the task each specialist solves (``vertical_metrics.json``, with the
  mean top-1 softmax confidence and, for the concentration head, the learnt scales gamma_v).

``--part cost`` times, in interleaved rounds in one process, an epoch of the student on the
reinforced dataset (replay, no teacher) against an epoch of online KD on the same augmentation
pipeline (augment, run both teachers, then the same student step), and plain training.
Every run's wall and CPU time are kept next to its metrics (``bench_seconds.json``) and reported per row.
A finished run (its metrics.json) is reused and a killed one resumes from its checkpoint, so
the parts resume, can run in parallel (different parts) and be split across sessions:

    python eval/benchmarks/knowledge_transfer.py --part students --seeds 0 1 2
    python eval/benchmarks/knowledge_transfer.py --part m2mkd --seeds 0 1 2
    python eval/benchmarks/knowledge_transfer.py --part concentration --seeds 0 1 2
    python eval/benchmarks/knowledge_transfer.py --part cost
    python eval/benchmarks/knowledge_transfer.py --report
    python eval/benchmarks/knowledge_transfer.py --dataset mnist5k --root runs/bench_kd_mnist --part students
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from genforge.config import load_recipe, read_yaml
from genforge.core.io import write_json
from genforge.data import build_dataset
from genforge.kd.concentration import ConcentrationMethod, Verticals, load_specialists, load_student, read_verticals
from genforge.kd.ensemble import TeacherEnsemble
from genforge.kd.losses import kd_kl_loss
from genforge.kd.reinforce import (ReinforcedDataset, ReinforcePipeline, dataset_tag, load_reinforce_recipe,
                                   run_reinforce_recipe)
from genforge.kd.teachers import load_classifier, load_teachers
from genforge.methods.classification import load_split, predict_logits
from genforge.train import register_method
from genforge.train.loop import train

RECIPES = Path("recipes/kd")
STUDENT_ROWS = ["scratch", "kd", "meal_v2", "reinforced", "meal_v2_from_scratch_student"]
M2MKD_ROWS = ["modular_scratch", "modular_m2mkd"]
CONCENTRATION_ROWS = ["all_classes_classifier", "all_classes_onehot", "concentration"]
VERTICAL_METRICS = "vertical_metrics.json"
SECONDS = "bench_seconds.json"
MAX_STEPS: dict = {}  # --max-steps N: {"train.max_steps": N} on every run (a quick end-to-end check)
DATASETS = {"digits": "digits", "mnist5k": "mnist"}  # --dataset -> the recipes' file suffix
SUFFIX = {"name": "digits"}  # set from --dataset


def recipe(base: str) -> str:
    """The recipe of ``base`` for the chosen dataset, e.g. ``kd`` -> ``kd_mnist``."""
    return f"{base}_{SUFFIX['name']}"


def student_steps() -> int:
    """The scratch student's steps (``--max-steps`` when given)."""
    return MAX_STEPS.get("train.max_steps") or read_yaml(RECIPES / f"{recipe('student_scratch')}.yaml")["train"]["max_steps"]


def scratch_control_row() -> str:
    """The scratch student trained for twice its recipe's steps (the total of MEAL V2 from it)."""
    return f"scratch_{2 * student_steps()}_steps"


@register_method("concentration_onehot_control")
class OneHotConcentrationControl(ConcentrationMethod):
    """Benchmark control: the concentration student's network and sigmoid CE with the one-hot label
    as the target over all classes, so no specialist is consulted (they are loaded, never run)."""

    def targets(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.one_hot(labels, self.verticals.num_classes).float()


def run(root: Path, name: str, base: str, seed: int, **overrides) -> dict:
    """Train the recipe of ``base`` (see :func:`recipe`) into ``root/name`` (reused when finished);
    its metrics. The wall and CPU time of the call are added to ``bench_seconds.json`` (a resumed
    run adds up; on a shared machine the CPU time of one thread is the steadier cost)."""
    out = root / name
    done = out / "metrics.json"
    if done.is_file() and json.loads(done.read_text()):
        return json.loads(done.read_text())
    settings = {"output_dir": str(out), "seed": seed, "train.max_minutes": None, **MAX_STEPS, **overrides}
    wall, cpu = time.perf_counter(), time.process_time()
    metrics = train(load_recipe(RECIPES / f"{recipe(base)}.yaml", settings), resume="auto").metrics
    add_seconds(out, time.perf_counter() - wall, time.process_time() - cpu)
    return metrics


def add_seconds(out: Path, seconds: float, cpu_seconds: float | None) -> None:
    """Add wall and CPU seconds to those kept in ``out/bench_seconds.json`` (CPU: None when not measured)."""
    path = out / SECONDS
    before = json.loads(path.read_text()) if path.is_file() else {"seconds": 0.0, "cpu_seconds": 0.0}
    cpu = None if cpu_seconds is None or before.get("cpu_seconds") is None else before["cpu_seconds"] + cpu_seconds
    write_json(path, {"seconds": before["seconds"] + seconds, "cpu_seconds": cpu})


def teachers(root: Path) -> list[str]:
    paths = []
    for name in ("resnet18", "moat"):
        run(root, f"teacher_{name}", f"teacher_{name}", 0)
        paths.append(str(root / f"teacher_{name}"))
    return paths


def reinforced_dir(root: Path, teacher_paths: list[str]) -> Path:
    out = root / "reinforced_data"
    config = load_reinforce_recipe(RECIPES / f"{recipe('reinforce')}.yaml",
                                   {"output_dir": str(out), "teachers": teacher_paths})
    summary = run_reinforce_recipe(config, progress=False)
    if summary["shards_written"]:
        add_seconds(out, summary["seconds"], None)
    (root / "reinforce_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return out


def students(root: Path, seeds: list[int]) -> None:
    teacher_paths = teachers(root)
    data_dir = reinforced_dir(root, teacher_paths)
    for seed in seeds:
        run(root, f"scratch_s{seed}", "student_scratch", seed)
        run(root, f"kd_s{seed}", "kd", seed, **{"model.teachers": teacher_paths})
        run(root, f"meal_v2_s{seed}", "meal_v2", seed, **{"model.teachers": teacher_paths})
        run(root, f"reinforced_s{seed}", "reinforced_student", seed,
            **{"model.reinforced_dir": str(data_dir)})
    control = scratch_control_row()
    for seed in seeds:
        run(root, f"meal_v2_from_scratch_student_s{seed}", "meal_v2", seed,
            **{"model.teachers": teacher_paths,
               "model.pretrained_file": str(root / f"scratch_s{seed}" / "model.safetensors")})
        run(root, f"{control}_s{seed}", "student_scratch", seed,
            **{"train.max_steps": int(control.split("_")[1])})


def m2mkd(root: Path, seeds: list[int]) -> None:
    run(root, "vit_teacher", "vit_teacher", 0)
    run(root, "meta", "meta", 0)
    paths = {"model.teacher": str(root / "vit_teacher"), "model.meta": str(root / "meta")}
    student = read_yaml(RECIPES / f"{recipe('m2mkd')}.yaml")["model"]["student"]
    meta_vit = read_yaml(RECIPES / f"{recipe('meta')}.yaml")["model"]["kwargs"]
    scratch_student = {**student, "meta_dim": meta_vit["embed_dim"], "patch_size": meta_vit["patch_size"]}
    for seed in seeds:
        run(root, f"m2mkd_modules_s{seed}", "m2mkd", seed, **paths)
        run(root, f"modular_m2mkd_s{seed}", "modular_student", seed,
            **{"model.m2mkd_run": str(root / f"m2mkd_modules_s{seed}")})
        run(root, f"modular_scratch_s{seed}", "modular_student", seed,
            **{"model.m2mkd_run": None, "model.student": scratch_student})


def vertical_scores(logits: torch.Tensor, labels: torch.Tensor, verticals: Verticals) -> dict:
    """Accuracy within each label's vertical (argmax over that vertical's classes only) and the
    mean top-1 softmax confidence over all classes, of all-class logits (n, N) in class-id order."""
    same_vertical = verticals.vertical_of[None, :] == verticals.vertical_of[labels][:, None]  # (n, N)
    within = logits.masked_fill(~same_vertical, float("-inf")).argmax(1) == labels
    return {"within_vertical_accuracy": float(within.float().mean()),
            "mean_confidence": float(logits.softmax(1).max(1).values.mean())}


def specialists_within_verticals(run_dir: Path, test_set, verticals: Verticals, batch_size: int) -> float:
    """Pooled accuracy of the specialists, each on the test digits of its own vertical."""
    specialists = load_specialists(run_dir, verticals, test_set.channels)
    labels = torch.tensor([int(y) for _, y in test_set])
    correct = 0
    for v, specialist in enumerate(specialists):
        rows = (verticals.vertical_of[labels] == v).nonzero(as_tuple=True)[0].tolist()
        logits, _ = predict_logits(specialist, torch.utils.data.Subset(test_set, rows), batch_size)
        group = torch.tensor(verticals.groups[v])
        correct += int((group[logits.argmax(1)] == labels[rows]).sum())
    return correct / len(labels)


def concentration(root: Path, seeds: list[int]) -> None:
    """Specialists, the concentration student and the two all-class students, per seed; then the
    within-vertical scores of each (``vertical_metrics.json`` next to its ``metrics.json``)."""
    for seed in seeds:
        specialists = root / f"conc_specialists_s{seed}"
        run(root, specialists.name, "specialists", seed)
        config = load_recipe(RECIPES / f"{recipe('concentration')}.yaml", {"model.specialists": str(specialists)})
        test_set, batch = load_split(config, "test"), config.eval.batch_size
        verticals = read_verticals(specialists)
        path = specialists / VERTICAL_METRICS
        if not path.is_file():
            accuracy = specialists_within_verticals(specialists, test_set, verticals, batch)
            path.write_text(json.dumps({"within_vertical_accuracy": accuracy}, indent=1))
        students = {
            "concentration": {},
            "all_classes_onehot": {"method": "concentration_onehot_control"},
            "all_classes_classifier": {"method": "classifier", "model": {"name": config.model["name"],
                                                                          "kwargs": config.model["kwargs"]}},
        }
        for row, overrides in students.items():
            out = root / f"{row}_s{seed}"
            run(root, out.name, "concentration", seed,
                **{"model.specialists": str(specialists), **overrides})
            if (out / VERTICAL_METRICS).is_file():
                continue
            if row == "all_classes_classifier":
                model = load_classifier(out, num_classes=verticals.num_classes, in_chans=test_set.channels)
                scales = {}
            else:
                model = load_student(out)
                scales = {"gamma": [round(g, 4) for g in model.head.scale.gamma.detach().tolist()]}
            scores = vertical_scores(*predict_logits(model, test_set, batch), verticals)
            (out / VERTICAL_METRICS).write_text(json.dumps({**scores, **scales}, indent=1))


def _epoch(student, optimizer, batches) -> float:
    """Seconds for one pass over ``batches`` (a generator doing its own data work) with the student step."""
    start = time.perf_counter()
    for images, targets in batches:
        loss = kd_kl_loss(student(images), temperature=1.0, teacher_probs=targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def cost(root: Path, rounds: int) -> None:
    """Epoch time: reinforced replay vs online KD (augment + teachers) vs plain training."""
    import timm

    directory = root / "reinforced_data"
    config = load_recipe(RECIPES / f"{recipe('reinforced_student')}.yaml", {"model.reinforced_dir": str(directory)})
    data = config.data
    train_set = build_dataset(data.name, split="train", image_size=data.image_size, resize=data.resize)
    replay = ReinforcedDataset(train_set, directory, p_replay=1.0,
                               dataset_name=dataset_tag(data, "train", train_set))
    pipeline = ReinforcePipeline.from_config(replay.manifest["pipeline"])
    ensemble = TeacherEnsemble(load_teachers([str(root / "teacher_resnet18"), str(root / "teacher_moat")],
                                             num_classes=10, in_chans=1))
    student = timm.create_model(config.model["name"], num_classes=10, in_chans=1)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    batch, n = data.batch_size, len(train_set) - len(train_set) % data.batch_size
    generator = torch.Generator().manual_seed(0)

    def reinforced_batches():
        loader = torch.utils.data.DataLoader(replay, batch_size=batch, shuffle=True, drop_last=True)
        yield from loader

    def online_kd_batches():
        order = torch.randperm(len(train_set), generator=generator)[:n]
        for first in range(0, n, batch):
            images = []
            for idx in order[first:first + batch].tolist():
                id2 = int(torch.randint(len(train_set), (1,), generator=generator))
                image, _ = pipeline.sample(train_set[idx][0], generator, partner=(id2, train_set[id2][0]))
                images.append(image)
            images = torch.stack(images)
            yield images, ensemble(images)

    def plain_batches():
        order = torch.randperm(len(train_set), generator=generator)[:n]
        for first in range(0, n, batch):
            idx = order[first:first + batch]
            yield train_set.images[idx], torch.nn.functional.one_hot(train_set.labels[idx], 10).float()

    times = {"reinforced": [], "online_kd": [], "plain": []}
    student.train()
    for _ in range(rounds):
        times["reinforced"].append(_epoch(student, optimizer, reinforced_batches()))
        times["online_kd"].append(_epoch(student, optimizer, online_kd_batches()))
        times["plain"].append(_epoch(student, optimizer, plain_batches()))
    result = {k: statistics.median(v) for k, v in times.items()}
    result["rounds"] = rounds
    result["threads"] = torch.get_num_threads()
    (root / "cost.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def report(root: Path) -> None:
    def collect(prefix: str) -> dict[str, list[float]]:
        found = {"test_accuracy": [], "test_ece": []}
        for path in sorted(root.glob(f"{prefix}_s*/metrics.json")):
            metrics = json.loads(path.read_text())
            for key in found:
                found[key].append(metrics[key])
        return found

    def table(rows: list[str], baseline: str, title: str) -> None:
        base = collect(baseline)["test_accuracy"]
        print(f"\n{title}\n")
        print("| student | seeds | test accuracy % | ECE | vs baseline (points) | / pooled std |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            found = collect(row)
            acc = found["test_accuracy"]
            if not acc:
                continue
            mean, std = _stats([100 * a for a in acc])
            ece_mean, ece_std = _stats(found["test_ece"])
            if row == baseline or len(base) < 2 or len(acc) < 2:
                delta = ratio = "-"
            else:
                base_mean, base_std = _stats([100 * a for a in base])
                pooled = math.sqrt((std ** 2 + base_std ** 2) / 2)
                delta = f"{mean - base_mean:+.2f}"
                ratio = f"{(mean - base_mean) / pooled:+.1f}" if pooled > 0 else "inf"
            print(f"| {row} | {len(acc)} | {mean:.2f} ± {std:.2f} | {ece_mean:.3f} ± {ece_std:.3f} | {delta} | {ratio} |")

    for name in ("teacher_resnet18", "teacher_moat", "vit_teacher", "meta"):
        path = root / name / "metrics.json"
        if path.is_file():
            metrics = json.loads(path.read_text())
            print(f"{name}: test accuracy {100 * metrics['test_accuracy']:.2f}%, ECE {metrics['test_ece']:.3f}")
    for seed_dir in sorted(root.glob("m2mkd_modules_s*/metrics.json")):
        metrics = json.loads(seed_dir.read_text())
        hybrids = {k: round(100 * v, 2) for k, v in metrics.items() if k.startswith(("hybrid", "student_test"))}
        print(f"{seed_dir.parent.name}: {hybrids}")
    table(STUDENT_ROWS + [scratch_control_row()], "scratch",
          f"Students (test_efficientnet, 0.10M parameters, {student_steps()} steps unless named), {SUFFIX['name']}")
    table(M2MKD_ROWS, "modular_scratch", "Modular MoE student, end to end (same steps)")
    concentration_table(root)
    cost_table(root)
    if (root / "cost.json").is_file():
        c = json.loads((root / "cost.json").read_text())
        print(f"\nEpoch time (median of {c['rounds']} interleaved rounds, {c['threads']} threads): "
              f"reinforced {c['reinforced']:.2f} s, online KD {c['online_kd']:.2f} s, plain {c['plain']:.2f} s; "
              f"reinforced / online KD = {c['reinforced'] / c['online_kd']:.2f}, "
              f"reinforced / plain = {c['reinforced'] / c['plain']:.2f}")


def concentration_table(root: Path) -> None:
    """Knowledge concentration: all-class accuracy and ECE, and accuracy within the verticals."""
    def stat(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
        if not values:
            return "-"
        mean, std = _stats([scale * v for v in values])
        return f"{mean:.{digits}f} ± {std:.{digits}f}"

    specialists = [json.loads(p.read_text())["within_vertical_accuracy"]
                   for p in sorted(root.glob(f"conc_specialists_s*/{VERTICAL_METRICS}"))]
    if not specialists:
        return
    print(f"\nKnowledge concentration (resnet10t, {SUFFIX['name']}, same data, steps and optimiser)\n")
    print("| model | seeds | test accuracy % (10 classes) | ECE | accuracy % within the vertical | "
          "mean confidence | gamma_v |")
    print("|---|---|---|---|---|---|---|")
    print(f"| specialists, each on its own vertical | {len(specialists)} | - | - | {stat(specialists)} | - | - |")
    for row in CONCENTRATION_ROWS:
        runs = sorted(root.glob(f"{row}_s*/{VERTICAL_METRICS}"))
        if not runs:
            continue
        metrics = [json.loads((p.parent / "metrics.json").read_text()) for p in runs]
        extra = [json.loads(p.read_text()) for p in runs]
        gammas = [e["gamma"] for e in extra if "gamma" in e]
        gamma = ("/".join(f"{statistics.mean(g[v] for g in gammas):.2f}" for v in range(len(gammas[0])))
                 if gammas else "-")
        print(f"| {row} | {len(runs)} | {stat([m['test_accuracy'] for m in metrics])} | "
              f"{stat([m['test_ece'] for m in metrics], 1.0, 3)} | "
              f"{stat([e['within_vertical_accuracy'] for e in extra])} | "
              f"{stat([e['mean_confidence'] for e in extra], 1.0, 3)} | {gamma} |")


def cost_table(root: Path) -> None:
    """Wall time of every row: the mean training time per seed, and each shared run's once."""
    def seconds(path: Path) -> dict | None:
        return json.loads((path / SECONDS).read_text()) if (path / SECONDS).is_file() else None

    def cpu(values: list[dict]) -> str:
        found = [v.get("cpu_seconds") for v in values]
        if None in found:
            return "-"
        mean, std = _stats(found)
        return f"{mean:.0f} ± {std:.0f}" if len(found) > 1 else f"{mean:.0f}"

    shared = {name: seconds(root / name) for name in
              ("teacher_resnet18", "teacher_moat", "reinforced_data", "vit_teacher", "meta")}
    rows = {}
    for run_dir in sorted(root.glob("*_s[0-9]*")):
        value = seconds(run_dir)
        if value is not None:
            rows.setdefault(run_dir.name.rsplit("_s", 1)[0], []).append(value)
    if not rows and not any(shared.values()):
        return
    print("\nTime per run (s, this CPU, as run; mean ± std over the seeds run)\n")
    print("| run | seeds | wall seconds | CPU seconds |")
    print("|---|---|---|---|")
    for name, value in shared.items():
        if value is not None:
            print(f"| {name} (shared, once) | - | {value['seconds']:.0f} | {cpu([value])} |")
    for name, values in rows.items():
        mean, std = _stats([v["seconds"] for v in values])
        print(f"| {name} | {len(values)} | {mean:.0f} ± {std:.0f} | {cpu(values)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("runs/bench_kd"))
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="digits",
                        help="digits: the *_digits recipes; mnist5k: their *_mnist twins (use another --root)")
    parser.add_argument("--part", choices=["students", "m2mkd", "concentration", "cost"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--max-steps", type=int, help="train every run of the part for this many steps "
                        "(a quick end-to-end check; use another --root)")
    args = parser.parse_args()
    SUFFIX["name"] = DATASETS[args.dataset]
    if args.max_steps is not None:
        MAX_STEPS["train.max_steps"] = args.max_steps
    if args.part == "students":
        students(args.root, args.seeds)
    elif args.part == "m2mkd":
        m2mkd(args.root, args.seeds)
    elif args.part == "concentration":
        concentration(args.root, args.seeds)
    elif args.part == "cost":
        cost(args.root, args.rounds)
    if args.report:
        report(args.root)


if __name__ == "__main__":
    main()
