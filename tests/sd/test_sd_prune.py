"""BK-SDM block removal (arXiv 2305.15798) as the official code defines it, and A-SDM's plan on top."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from genforge.sd import ASDMUNet2DConditionModel, PlanError, SD15_UNET_CONFIG, prune, student_config
from genforge.sd.condconv import CondConv2d
from genforge.sd.gri import GRIAttnProcessor
from genforge.sd.prune import condconv_experts, feature_layers, weight_map
from genforge.sd.configs import UNET_CONFIGS

SD_LIKE, DIFFUSERS_TINY = UNET_CONFIGS["sd-like-tiny"], UNET_CONFIGS["diffusers-tiny"]

OFFICIAL = json.loads((Path(__file__).parents[1] / "fixtures" / "bk_sdm_official_keys.json").read_text())


def meta_unet(config: dict) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


@pytest.mark.parametrize("plan", ["bk-base", "bk-small", "bk-tiny"])
def test_sd15_students_have_the_official_configs_keys_shapes_and_copy_map(plan):
    official = OFFICIAL["plans"][plan]
    teacher = meta_unet(SD15_UNET_CONFIG)
    config = student_config(teacher.config, plan)
    assert {k: config[k] for k in official["config"] if k in config} == \
        {k: v for k, v in official["config"].items() if k in config}
    student = meta_unet(config)
    assert student.num_parameters() == official["num_parameters"]
    shapes = {k: list(v.shape) for k, v in student.state_dict().items()}
    assert shapes == {k: entry[0] for k, entry in official["keys"].items()}
    expected = {k: entry[1] if len(entry) == 2 else k for k, entry in official["keys"].items()}
    assert weight_map(teacher, student, plan) == expected


@pytest.mark.parametrize("plan", ["bk-base", "bk-small", "bk-tiny", "asdm"])
def test_every_student_tensor_is_the_teachers_tensor_it_maps_to(teacher, build_unet, plan):
    student = prune(teacher, plan)
    teacher_sd, student_sd = teacher.state_dict(), student.state_dict()
    plain = build_unet(student_config(teacher.config, plan))
    mapping = weight_map(teacher, plain, plan)
    sites = condconv_experts(teacher) if plan == "asdm" else {}
    for key, value in student_sd.items():
        site = next((s for s in sites if key.startswith(s + ".")), None)
        if site is None:
            assert torch.equal(value, teacher_sd[mapping[key]]), key
        elif key.endswith("experts_weight"):
            assert all(torch.equal(value[k], teacher_sd[f"{name}.weight"]) for k, name in enumerate(sites[site]))
    assert student.num_parameters() < teacher.num_parameters()


def test_tiny_feature_layers_are_the_official_mapped_names():
    assert feature_layers(SD15_UNET_CONFIG, "bk-tiny") == [
        ("down_blocks.0", "down_blocks.0"), ("down_blocks.1", "down_blocks.1"),
        ("down_blocks.2.attentions.1.proj_out", "down_blocks.2.attentions.0.proj_out"),
        ("up_blocks.1", "up_blocks.0"), ("up_blocks.2", "up_blocks.1"), ("up_blocks.3", "up_blocks.2")]


@pytest.mark.parametrize("config, plan, message", [
    ({**SD_LIKE, "layers_per_block": 1}, "bk-base", "layers_per_block >= 2"),
    ({**SD_LIKE, "mid_block_type": None}, "bk-small", "mid_block_type=None"),
    (DIFFUSERS_TINY, "bk-tiny", r"block_out_channels=\[32, 64\]"),
    ({**SD_LIKE, "block_out_channels": [32, 64, 96]}, "bk-tiny", "equal widths"),
    (SD_LIKE, "bk-huge", "unknown pruning plan 'bk-huge'"),
])
def test_a_plan_that_does_not_fit_the_unet_is_a_clear_error(config, plan, message):
    with pytest.raises(PlanError, match=message):
        prune(meta_unet(config), plan)


def test_asdm_options_are_checked(teacher):
    with pytest.raises(PlanError, match="unknown asdm option"):
        prune(teacher, "asdm", {"gri_windw": 4})
    with pytest.raises(PlanError, match="only used by plan 'asdm'"):
        prune(teacher, "bk-small", {"gri": False})
    with pytest.raises(PlanError, match="without attention"):
        prune(teacher, "asdm", {"gri_stages": [2]})


def test_asdm_student_holds_its_components_and_plain_asdm_is_bk_small(teacher, unet_inputs):
    student = prune(teacher, "asdm", {"gri_window": 4, "gri_pool": 2})
    assert isinstance(student.get_submodule("down_blocks.0.resnets.0.conv2"), CondConv2d)
    assert student.get_submodule("down_blocks.0.resnets.0.conv2").num_experts == 3  # kept + removed conv1, conv2
    assert student.get_submodule("up_blocks.2.resnets.0.conv2").num_experts == 2  # kept + removed conv2
    assert isinstance(student.down_blocks[0].attentions[0].transformer_blocks[0].attn1.processor, GRIAttnProcessor)
    assert not isinstance(student.down_blocks[0].attentions[0].transformer_blocks[0].attn2.processor,
                          GRIAttnProcessor)
    plain = prune(teacher, "asdm", {"condconv": False, "gri": False})
    assert type(plain) is UNet2DConditionModel
    x, t, c = unet_inputs(SD_LIKE)
    torch.testing.assert_close(plain(x, t, c).sample, prune(teacher, "bk-small")(x, t, c).sample)


def tiny_pipeline(unet) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("plan", ["bk-small", "asdm"])
def test_student_round_trips_and_runs_in_a_stock_pipeline(tmp_path, build_unet, plan):
    teacher = build_unet(DIFFUSERS_TINY)
    student = prune(teacher, plan, {"gri_window": 8, "gri_pool": 2} if plan == "asdm" else None)
    student.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = type(student).from_pretrained(tmp_path)
    assert {k: v for k, v in loaded.config.items() if k != "_name_or_path"} == dict(student.config)
    embeds = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(0))
    images = []
    for unet in (student, loaded):
        pipe = tiny_pipeline(unet)
        images.append(pipe(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), guidance_scale=2.0,
                           num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0),
                           height=64, width=64).images)
    assert images[0].shape == (1, 64, 64, 3) and images[0].std() > 0
    assert (images[0] == images[1]).all()


def test_asdm_unet_is_resolved_from_genforge_by_a_saved_pipeline(tmp_path, build_unet):
    student = prune(build_unet(DIFFUSERS_TINY), "asdm", {"gri_window": 8, "gri_pool": 2})
    tiny_pipeline(student).save_pretrained(tmp_path)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None, feature_extractor=None,
                                                     text_encoder=None, tokenizer=None)
    assert isinstance(loaded.unet, ASDMUNet2DConditionModel)
    assert isinstance(loaded.unet.get_submodule("up_blocks.0.resnets.0.conv2"), CondConv2d)
