"""The training loop under two processes (torchrun, CPU, gloo) is the one-process run.

Two processes with batch B/2 each take, at every step, the two halves of the batch one
process with batch B takes (the data stream shards each global batch by rank), and DDP
averages their gradients, so the weights after training must be the one-process weights up
to float summation order (SGD: Adam's normalisation would magnify that rounding in
parameters whose gradients are near zero). The model (timm's test_vit) has no BatchNorm or dropout, whose
per-process statistics or masks would legitimately differ.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from genforge.train import train
from genforge.config import recipe_from_dict


def recipe(output_dir, batch_size):
    return {"method": "classifier", "seed": 0, "output_dir": str(output_dir),
            "data": {"name": "digits", "image_size": 8, "batch_size": batch_size},
            "model": {"name": "test_vit", "kwargs": {"img_size": 8, "patch_size": 2}},
            "train": {"max_steps": 4, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
                      "warmup_steps": 1, "grad_clip": 1.0, "log_every": 2, "checkpoint_every": 2,
                      "ema_decay": 0.5},
            "eval": {"batch_size": 360}}


def test_two_processes_end_with_the_weights_of_one_process_with_the_same_global_batch(tmp_path):
    one = train(recipe_from_dict(recipe(tmp_path / "one", 16), source="test"))
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(recipe(tmp_path / "two", 8)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "-m", "genforge.train", str(tmp_path / "two.yaml")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for part in ("model/model.safetensors", "model.safetensors"):  # raw weights, then the EMA
        a, b = load_file(str(one.output_dir / part)), load_file(str(tmp_path / "two" / part))
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    logs = [[json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
            for run in (one.output_dir, tmp_path / "two")]
    for row_one, row_two in zip(*logs, strict=True):  # loss and accuracy over the global batch
        assert row_two["loss"] == pytest.approx(row_one["loss"], abs=1e-6)
        assert row_two["train_accuracy"] == pytest.approx(row_one["train_accuracy"], abs=1e-6)
    start = load_file(str(one.output_dir / "checkpoints" / "step_0000002" / "model.safetensors"))
    assert not all(torch.equal(start[n], t) for n, t in a.items())  # steps 3-4 did move weights
