"""Every Python example of README.md runs as written, on tiny settings.

Each ```python block is executed in a folder holding what the README says a user has made
before (a trained DiMR pipeline, teacher runs, an official checkpoint: tiny random ones here).
Only the settings listed in TINY are changed, and each must still be found in the README, so an
example that drifts from the code fails here.
"""

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

ROOT = Path(__file__).parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)

TINY = [  # (README text, tiny setting): sizes and lengths only, never the calls
    ("num_inference_steps=250", "num_inference_steps=2"),
    ('DiMRModel(**dimr_config("XL/2R"))', 'DiMRModel(**dimr_config("tiny"))'),
    ('load_official_dimr("nnet_ema.pth", "XL/2R")', 'load_official_dimr("nnet_ema.pth", "tiny")'),
    ("num_inference_steps=25", "num_inference_steps=2"),
    ("iterations=1000", "iterations=2"),
    ("EvalOptions(num_eval=5)", "EvalOptions(num_eval=1, epochs=1)"),
    ('"/path/revcol_tiny_1k.pth"', '"revcol_tiny_1k.pth"'),
    ("steps=300", "steps=2"),
    ("n_iters=50", "n_iters=2"),
    ("n=50,", "n=2,"),
    ("UNet2DConditionModel(**SD15_UNET_CONFIG)", 'UNet2DConditionModel(**UNET_CONFIGS["sd-like-tiny"])'),
]


def tiny(block: str) -> str:
    for text, replacement in TINY:
        block = block.replace(text, replacement)
    return block


def test_every_tiny_setting_is_still_in_the_readme():
    text = "\n".join(BLOCKS)
    assert [t for t, _ in TINY if t not in text] == []


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """What the README's examples assume exists, made tiny and random."""
    from genforge.config import recipe_from_dict
    from genforge.models.arflow import ARFlowModel, arflow_config
    from genforge.models.dimr import DiMRModel, dimr_config
    from genforge.pipelines.arflow import ARFlowPipeline
    from genforge.pipelines.dimr import DiMRPipeline
    from genforge.train import train

    root = tmp_path_factory.mktemp("readme")
    torch.manual_seed(0)
    DiMRPipeline(model=DiMRModel(**dimr_config("digits")),
                 scheduler=DPMSolverMultistepScheduler()).save_pretrained(root / "runs/dimr_digits/pipeline")
    ARFlowPipeline(ARFlowModel(**arflow_config("digits"))).save_pretrained(root / "runs/arflow_digits/pipeline")
    keys = json.loads((FIXTURES / "dimr_official_keys.json").read_text())["tiny"]
    torch.save({"model": {k: torch.randn(s) for k, s in keys.items()}}, root / "nnet_ema.pth")
    revcol = json.loads((FIXTURES / "backbones" / "revcol_official_keys.json").read_text())["keys"]
    torch.save({"model": {k: torch.zeros(s) for k, s in revcol.items()}}, root / "revcol_tiny_1k.pth")
    for name in ("resnet18", "moat"):  # classifier runs, the form teachers come in
        train(recipe_from_dict({
            "method": "classifier", "output_dir": str(root / f"runs/kd_teacher_{name}_digits"),
            "data": {"name": "digits", "image_size": 32, "resize": "resize", "batch_size": 32},
            "model": {"name": "test_resnet"}, "train": {"max_steps": 1}, "eval": {"batch_size": 360}}))
    return root


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_example_runs(workspace, monkeypatch, index):
    monkeypatch.chdir(workspace)
    exec(compile(tiny(BLOCKS[index]), f"README.md python block {index + 1}", "exec"), {})
