"""IBN-Net (arXiv 1807.09441): where IBN-a and IBN-b put InstanceNorm, what the IBN layer
computes, paper sizes, and the official XingangPan/IBN-Net checkpoint layout."""

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import genforge.backbones.ibnnet  # noqa: F401  (registers the gf_resnet*_ibn_* models)
from genforge.backbones.ibnnet import IBN
from genforge.backbones.registry import load_official

OFFICIAL = json.loads((Path(__file__).parents[1] / "fixtures/backbones/ibnnet_official_keys.json").read_text())


def _official_zeros(name: str) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(shape) for k, shape in OFFICIAL["models"][name]["state_dict"].items()}


@pytest.mark.parametrize("name", ["gf_resnet_nano_ibn_a", "gf_resnet_nano_ibn_b"])
def test_nano_honours_the_timm_contract(timm_contract, name):
    timm_contract(name, img_size=32)


def test_nano_loss_falls_on_digits_over_sgd_steps(loss_falls):
    loss_falls("gf_resnet_nano_ibn_a", img_size=32, optimizer=torch.optim.SGD, lr=0.05)


@pytest.mark.parametrize("planes", [64, 128, 7])
def test_ibn_sends_int_half_of_the_channels_through_affine_instance_norm(planes):
    ibn = IBN(planes)
    assert ibn.half == int(planes * 0.5)
    assert ibn.IN.num_features == ibn.half and ibn.IN.affine and not ibn.IN.track_running_stats
    assert ibn.BN.num_features == planes - ibn.half


def test_ibn_is_instance_norm_on_the_first_half_and_batch_norm_on_the_rest():
    torch.manual_seed(0)
    ibn = IBN(8).train()
    with torch.no_grad():
        for p in (ibn.IN.weight, ibn.IN.bias, ibn.BN.weight, ibn.BN.bias):
            p.normal_()
    x = torch.randn(3, 8, 5, 5) * 3 + 1
    mean_i, var_i = x[:, :4].mean((2, 3), keepdim=True), x[:, :4].var((2, 3), unbiased=False, keepdim=True)
    mean_b, var_b = x[:, 4:].mean((0, 2, 3), keepdim=True), x[:, 4:].var((0, 2, 3), unbiased=False, keepdim=True)
    expected = torch.cat((
        (x[:, :4] - mean_i) / (var_i + 1e-5).sqrt() * ibn.IN.weight[:, None, None] + ibn.IN.bias[:, None, None],
        (x[:, 4:] - mean_b) / (var_b + 1e-5).sqrt() * ibn.BN.weight[:, None, None] + ibn.BN.bias[:, None, None]), 1)
    torch.testing.assert_close(ibn(x), expected, atol=1e-5, rtol=1e-4)

    # the IN half depends on its own image only; the BN half on the whole batch
    x2 = x.clone()
    x2[1:] = torch.randn_like(x2[1:])
    out, out2 = ibn(x), ibn(x2)
    torch.testing.assert_close(out[0, :4], out2[0, :4])
    assert not torch.allclose(out[0, 4:], out2[0, 4:])


def test_ibn_a_modifies_the_first_norm_of_every_block_in_stages_1_to_3_only(meta_model):
    model = meta_model("gf_resnet50_ibn_a")
    assert type(model.bn1) is nn.BatchNorm2d
    for i, planes in enumerate((64, 128, 256, 512)):
        for blk in getattr(model, f"layer{i + 1}"):
            assert blk.IN is None
            if i < 3:
                assert isinstance(blk.bn1, IBN) and blk.bn1.half == planes // 2
                assert blk.bn1.IN.num_features + blk.bn1.BN.num_features == planes
            else:
                assert type(blk.bn1) is nn.BatchNorm2d
            assert type(blk.bn2) is type(blk.bn3) is nn.BatchNorm2d


def test_ibn_b_puts_instance_norm_in_the_stem_and_after_the_add_closing_stages_1_and_2(meta_model):
    model = meta_model("gf_resnet50_ibn_b")
    assert isinstance(model.bn1, nn.InstanceNorm2d) and model.bn1.affine
    for i, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
        with_in = [j for j, blk in enumerate(layer) if blk.IN is not None]
        assert with_in == ([len(layer) - 1] if i < 2 else [])
        assert all(type(blk.bn1) is nn.BatchNorm2d for blk in layer)
    assert model.layer2[-1].IN.num_features == 512 and model.layer2[-1].IN.affine


def test_ibn_b_block_is_relu_of_instance_norm_of_the_residual_sum():
    torch.manual_seed(0)
    model = timm.create_model("gf_resnet_nano_ibn_b").train()
    blk = model.layer1[-1]
    with torch.no_grad():
        blk.IN.weight.normal_()
        blk.IN.bias.normal_()
    x = torch.randn(2, 16, 8, 8)
    residual = blk.bn2(blk.conv2(F.relu(blk.bn1(blk.conv1(x))))) + x
    expected = F.relu(F.instance_norm(residual, weight=blk.IN.weight, bias=blk.IN.bias))
    torch.testing.assert_close(blk(x), expected)


# IBN-Net README (XingangPan/IBN-Net) and specs/backbones.md: ResNet-50-IBN-a has 25.6M
# parameters; IBN adds no parameters to ResNet-18 (11.7M) / ResNet-50 (25.6M).
@pytest.mark.parametrize("name, paper_params", [
    ("gf_resnet50_ibn_a", 25.6e6), ("gf_resnet50_ibn_b", 25.6e6), ("gf_resnet18_ibn_a", 11.7e6),
    ("gf_resnet101_ibn_a", 44.5e6)])
def test_parameter_count_matches_the_paper(meta_param_count, name, paper_params):
    n = meta_param_count(name)
    assert abs(n - paper_params) / paper_params < 0.05, n
    official = OFFICIAL["models"].get(name.removeprefix("gf_"))
    if official is not None:
        assert n == official["num_params"]


@pytest.mark.parametrize("name", ["resnet50_ibn_a", "resnet50_ibn_b", "resnet18_ibn_a", "resnet18_ibn_b"])
def test_official_checkpoint_layout_loads_strictly(name):
    with torch.device("meta"):
        model = load_official("gf_" + name, _official_zeros(name))
    assert set(model.state_dict()) == set(OFFICIAL["models"][name]["state_dict"])


def test_a_missing_or_extra_official_key_is_named(official_key_errors_named):
    official_key_errors_named("gf_resnet50_ibn_a", _official_zeros("resnet50_ibn_a"), missing="layer2.3.bn1.IN.weight",
                              extra="layer4.0.IN.weight", extra_shape=(2048,))  # IBN-b's post-add IN: none in IBN-a


def test_a_bad_ibn_configuration_is_refused():
    with pytest.raises(ValueError, match="ibn_cfg"):
        timm.create_model("gf_resnet_nano_ibn_a", ibn_cfg=("a", "c", None, None))
