"""Knowledge-transfer methods under DDP: two CPU processes (torchrun, gloo), as on two GPUs.

MEAL V2 calls its discriminator outside the wrapped model's forward, and the MoE student's
top-1 gating can leave an expert without tokens; both must still train under DDP.
"""

import os
import subprocess
import sys

import yaml

DATA = {"name": "digits", "image_size": 16, "batch_size": 8}
TRAIN = {"max_steps": 2, "lr": 1e-3, "checkpoint_every": 100, "log_every": 1, "ema_decay": 0.0}


def torchrun(recipe: dict, path) -> subprocess.CompletedProcess:
    path.write_text(yaml.safe_dump(recipe))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "-m", "genforge.train", str(path)], env=env, capture_output=True, text=True, timeout=300)


def test_meal_v2_and_the_moe_student_train_in_two_processes(tmp_path, classifier_run):
    teacher = classifier_run(tmp_path / "teacher")
    meal = {"method": "meal_v2", "output_dir": str(tmp_path / "meal"), "data": DATA, "train": TRAIN,
            "model": {"name": "test_efficientnet", "teachers": [str(teacher)], "channel_divisor": 2}}
    moe = {"method": "modular_student", "output_dir": str(tmp_path / "moe"), "data": DATA, "train": TRAIN,
           "model": {"student": {"depths": [1, 1], "embed_dim": 16, "num_heads": 2, "num_experts": 4, "top_k": 1,
                                 "meta_dim": 16, "patch_size": 8}}}
    for name, recipe in (("meal", meal), ("moe", moe)):
        done = torchrun(recipe, tmp_path / f"{name}.yaml")
        assert done.returncode == 0, done.stderr[-3000:]
        assert (tmp_path / name / "model.safetensors").is_file()
        log = (tmp_path / name / "train_log.jsonl").read_text().splitlines()
        assert len(log) == 2
