"""DiMR (arXiv 2406.09416) as the paper and the official code define it."""

import inspect
import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from einops import rearrange

from genforge.core.norm import TDLayerNorm, TDRMSNorm
from genforge.models.convert_dimr import (ConversionError, load_official_dimr, main as convert_main, official_config,
                                          official_norm_type, official_to_genforge_key)
from genforge.models.dimr import (DIMR_CONFIGS, DiMRModel, PixelShuffleUpsample, built_blocks, cascade_width,
                                  dimr_config, multiscale_loss, multiscale_noise_targets, timestep_to_tau,
                                  validate_stages)

FIXTURES = Path(__file__).parents[1] / "fixtures"
OFFICIAL_KEYS = json.loads((FIXTURES / "dimr_official_keys.json").read_text())
OFFICIAL_REFERENCE = json.loads((FIXTURES / "dimr_official_reference.json").read_text())


def tiny_model(**overrides) -> DiMRModel:
    torch.manual_seed(0)
    return DiMRModel(**dimr_config("tiny", **overrides))


def tiny_inputs(batch: int = 2):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 8, 8, generator=generator)
    return x, torch.tensor([10, 700])[:batch], torch.tensor([3, 10])[:batch]


def perturb_time_parameters(model: DiMRModel) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("param0"):
                param.add_(torch.randn_like(param))


def test_each_stage_predicts_at_its_resolution_and_the_last_matches_the_input():
    model = tiny_model()
    x, t, y = tiny_inputs()
    out = model(x, t, y)
    assert [tuple(o.shape) for o in out.multiscale] == [(2, 4, 4, 4), (2, 4, 8, 8)]
    assert out.sample is out.multiscale[-1]


def test_block_count_is_odd_and_cascade_width_is_k_times_d():
    model = tiny_model()
    stage0 = model.config.stage_configs[0]
    assert built_blocks(3) == 3 and built_blocks(4) == 5 and built_blocks(20) == 21
    assert len(model.stages[0].blocks) == built_blocks(stage0["num_blocks"])
    assert model.stages[1].cascade.norm_in.dim == cascade_width(stage0) == stage0["dim"] * (3 + 1)
    assert cascade_width({"dim": 960, "num_blocks": 39}) == 38_400


def test_time_enters_only_through_td_norms():
    model = tiny_model()
    x, _, y = tiny_inputs()
    early, late = model(x, torch.tensor([5, 5]), y).sample, model(x, torch.tensor([900, 900]), y).sample
    assert torch.equal(early, late), "with p0 = p1 at init the network must ignore t"
    perturb_time_parameters(model)
    early, late = model(x, torch.tensor([5, 5]), y).sample, model(x, torch.tensor([900, 900]), y).sample
    assert not torch.allclose(early, late)


def test_the_class_token_conditions_every_stage():
    model = tiny_model()
    x, t, _ = tiny_inputs()
    a = model(x, t, torch.tensor([1, 1])).multiscale
    b = model(x, t, torch.tensor([2, 2])).multiscale
    assert all(not torch.allclose(u, v) for u, v in zip(a, b))


def test_high_resolution_loss_reaches_every_branch_unless_blocked():
    for blocked in (False, True):
        model = tiny_model(block_grad_to_lowres=blocked)
        x, t, y = tiny_inputs()
        model(x, t, y).sample.square().mean().backward()
        stage0_grad = sum(p.grad.abs().sum() for p in model.stages[0].blocks.parameters() if p.grad is not None)
        stage1_grad = sum(p.grad.abs().sum() for p in model.stages[1].parameters() if p.grad is not None)
        assert stage1_grad > 0
        assert (stage0_grad == 0) == blocked


def test_multiscale_loss_trains_every_parameter_group():
    model = tiny_model()
    x, t, y = tiny_inputs()
    perturb_time_parameters(model)
    loss = multiscale_loss(model, model(x, t, y).multiscale, torch.randn_like(x))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_multiscale_targets_keep_unit_variance_and_are_box_sums_over_two():
    noise = torch.randn(64, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    low, high = multiscale_noise_targets(noise, 2)
    assert high is noise
    assert low.shape == (64, 4, 16, 16)
    assert abs(low.var().item() - 1) < 0.02
    assert torch.allclose(low[0, 0, 0, 0], noise[0, 0, :2, :2].sum() / 2)


def test_loss_weights_default_to_a_quarter_then_one():
    assert tiny_model().stage_loss_weights == [0.25, 1.0]


def test_schedule_and_time_map_match_the_official_code():
    official = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    diffusers_betas = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).betas
    assert torch.allclose(diffusers_betas.double(), official, atol=1e-9)
    # official: n in 1..1000, log_snr = n/1000*8 - 4, tau = log_snr/4; diffusers t = n - 1
    n = torch.tensor([1.0, 500.0, 1000.0])
    assert torch.allclose(timestep_to_tau(n - 1), (n / 1000 * 8 - 4) / 4)


def test_pixel_shuffle_matches_the_reshape_transpose_formulation():
    up = PixelShuffleUpsample(6, 3, ratio=2)
    x = torch.randn(2, 3, 4, 6)
    y = up.proj(x).reshape(2, 3, 4, 2, 2, 3).transpose(2, 3).reshape(2, 6, 8, 3)
    assert torch.equal(up(x), y)
    assert torch.equal(up(x)[0, 1, 2], up.proj(x)[0, 0, 1].reshape(2, 2, 3)[1, 0])


def test_save_and_load_pretrained_round_trip(tmp_path):
    model = tiny_model()
    perturb_time_parameters(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = DiMRModel.from_pretrained(tmp_path)
    x, t, y = tiny_inputs()
    assert loaded.config.stage_configs == model.config.stage_configs
    assert torch.equal(loaded(x, t, y).sample, model(x, t, y).sample)


def official_tiny_state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return {key: torch.randn(shape, generator=generator) for key, shape in OFFICIAL_KEYS["tiny"].items()}


def test_official_layout_loads_strictly_into_the_tiny_config():
    official = official_tiny_state_dict()
    model = load_official_dimr({f"module.{k}": v for k, v in official.items()}, dimr_config("tiny"))
    ours = model.state_dict()
    assert len(ours) == len(official)
    for key, value in official.items():
        assert torch.equal(ours[official_to_genforge_key(key)], value), key
    x, t, y = tiny_inputs()
    assert torch.isfinite(model(x, t, y).sample).all()


def test_official_qkv_layout_splits_heads_like_the_official_reshape():
    model = load_official_dimr(official_tiny_state_dict(), dimr_config("tiny"))
    attn = model.stages[0].blocks[0].attn
    x = torch.randn(1, 5, 32)
    qkv = attn.qkv(x)
    q_official = qkv.reshape(1, 5, 3 * 4, 8).permute(0, 2, 1, 3).chunk(3, dim=1)[0]
    q_ours = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=4)[0]
    assert torch.equal(q_official, q_ours)


@pytest.mark.parametrize("mutation", ["drop", "extra", "reshape"])
def test_mismatched_official_checkpoints_are_refused_with_the_offending_keys(mutation):
    state = official_tiny_state_dict()
    key = "stages.0.blocks.1.block2.w0.weight"
    if mutation == "drop":
        del state[key]
    elif mutation == "extra":
        state["stages.0.blocks.1.block2.w3.weight"] = torch.zeros(2)
    else:
        state[key] = torch.zeros(3, 3)
    with pytest.raises(ConversionError, match=r"blocks\.1\."):
        load_official_dimr(state, dimr_config("tiny"))


@pytest.mark.parametrize("name, official_params", [("XL/2R", 505e6), ("G/2R", 1.06e9)])
def test_paper_configs_match_the_published_parameter_counts(name, official_params):
    with torch.device("meta"):
        model = DiMRModel(**dimr_config(name))
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - official_params) / official_params < 0.05


def test_xl_config_has_exactly_the_official_keys_and_shapes():
    with torch.device("meta"):
        model = DiMRModel(**dimr_config("XL/2R"))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    mapped = {official_to_genforge_key(k): shape for k, shape in OFFICIAL_KEYS["XL/2R"].items()}
    assert ours == mapped


def test_bad_stage_configs_are_named():
    stages = dimr_config("tiny")["stage_configs"]
    stages[1]["kernal_size"] = 3
    with pytest.raises(ValueError, match="kernal_size"):
        DiMRModel(**dimr_config("tiny", stage_configs=stages))


def deterministic(shape, index: int, scale: float = 0.3) -> torch.Tensor:
    """scale * sin(0.7 k + index) over the k-th element, as the official reference fixture was made."""
    k = torch.arange(math.prod(shape), dtype=torch.float64)
    return (scale * torch.sin(k * 0.7 + index)).float().reshape(shape)


def test_an_official_ln_model_on_a_non_square_grid_loads_as_td_ln_and_gives_the_official_outputs():
    # the fixture's config names no norm_type: the official default "LN", a time-dependent LayerNorm
    ref = OFFICIAL_REFERENCE["tiny_ln_wide"]
    state = {key: deterministic(shape, i) for i, (key, shape) in enumerate(sorted(ref["shapes"].items()))}
    assert official_norm_type(state) == "LN"
    config = official_config(ref["config"])
    assert config["norm_type"] == "TDLN" and config["sample_size"] == [8, 16]
    model = load_official_dimr(state, config)
    assert isinstance(model.stages[1].blocks[0].mlp_norm, TDLayerNorm)
    x = deterministic(ref["x_shape"], 1000, 1.0)  # 6x16: the grids (3x8, 6x16) are below max_height only
    with torch.no_grad():
        outputs = model(x, torch.tensor(ref["n"]) - 1, torch.tensor(ref["y"])).multiscale
    for ours, official, shape in zip(outputs, ref["outputs"], ref["output_shapes"]):
        assert torch.allclose(ours, torch.tensor(official).reshape(shape), atol=1e-5)


def test_the_block_norm_comes_from_the_checkpoint_and_a_conflicting_config_is_refused():
    state = official_tiny_state_dict()
    assert official_norm_type(state) == "TDRMSN"
    assert isinstance(load_official_dimr(state, dimr_config("tiny")).stages[0].blocks[0].attn_norm, TDRMSNorm)
    with pytest.raises(ConversionError, match="'TDRMSN'.*asks for 'TDLN'"):
        load_official_dimr(state, dimr_config("tiny", norm_type="TDLN"))


@pytest.mark.parametrize("suffix, name", [("scale", "RMSN"), ("linear.weight", "ADARMSN")])
def test_official_norms_no_released_model_uses_are_refused_by_name(suffix, name):
    state = {k: v for k, v in official_tiny_state_dict().items() if ".norm.scale." not in k}
    state["stages.0.blocks.0.block2.norm." + suffix] = torch.ones(32)
    assert official_norm_type(state) == name
    with pytest.raises(ConversionError, match=f"norm_type '{name}' is not supported"):
        load_official_dimr(state, dimr_config("tiny"))


def test_paper_configs_are_the_official_configs():
    for name in ("XL/2R", "G/2R"):
        official = official_config(OFFICIAL_REFERENCE["paper_configs"][name])
        ours = dimr_config(name)
        assert validate_stages(official.pop("stage_configs")) == validate_stages(ours.pop("stage_configs"))
        assert official["norm_type"] == inspect.signature(DiMRModel).parameters["norm_type"].default == "TDRMSN"
        assert {k: official[k] for k in ours} == ours


def test_a_wide_grid_reads_positions_by_max_width_and_agrees_with_the_square_model_on_square_inputs():
    square = tiny_model()
    stages = dimr_config("tiny")["stage_configs"]
    stages[0]["max_width"], stages[1]["max_width"] = 8, 16
    wide = DiMRModel(**dimr_config("tiny", stage_configs=stages, sample_size=[8, 16]))
    state = square.state_dict()
    for r, (height, width) in enumerate([(4, 8), (8, 16)]):
        table = torch.zeros(height * width, state[f"stages.{r}.pos_embed.weight"].shape[1])
        rows = torch.arange(height)[:, None] * width + torch.arange(height)[None, :]  # (i, j) -> i * max_width + j
        table[rows.flatten()] = state[f"stages.{r}.pos_embed.weight"]
        state[f"stages.{r}.pos_embed.weight"] = table
    wide.load_state_dict(state)
    x, t, y = tiny_inputs()
    assert torch.equal(wide(x, t, y).sample, square(x, t, y).sample)
    assert wide(torch.randn(2, 4, 8, 16), t, y).sample.shape == (2, 4, 8, 16)
    with pytest.raises(ValueError, match="exceeds its maximum 4x8"):
        wide(torch.randn(2, 4, 8, 18), t, y)


def test_a_cascade_that_grows_height_and_width_by_different_ratios_is_refused():
    stages = dimr_config("tiny")["stage_configs"]
    stages[1]["max_width"] = 16
    with pytest.raises(ValueError, match="2x in height but 4x in width"):
        DiMRModel(**dimr_config("tiny", stage_configs=stages))


def test_the_converter_cli_lists_every_named_config_and_writes_a_loadable_model(tmp_path, capsys):
    with pytest.raises(SystemExit):
        convert_main(["--help"])
    usage = capsys.readouterr().out
    assert all(name in usage for name in DIMR_CONFIGS)
    official = official_tiny_state_dict()
    torch.save({"module." + k: v for k, v in official.items()}, tmp_path / "nnet_ema.pth")
    convert_main([str(tmp_path / "nnet_ema.pth"), "--config", "tiny", "--out", str(tmp_path / "converted")])
    converted = DiMRModel.from_pretrained(tmp_path / "converted").state_dict()
    assert all(torch.equal(converted[official_to_genforge_key(k)], v) for k, v in official.items())
