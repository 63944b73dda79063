"""UniRepLKNet (arXiv 2311.15599): Dilated Reparam Block, structural re-parameterisation, configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.utils import reparameterize_model
from torch import nn

import genforge.backbones.unireplknet  # noqa: F401  (registers the gf_unireplknet_* models)
from genforge.backbones.registry import load_official
from genforge.backbones.unireplknet import DilatedReparamBlock, UniRepLKNetBlock, dilated_to_dense_kernel

OFFICIAL = json.loads((Path(__file__).parents[1] / "fixtures" / "backbones" / "unireplknet_official_keys.json")
                      .read_text())


@pytest.fixture
def as_trained(randomise_running_stats):
    """``as_trained(module, seed=0)``: random BN running statistics, affine/GRN parameters and layer
    scales, as a trained model has, in eval mode.

    At initialisation BN is the identity in eval mode and GRN/layer scale are ~0, which would
    let a wrong fusion pass unnoticed.
    """
    def as_trained(module: nn.Module, seed: int = 0) -> nn.Module:
        g = torch.Generator().manual_seed(seed)
        randomise_running_stats(module, g)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if p.ndim <= 1 or name.endswith(("grn.gamma", "grn.beta")):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
        return module
    return as_trained


def test_dilated_kernel_equals_its_sparse_large_kernel():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 17, 17)
    kernel = torch.randn(3, 1, 3, 3)
    dense = dilated_to_dense_kernel(kernel, 4)
    assert dense.shape == (3, 1, 9, 9)
    assert torch.count_nonzero(dense) == kernel.numel()  # only every 4th tap carries a weight
    dilated = F.conv2d(x, kernel, padding=4, dilation=4, groups=3)
    torch.testing.assert_close(F.conv2d(x, dense, padding=4, groups=3), dilated)


def test_dilated_reparam_block_is_a_large_conv_plus_dilated_branches_each_with_bn(as_trained):
    block = DilatedReparamBlock(4, 13)
    assert block.lk_origin.kernel_size == (13, 13) and block.lk_origin.bias is None
    for k, r in ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)):
        conv = block.dilated[f"k{k}_{r}"].conv
        assert conv.kernel_size == (k, k) and conv.dilation == (r, r) and conv.groups == 4
        assert isinstance(block.dilated[f"k{k}_{r}"].bn, nn.BatchNorm2d)
    x = torch.randn(2, 4, 15, 15)
    block = as_trained(block)
    branches = block.origin_bn(block.lk_origin(x)) + sum(
        block.dilated[f"k{k}_{r}"].bn(block.dilated[f"k{k}_{r}"].conv(x)) for k, r in block.branches)
    torch.testing.assert_close(block(x), branches)


def test_dilated_reparam_block_merges_into_one_conv_in_eval_mode(as_trained):
    torch.manual_seed(0)
    block = as_trained(DilatedReparamBlock(4, 13))
    x = torch.randn(2, 4, 19, 19)
    with torch.no_grad():
        expected = block(x)
        block.reparameterize()
        block.reparameterize()  # idempotent, as timm's walk calls it again after the block did
        torch.testing.assert_close(block(x), expected, atol=1e-4, rtol=1e-4)
    assert [type(m) for m in block.children()] == [nn.Conv2d]
    assert block.lk_origin.kernel_size == (13, 13) and block.lk_origin.bias is not None


@pytest.mark.parametrize("kernel_size", [3, 13])
def test_block_reparameterisation_folds_bn_grn_bias_and_layer_scale_exactly(as_trained, kernel_size):
    torch.manual_seed(0)
    block = as_trained(UniRepLKNetBlock(8, kernel_size))
    x = torch.randn(2, 8, 11, 11)
    with torch.no_grad():
        expected = block(x)
        block.reparameterize()
        torch.testing.assert_close(block(x), expected, atol=1e-4, rtol=1e-4)
    assert block.gamma is None and block.grn.beta is None
    assert isinstance(block.norm, nn.Identity) and isinstance(block.norm2, nn.Identity)
    assert block.pwconv2.bias is not None


def test_reparameterized_model_gives_the_training_structure_outputs(as_trained):
    torch.manual_seed(0)
    model = as_trained(timm.create_model("gf_unireplknet_nano", num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    fused = reparameterize_model(model)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in model.parameters())
    assert len(list(fused.modules())) < len(list(model.modules()))
    for block in (b for stage in fused.stages for b in stage.blocks):
        spatial = [m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
        assert len(spatial) == 1, "one depthwise conv per block after fusion"
        assert not any(isinstance(m, nn.BatchNorm2d) for m in block.modules())


def test_reparameterized_weights_load_into_the_deploy_structure(as_trained):
    torch.manual_seed(0)
    model = as_trained(timm.create_model("gf_unireplknet_nano", num_classes=10))
    fused = reparameterize_model(model)
    deploy = timm.create_model("gf_unireplknet_nano", num_classes=10, deploy=True).eval()
    deploy.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), model(x), atol=1e-4, rtol=1e-4)


def test_timm_contract(timm_contract):
    timm_contract("gf_unireplknet_nano", img_size=32)


def test_loss_falls_on_digits(loss_falls):
    loss_falls("gf_unireplknet_nano", img_size=32, optimizer=torch.optim.AdamW, lr=3e-3)


# Official README (AILab-CVC/UniRepLKNet) ImageNet-1k table; these are counts of the fused
# (re-parameterised) model: the official code gives 4.44M / 6.24M / 10.74M / 18.32M / 31.04M fused.
PAPER_PARAMS_M = {"a": 4.4, "f": 6.2, "p": 10.7, "n": 18.3, "t": 31.0}


@pytest.mark.parametrize("variant", sorted(PAPER_PARAMS_M))
def test_paper_parameter_counts(meta_param_count, variant):
    count = meta_param_count(f"gf_unireplknet_{variant}", deploy=True) / 1e6
    assert abs(count - PAPER_PARAMS_M[variant]) / PAPER_PARAMS_M[variant] < 0.05, count


def test_fusing_the_training_structure_gives_the_deploy_structure(meta_model):
    trained, deploy = meta_model("gf_unireplknet_a"), meta_model("gf_unireplknet_a", deploy=True)
    fused = reparameterize_model(trained, inplace=True)
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in deploy.state_dict().items()}


def _official_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=g) if shape else torch.tensor(0) for k, shape in OFFICIAL["keys"].items()}


def test_official_checkpoint_layout_loads_strictly(tmp_path):
    state = _official_state()
    model = load_official("gf_unireplknet_a", state)
    ours = model.state_dict()
    torch.testing.assert_close(ours["stem.3.weight"], state["downsample_layers.0.3.weight"])
    torch.testing.assert_close(ours["stages.2.downsample.0.weight"], state["downsample_layers.2.0.weight"])
    torch.testing.assert_close(ours["stages.1.blocks.0.dwconv.dilated.k7_2.conv.weight"],
                               state["stages.1.0.dwconv.dil_conv_k7_2.weight"])
    torch.testing.assert_close(ours["stages.1.blocks.0.dwconv.dilated.k7_2.bn.running_var"],
                               state["stages.1.0.dwconv.dil_bn_k7_2.running_var"])
    torch.testing.assert_close(ours["stages.3.blocks.1.norm2.running_var"], state["stages.3.1.pwconv2.2.running_var"])
    torch.testing.assert_close(ours["head.fc.weight"], state["head.weight"])

    file = tmp_path / "unireplknet_a_official.safetensors"
    save_file(state, str(file))
    through_timm = timm.create_model("gf_unireplknet_a", pretrained=True,
                                     pretrained_cfg_overlay=dict(file=str(file)))  # checkpoint_filter_fn converts
    torch.testing.assert_close(through_timm.state_dict()["stages.0.blocks.1.grn.gamma"],
                               state["stages.0.1.act.1.gamma"])


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_official_checkpoint_with_a_wrong_key_is_refused_naming_it(official_key_errors_named, change):
    key, named = {"missing": ("stages.2.3.se.up.weight", "stages.2.blocks.3.se.fc2.weight"),
                  "extra": ("stages.2.3.extra_branch.weight", "stages.2.blocks.3.extra_branch.weight")}[change]
    official_key_errors_named("gf_unireplknet_a", _official_state(), **{change: key}, named=(named,))
