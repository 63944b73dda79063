"""ARFlow training (genforge.methods.arflow): same-class sequences noisiest first, the linear-path
velocity objective, and the SiT baseline on the same objective, through the real loop."""

import json

import pytest
import torch

from genforge.config import ConfigError, recipe_from_dict
from genforge.data import build_dataset
from genforge.methods.arflow import ARFlowMethod, SameClassSequences, SiTMethod
from genforge.pipelines import ARFlowPipeline, load_saved_pipeline
from genforge.train import train


def recipe(tmp_path, method="arflow", model=None, **train_overrides):
    return recipe_from_dict({
        "method": method, "seed": 0, "output_dir": str(tmp_path / method),
        "data": {"name": "digits", "image_size": 8, "batch_size": 8},
        "model": model or {"config": "digits", "args": {"hidden_size": 32, "depth": 1, "num_heads": 2},
                           "sequence_length": 3},
        "train": {"max_steps": 60, "lr": 3e-3, "warmup_steps": 5, "checkpoint_every": 100, "log_every": 10,
                  "ema_decay": 0.9, **train_overrides},
        "sample": {"num_per_class": 1, "steps": 3, "guidance_scale": 2.0, "scheduler": "sde"},
        "eval": {"num_samples": 20, "batch_size": 20},
    })


def test_training_sequences_are_distinct_images_of_one_class_led_by_the_indexed_one():
    digits = build_dataset("digits", split="train")
    sequences = SameClassSequences(digits, 5)
    flat = digits.images.flatten(1)
    for index in (0, 17, 700):
        images, label = sequences[index]
        found = [int(torch.nonzero((flat == image.flatten()).all(1))[0]) for image in images]
        assert found[0] == index and len(set(found)) == 5
        assert all(int(digits.labels[i]) == label for i in found)


def test_a_class_smaller_than_the_sequence_is_refused():
    digits = build_dataset("digits", split="train")
    with pytest.raises(ValueError, match="sequence_length 200 needs that many images per class"):
        SameClassSequences(digits, 200)


class Spy(torch.nn.Module):
    """Records what the method feeds the network and predicts zero velocity."""

    null_class = 10

    def forward(self, xt, t=None, labels=None, class_labels=None, timestep=None):
        self.seen = (xt, t if timestep is None else timestep)
        return type("Out", (), {"sample": torch.zeros_like(xt)})()


@pytest.mark.parametrize("method_class", [ARFlowMethod, SiTMethod])
def test_objective_is_the_linear_path_velocity_with_times_ascending_in_each_sequence(tmp_path, method_class):
    model = {"config": "digits"} if method_class is SiTMethod else None
    method = method_class(recipe(tmp_path, method_class.name, model=model))
    torch.manual_seed(0)
    x1 = torch.randn(6, 5, 1, 8, 8) if method_class is ARFlowMethod else torch.randn(6, 1, 8, 8)
    spy = Spy()
    loss, _ = method.training_step(spy, (x1, torch.arange(6)))
    xt, t = spy.seen
    if method_class is ARFlowMethod:
        assert t.shape == (6, 5) and (t.diff(dim=1) >= 0).all()  # noisiest (t = 0 is noise) first
    t = t.reshape(*t.shape, *[1] * (x1.ndim - t.ndim))
    x0 = (xt - t * x1) / (1 - t)  # the noise the step drew, recovered from x_t = t x1 + (1 - t) x0
    assert abs(x0.std() - 1) < 0.1
    torch.testing.assert_close(loss, ((x1 - x0) ** 2).mean(), atol=1e-4, rtol=1e-4)  # target u = x1 - x0


def test_loss_falls_on_digits_and_the_run_leaves_a_loadable_arflow_pipeline(tmp_path):
    result = train(recipe(tmp_path))
    log = [json.loads(line) for line in (tmp_path / "arflow" / "train_log.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in log if "loss" in entry]
    assert losses[-1] < 0.8 * losses[0], losses
    out = result.output_dir
    assert {"fid", "classifier_agreement"} <= set(json.loads((out / "metrics.json").read_text()))
    assert (out / "samples_grid.png").is_file() and (out / "samples.npz").is_file()
    pipe = load_saved_pipeline(out / "pipeline")
    assert isinstance(pipe, ARFlowPipeline) and pipe.config.sampler == "sde"


@pytest.mark.parametrize("model_section,match", [
    ({"config": "digits", "sequence_length": 0}, "sequence_length must be a positive int"),
    ({"config": "digits", "sequence_lenght": 5}, "did you mean 'sequence_length'"),
    ({"config": "huge"}, "model.config 'huge' is not one of"),
    ({"config": "digits", "args": {"hidden": 3}}, "unknown key 'model.args.hidden'"),
])
def test_bad_model_sections_are_refused_before_training(tmp_path, model_section, match):
    with pytest.raises(ConfigError, match=match):
        ARFlowMethod(recipe(tmp_path, model=model_section))


def test_sit_takes_no_sequence_length_and_samplers_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'model.sequence_length'"):
        SiTMethod(recipe(tmp_path, "sit", model={"config": "digits", "sequence_length": 5}))
    bad = recipe(tmp_path)
    bad.sample.scheduler = "ddim"
    with pytest.raises(ConfigError, match=r"sample.scheduler 'ddim' is not one of \['sde', 'ode'\]"):
        ARFlowMethod(bad)
