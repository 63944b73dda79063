"""Bad input is a one-line error naming the value and what was expected, before any work.

Each case runs the real command line (`genforge ...`, `python eval/...`) in-process and checks
the exit status 2, the single stderr line, and that no run directory was written.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from genforge.cli import main
from genforge.models.dimr import DiMRModel, dimr_config
from genforge.pipelines import DiMRPipeline

ROOT = Path(__file__).parents[1]


def one_line_error(capsys, status) -> str:
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, layers_per_block=1)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(root / "ddpm")
    torch.manual_seed(0)
    DiMRPipeline(model=DiMRModel(**dimr_config("tiny")), scheduler=DDIMScheduler()).save_pretrained(root / "dimr")
    return root


def write_recipe(path, method="classifier", model=None, data=None):
    path.write_text(yaml.safe_dump({
        "method": method, "output_dir": str(path.parent / "run"),
        "data": {"name": "digits", "image_size": 8, "batch_size": 32, **(data or {})},
        "model": model or {"name": "test_resnet"}, "train": {"max_steps": 2}}))
    return str(path)


@pytest.mark.parametrize("data, expected", [
    ({"name": "mnist_typo"}, "unknown dataset 'mnist_typo'; known datasets: ['cifar10'"),
    ({"name": "image_folder", "root": "/no/such/folder"}, "root '/no/such/folder' does not exist"),
])
def test_bad_dataset_is_refused_before_the_model_is_built(tmp_path, capsys, data, expected):
    err = one_line_error(capsys, main(["train", write_recipe(tmp_path / "r.yaml", data=data)]))
    assert expected in err
    assert not (tmp_path / "run").exists()


def test_an_unreadable_pretrained_file_is_named(tmp_path, capsys):
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"not a safetensors file")
    recipe = write_recipe(tmp_path / "r.yaml", model={"name": "test_resnet", "pretrained_file": str(bad)})
    err = one_line_error(capsys, main(["train", recipe]))
    assert f"model.pretrained_file '{bad}' cannot be loaded into timm model 'test_resnet'" in err


def test_sample_refuses_zero_per_class_before_loading(pipelines, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sample", str(pipelines / "dimr"), "--per-class", "0"])
    assert exit_.value.code == 2
    assert "--per-class: must be a positive integer, got 0" in capsys.readouterr().err


def test_a_pipeline_of_another_model_is_named_by_sample_and_by_the_diffusion_probe(pipelines, tmp_path, capsys):
    err = one_line_error(capsys, main(["sample", str(pipelines / "ddpm"), "--out", str(tmp_path / "g.png")]))
    assert "holds a DDPMPipeline, not a DiMRPipeline" in err
    probe = write_recipe(tmp_path / "probe.yaml", method="diffusion_probe",
                         model={"layer": "stages.0.blocks.0", "pipeline": str(pipelines / "ddpm")})
    err = one_line_error(capsys, main(["train", probe]))
    assert "model.pipeline" in err and "holds a DDPMPipeline, not a DiMRPipeline" in err


def test_damaged_pipeline_weights_are_one_line(pipelines, tmp_path, capsys):
    import shutil

    damaged = tmp_path / "dimr"
    shutil.copytree(pipelines / "dimr", damaged)
    weights = next((damaged / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    err = one_line_error(capsys, main(["sample", str(damaged), "--out", str(tmp_path / "g.png")]))
    assert f"cannot load the DiMRPipeline saved in {damaged}" in err


def test_eval_scripts_name_a_bad_weights_file_or_a_missing_samples_file(tmp_path):
    bad = tmp_path / "cnn.safetensors"
    bad.write_bytes(b"garbage")
    for script, args, expected in (
            ("accuracy.py", ["--weights", str(bad)], f"{bad} is not a readable safetensors file"),
            ("fid.py", ["--real", "digits:train", "--fake", str(tmp_path / "none.npz")],
             "samples file"),
    ):
        done = subprocess.run([sys.executable, str(ROOT / "eval" / script), *args],
                              capture_output=True, text=True, timeout=120)
        err = done.stderr.strip()
        assert done.returncode == 2 and "\n" not in err and expected in err, err
