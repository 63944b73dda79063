"""kill -9 at random moments: `genforge distill` (DM and DWA) and `genforge reinforce` runs killed
and rerun end exactly where an uninterrupted run ends (same synthetic set, same shards, bitwise).

Each run is the command line's own code, `genforge.cli.main([...])`, in a child process that a
driver forks after importing genforge once (a fresh interpreter spends seconds on imports, so
random kills would mostly land there). For each seed the driver starts a run twice and kills
it: the first time a seeded random moment after the run has saved some progress (so that the
rerun must resume, whatever the machine's speed), the second time after a seeded random delay
within an uninterrupted run's duration (during the teacher's training, inside a checkpoint or
shard write, between them, during the evaluation; a resumed run may finish first). Then it
reruns it to the end: `genforge distill --auto-resume`, and plain `genforge reinforce`, which
resumes. At least one kill of each kind must land mid-run, after some progress was saved.
"""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_model

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the driver forks each run")

SEEDS = (0, 1)
MATCHING = {"iterations": 60, "checkpoint_every": 3, "net_width": 8, "net_depth": 2, "batch_real": 8,
            "dsa_strategy": "color_crop_cutout_scale_rotate"}
DWA = {"iterations": 15, "teacher_width": 8, "teacher_epochs": 2, "jitter": 1}

DRIVER = r"""
import json, os, random, signal, sys, time
from genforge.cli import main  # imported once; every run below is a forked child running the command line

def start(argv):
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = main(argv)
        finally:
            os._exit(code)
    return pid

def finish(pid):
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

report = {}
ended = set()

def running(pid):
    if pid not in ended and os.waitpid(pid, os.WNOHANG) != (0, 0):
        ended.add(pid)  # it ended, and is reaped
    return pid not in ended

for name, argv, root, seeds, marker in json.loads(sys.argv[1]):
    begin = time.monotonic()
    codes = [finish(start(argv + ["--output-dir", f"{root}/straight"]))]
    duration = time.monotonic() - begin
    kills = []  # what each killed run left in its directory
    for seed in seeds:
        rng, again = random.Random(seed), argv + ["--output-dir", f"{root}/killed_{seed}"]
        for attempt in range(2):
            pid, left = start(again), f"{root}/killed_{seed}"
            if attempt == 0:  # after some saved progress, then a little more
                while running(pid) and not os.path.exists(os.path.join(left, marker)):
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.1) * duration)
            else:
                time.sleep(rng.uniform(0.05, 0.95) * duration)
            if running(pid):
                os.kill(pid, signal.SIGKILL)
                finish(pid)
                kills.append(sorted(os.listdir(left)) if os.path.isdir(left) else [])
        codes.append(finish(start(again)))
    report[name] = {"codes": codes, "kills": kills, "seconds": duration}
print(json.dumps(report))
"""


def _teacher_run(directory):
    torch.manual_seed(0)
    config = {"model_name": "test_resnet", "num_classes": 10, "in_chans": 1}
    directory.mkdir()
    save_model(timm.create_model(**config), str(directory / "model.safetensors"))
    (directory / "model_config.json").write_text(json.dumps(config))
    return str(directory)


def _write(path, raw):
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_injection")
    distill = {"seed": 1, "distill": {"ipc": 3}, "eval": {"num_eval": 1, "epochs": 2, "net_width": 8}}
    reinforce = {"seed": 2, "data": {"name": "digits", "image_size": 8, "batch_size": 128},
                 "teachers": [_teacher_run(root / "teacher")], "num_samples": 2, "top_k": 3, "shard_size": 96,
                 "device": "cpu", "transforms": [["random_resized_crop", {"size": 8}], ["rand_augment", {}]]}
    jobs = [
        ["dm", ["distill", _write(root / "dm.yaml", {**distill, "method": "dm",
                                                       "distill": {"ipc": 3, "options": MATCHING}}),
                "--no-progress", "--auto-resume"], str(root / "dm"), SEEDS, "distill_state.safetensors"],
        ["dwa", ["distill", _write(root / "dwa.yaml", {**distill, "method": "dwa",
                                                         "distill": {"ipc": 3, "options": DWA}}),
                 "--no-progress", "--auto-resume"], str(root / "dwa"), SEEDS, "dwa_batches"],
        ["reinforce", ["reinforce", _write(root / "reinforce.yaml", reinforce), "--no-progress"],
         str(root / "reinforce"), SEEDS, "index.json"],
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(jobs)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["dm", "dwa"])
def test_distill_runs_killed_at_random_moments_resume_to_the_uninterrupted_set(killed_runs, name):
    root, report = killed_runs
    assert report[name]["codes"] == [0] * (1 + len(SEEDS)), report
    marker = {"dm": "distill_state.safetensors", "dwa": "dwa_batches"}[name]
    assert any(marker in left for left in report[name]["kills"]), report  # a kill mid-run: the rerun resumed
    expected = load_file(str(root / name / "straight" / "synthetic_set.safetensors"))
    metrics = json.loads((root / name / "straight" / "metrics.json").read_text())
    for seed in SEEDS:
        run = root / name / f"killed_{seed}"
        got = load_file(str(run / "synthetic_set.safetensors"))
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], v) for k, v in expected.items()), (seed, name)
        assert json.loads((run / "metrics.json").read_text())["accuracies"] == metrics["accuracies"]


def test_reinforce_runs_killed_at_random_moments_resume_to_the_uninterrupted_shards(killed_runs):
    root, report = killed_runs
    assert report["reinforce"]["codes"] == [0] * (1 + len(SEEDS)), report
    assert any("index.json" in left for left in report["reinforce"]["kills"]), report  # some shards were kept
    straight = root / "reinforce" / "straight"
    shards = sorted(p.name for p in straight.glob("shard_*.safetensors"))
    assert len(shards) == 15  # 1,437 digits in shards of 96
    for seed in SEEDS:
        run = root / "reinforce" / f"killed_{seed}"
        assert sorted(p.name for p in run.glob("shard_*.safetensors")) == shards
        for name in [*shards, "manifest.json", "index.json"]:
            assert (run / name).read_bytes() == (straight / name).read_bytes(), (seed, name)
