"""The sd_text_to_image teacher and sd_distill (BK-SDM / A-SDM) methods through the training loop."""

import pytest
import torch
from safetensors.torch import load_file

from genforge.config import ConfigError, recipe_from_dict
from genforge.sd.method import load_text_to_image_pipeline
from genforge.sd.text import digit_prompt
from genforge.train import train

TINY_UNET = {"block_out_channels": [16, 32, 32], "norm_num_groups": 8}


def recipe(tmp_path, name, method, model, max_steps, checkpoint_every=100):
    return recipe_from_dict({
        "method": method, "seed": 0, "output_dir": str(tmp_path / name),
        "data": {"name": "digits", "image_size": 8, "resize": "pad", "batch_size": 16},
        "model": model,
        "train": {"max_steps": max_steps, "lr": 1e-3, "checkpoint_every": checkpoint_every, "log_every": 1},
        "sample": {"num_per_class": 1, "steps": 1, "guidance_scale": 2.0},
        "eval": {"num_samples": 10, "batch_size": 10}})


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sd")
    train(recipe(tmp_path, "teacher", "sd_text_to_image", {"unet": TINY_UNET}, max_steps=2, checkpoint_every=1))
    return tmp_path / "teacher"


def test_teacher_saves_a_stock_pipeline_with_its_local_tokenizer_and_grids_per_checkpoint(teacher_run):
    assert (teacher_run / "samples_step_0000001.png").is_file() and (teacher_run / "samples_step_0000002.png").is_file()
    pipe = load_text_to_image_pipeline(teacher_run / "pipeline")
    ids = pipe.tokenizer(digit_prompt(3)).input_ids
    assert pipe.tokenizer.unk_token_id not in ids and len(ids) == 6  # <bos> a handwritten digit three <eos>
    out = pipe(prompt=[digit_prompt(3)], num_inference_steps=2, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 1, 8, 8)


def test_distillation_with_incubation_resumes_exactly(teacher_run, tmp_path):
    model = {"teacher": str(teacher_run), "plan": "asdm", "asdm": {"gri_window": 4, "gri_pool": 2},
             "incubation_steps": 1}
    # Steps 0, 1, 2 incubate stages 0, 1, 2: the run resumed from step 2 must continue with stage 2, not
    # restart at 0.
    straight = train(recipe(tmp_path, "straight", "sd_distill", model, max_steps=3, checkpoint_every=2))
    resumed = train(recipe(tmp_path, "resumed", "sd_distill", model, max_steps=3),
                    resume_from=straight.output_dir / "checkpoints" / "step_0000002")
    assert resumed.resumed_from == 2
    a = load_file(straight.output_dir / "model" / "model.safetensors")
    b = load_file(resumed.output_dir / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert int(a["micro_steps"]) == 3
    assert straight.metrics["plan"] == "asdm" and straight.metrics["unet_parameters"] < \
        straight.metrics["teacher_unet_parameters"]


def test_distillation_recipe_errors_name_the_bad_value(teacher_run, tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'model.unet.layers_per_blok'"):
        recipe(tmp_path, "x", "sd_text_to_image", {"unet": {"layers_per_blok": 1}}, 1)
    with pytest.raises(ConfigError, match="model.teacher must be a finished sd_text_to_image run"):
        recipe(tmp_path, "x", "sd_distill", {"teacher": str(tmp_path)}, 1)
    with pytest.raises(ConfigError, match="model.plan 'bk-huge'"):
        recipe(tmp_path, "x", "sd_distill", {"teacher": str(teacher_run), "plan": "bk-huge"}, 1)
    with pytest.raises(ConfigError, match="unknown asdm option"):
        recipe(tmp_path, "x", "sd_distill", {"teacher": str(teacher_run), "plan": "asdm", "asdm": {"window": 4}}, 1)


def test_incubation_under_ddp_all_reduces_the_gradients_of_the_stage_being_trained(teacher_run, tmp_path,
                                                                                    gloo_group):
    """The hybrid (teacher + incubated student stage) must run through the DDP-wrapped student: DDP
    all-reduces only gradients made under its own forward. A hybrid called beside the wrapper trains
    each process's copy of the stage on its own shard, and the copies drift apart."""
    from torch.nn.parallel import DistributedDataParallel

    from genforge.sd.incubation import stage_modules
    from genforge.train import get_method

    model = {"teacher": str(teacher_run), "plan": "asdm", "asdm": {"gri_window": 4, "gri_pool": 2},
             "incubation_steps": 1}
    method = get_method("sd_distill")(recipe(tmp_path, "ddp", "sd_distill", model, max_steps=3))
    student = method.build_model()
    wrapped = DistributedDataParallel(student, find_unused_parameters=method.find_unused_parameters)
    reduced = []

    def record(_, bucket):
        reduced.extend(zip(bucket.parameters(), bucket.gradients(), strict=True))
        future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    wrapped.register_comm_hook(None, record)
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    for stage in (0, 1):  # incubation steps 0 and 1 train stages 0 and 1
        reduced.clear()
        student.zero_grad(set_to_none=True)
        loss, scalars = method.training_step(wrapped, (images, labels))
        loss.backward()
        assert scalars["incubation_stage"] == stage
        trained = {id(p) for m in stage_modules(student.unet, stage) for p in m.parameters()}
        synced = {id(p): g for p, g in reduced if g.abs().sum() > 0}
        assert trained and set(synced) == trained, "the stage's gradients were not all-reduced by DDP"


def test_shipped_digits_recipes_build_the_documented_teacher_and_students(tmp_path):
    """recipes/asdm/{teacher,distill,distill_asdm}_digits.yaml: the teacher UNet and the two pruned
    students have the parameter counts docs/benchmarks.md reports (2.16M, 1.21M, 1.46M)."""
    from pathlib import Path

    from genforge.config import load_recipe
    from genforge.sd.method import _pipeline
    from genforge.train import get_method

    recipes = Path(__file__).parents[2] / "recipes" / "asdm"
    teacher_recipe = load_recipe(recipes / "teacher_digits.yaml", overrides={"output_dir": str(tmp_path / "t")})
    method = get_method(teacher_recipe.method)(teacher_recipe)
    unet = method.build_model()
    assert unet.num_parameters() == 2_162_721
    _pipeline(unet, method.tokenizer, method.text_encoder, method.noise_scheduler).save_pretrained(tmp_path / "pipeline")
    for name, plan, parameters in (("distill_digits", "bk-small", 1_212_673), ("distill_asdm_digits", "asdm", 1_462_800)):
        recipe = load_recipe(recipes / f"{name}.yaml",
                             overrides={"output_dir": str(tmp_path / name), "model.teacher": str(tmp_path)})
        student = get_method(recipe.method)(recipe).build_model().unet
        assert recipe.model["plan"] == plan and student.num_parameters() == parameters, name
