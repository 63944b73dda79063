"""kill -9 at random moments: a training run resumed after each kill ends exactly where an
uninterrupted run ends (same weights, bitwise, on CPU).

The seed kills a run twice (one seed: a kill sequence costs three to four runs of the recipe
in fresh interpreters, 45-100 s, and more would not fit the suite's 10 minutes): first at a
seeded random moment after its first checkpoint (so the rerun must resume, whatever the
machine's speed), then after a seeded random delay within
an uninterrupted run's duration (which may land in the imports, inside a checkpoint write,
between checkpoints, or while the final weights are written; a resumed run may finish first).
Then the command is simply run again with --auto-resume until it finishes.
"""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

RECIPE = {"method": "classifier", "seed": 3,
          "data": {"name": "digits", "image_size": 8, "batch_size": 32},
          "model": {"name": "test_resnet"},
          "train": {"max_steps": 24, "lr": 3e-3, "checkpoint_every": 3, "keep_checkpoints": 2,
                    "log_every": 4, "ema_decay": 0.9},
          "eval": {"batch_size": 360}}


def command(recipe_file):
    return [sys.executable, "-m", "genforge.train", str(recipe_file), "--auto-resume"]


def write(tmp_path, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, "output_dir": str(tmp_path / name)}))
    return path


def weights(run):
    return {part: load_file(str(run / part)) for part in ("model/model.safetensors", "model.safetensors")}


@pytest.mark.parametrize("seed", [0])
def test_runs_killed_at_random_moments_resume_to_the_uninterrupted_result(tmp_path, seed):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.monotonic()
    subprocess.run(command(write(tmp_path, "straight")), env=env, check=True, capture_output=True, timeout=300)
    duration = time.monotonic() - start

    rng = random.Random(seed)
    recipe_file = write(tmp_path, "killed")
    checkpoints = tmp_path / "killed" / "checkpoints"
    kills = 0
    for attempt in range(2):
        process = subprocess.Popen(command(recipe_file), env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        if attempt == 0:  # after the first checkpoint, then a little more
            while process.poll() is None and not any(checkpoints.glob("step_*")):
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.1) * duration)
        else:
            time.sleep(rng.uniform(0.3, 1.0) * duration)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
    done = subprocess.run(command(recipe_file), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert kills >= 1

    expected, got = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    for part in expected:
        assert expected[part].keys() == got[part].keys()
        for name, tensor in expected[part].items():
            assert torch.equal(got[part][name], tensor), (part, name)
