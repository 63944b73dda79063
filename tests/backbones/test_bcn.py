"""Batch-Channel Normalization + Weight Standardization (arXiv 1903.10520 / 1911.09738): the
BCN formula, micro-batch BCN at one image, WS, sizes, and the official checkpoint layout."""

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import StdConv2d
from torch import nn

import genforge.backbones.bcn  # noqa: F401  (registers the gf_resnet*_ws_bcn models)
from genforge.backbones.bcn import BatchChannelNorm2d, convert_official
from genforge.backbones.registry import load_official


def _randomise(norm: BatchChannelNorm2d) -> BatchChannelNorm2d:
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
        norm.pbn.running_mean.normal_()
        norm.pbn.running_var.uniform_(0.5, 2.)
    return norm


def _naive_channel_norm(xb: torch.Tensor, norm: BatchChannelNorm2d) -> torch.Tensor:
    """Per sample and group of C/G channels: normalise over (C/G, H, W), then the per-group affine."""
    b, c, h, w = xb.shape
    g = xb.reshape(b, norm.num_groups, -1)
    mean, var = g.mean(-1, keepdim=True), g.var(-1, unbiased=False, keepdim=True)
    return (((g - mean) / (var + 1e-5).sqrt()) * norm.weight + norm.bias).reshape(b, c, h, w)


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v[None, :, None, None]


def test_nano_honours_the_timm_contract(timm_contract):
    timm_contract("gf_resnet_nano_ws_bcn", img_size=32)


def test_nano_loss_falls_on_digits_over_sgd_steps(loss_falls):
    loss_falls("gf_resnet_nano_ws_bcn", img_size=32, optimizer=torch.optim.SGD, lr=0.05)


def test_bcn_is_batch_norm_then_channel_norm_with_a_per_group_affine():
    torch.manual_seed(0)
    norm = _randomise(BatchChannelNorm2d(8, num_groups=4)).train()
    x = torch.randn(3, 8, 5, 5) * 2 + 1
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    xb = (x - _per_channel(mean)) / _per_channel(var + 1e-5).sqrt()
    xb = xb * _per_channel(norm.pbn.weight) + _per_channel(norm.pbn.bias)
    torch.testing.assert_close(norm(x), _naive_channel_norm(xb, norm), atol=1e-5, rtol=1e-4)
    assert norm.weight.shape == norm.bias.shape == (1, 4, 1)


def test_micro_batch_bcn_moves_its_estimates_then_normalises_with_them():
    torch.manual_seed(0)
    r = 0.25
    norm = _randomise(BatchChannelNorm2d(8, num_groups=2, estimate=True, moving_speed=r)).train()
    mu_old, var_old = norm.pbn.running_mean.clone(), norm.pbn.running_var.clone()
    x = torch.randn(2, 8, 4, 4) * 3 - 1
    out = norm(x)

    mu = (1 - r) * mu_old + r * x.mean((0, 2, 3))
    var = (1 - r) * var_old + r * (x - _per_channel(mu_old)).square().mean((0, 2, 3))
    torch.testing.assert_close(norm.pbn.running_mean, mu)
    torch.testing.assert_close(norm.pbn.running_var, var)
    xb = (x - _per_channel(mu)) / _per_channel(var + 1e-5).sqrt() * _per_channel(norm.pbn.weight)
    xb = xb + _per_channel(norm.pbn.bias)
    torch.testing.assert_close(out, _naive_channel_norm(xb, norm), atol=1e-5, rtol=1e-4)


def test_micro_batch_bcn_trains_at_one_image_per_batch_where_batch_norm_cannot():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)  # the last stage is 1x1: one value per channel
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        timm.create_model("gf_resnet_nano_ws_bcn", num_classes=3).train()(x)
    model = timm.create_model("gf_resnet_nano_ws_bcn", num_classes=3, bcn_estimate=True).train()
    loss = F.cross_entropy(model(x), torch.tensor([1]))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.layer4[0].bn1.pbn.running_var.ne(1).any()  # the estimates moved


@pytest.mark.parametrize("estimate, mode", [(True, "train"), (True, "eval"), (False, "eval")])
def test_an_image_gives_the_same_output_alone_or_in_a_batch_once_running_estimates_are_used(estimate, mode):
    torch.manual_seed(0)
    model = timm.create_model("gf_resnet_nano_ws_bcn", num_classes=5, bcn_estimate=estimate, bcn_moving_speed=0.)
    for m in model.modules():
        if isinstance(m, BatchChannelNorm2d):
            _randomise(m)
    getattr(model, mode)()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


def test_every_conv_is_weight_standardised_to_zero_mean_unit_variance_filters():
    torch.manual_seed(0)
    model = timm.create_model("gf_resnet_nano_ws_bcn")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, StdConv2d) and m.eps == 1e-5 for m in convs)
    conv = model.layer2[0].conv1
    w = conv.weight
    w_hat = (w - w.mean((1, 2, 3), keepdim=True)) / (w.var((1, 2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
    x = torch.randn(1, conv.in_channels, 8, 8)
    torch.testing.assert_close(conv(x), F.conv2d(x, w_hat, None, conv.stride, conv.padding), atol=1e-5, rtol=1e-4)
    assert w_hat.flatten(1).mean(1).abs().max() < 1e-6
    var = w.flatten(1).var(1, unbiased=False)  # unit variance up to eps: var / (var + eps)
    torch.testing.assert_close(w_hat.flatten(1).var(1, unbiased=False), var / (var + 1e-5))


def test_residual_branches_end_in_a_zero_bcn_weight_as_in_the_official_code():
    model = timm.create_model("gf_resnet_nano_ws_bcn", zero_init_last=True)
    last = [blk.bn2 for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for blk in layer]
    assert all(torch.all(bn.weight == 0) for bn in last)
    assert torch.all(model.layer1[0].bn1.weight == 1)


def test_bcn_affine_params_are_excluded_from_weight_decay():
    model = timm.create_model("gf_resnet_nano_ws_bcn")
    skip = model.no_weight_decay()
    assert "layer1.0.bn1.weight" in skip and "layer1.0.bn1.bias" in skip and "bn1.weight" in skip
    assert not any("pbn" in n or "conv" in n for n in skip)


def _official_keys(tv_resnet: str, groups: int = 32) -> dict[str, torch.Size]:
    """The official ``l_resnet*`` layout: torchvision's ResNet with each BN ``P`` turned into BCN
    (``P.weight``/``P.bias`` of shape (1, G, 1) plus ``P.pbn.*``), checked against
    joe-siyuan-qiao/Batch-Channel-Normalization@0244c3e imagenet/models/imagenet/resnet.py."""
    with torch.device("meta"):
        tv = timm.create_model(tv_resnet).state_dict()  # timm's resnet18/50 keep torchvision's names
    norms = {k.removesuffix(".running_mean") for k in tv if k.endswith(".running_mean")}
    out = {}
    for key, value in tv.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in norms:
            out[f"{prefix}.pbn.{leaf}"] = value.shape
            if leaf in ("weight", "bias"):
                out[key] = torch.Size((1, groups, 1))
        else:
            out[key] = value.shape
    return out


# Official parameter counts (l_resnet* built from the official code): ResNet-18 11,690,792 and
# ResNet-50 25,560,424, i.e. torchvision's 11.7M / 25.6M plus 2G per BCN.
@pytest.mark.parametrize("name, tv, official_params", [
    ("gf_resnet18_ws_bcn", "resnet18", 11_690_792), ("gf_resnet50_ws_bcn", "resnet50", 25_560_424)])
def test_official_checkpoint_layout_loads_strictly_and_counts_match(name, tv, official_params):
    keys = _official_keys(tv)
    with torch.device("meta"):
        state = {"module." + k: torch.zeros(shape) for k, shape in keys.items()}
        model = load_official(name, state)
    assert set(model.state_dict()) == set(keys)
    assert sum(p.numel() for p in model.parameters()) == official_params


def test_official_running_stats_are_rescaled_for_the_biased_weight_standardisation():
    """The official WS divides by the unbiased filter std; eval outputs must still agree."""
    torch.manual_seed(0)
    model = timm.create_model("gf_resnet_nano_ws_bcn")
    conv, bn = model.layer1[0].conv1, model.layer1[0].bn1
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["layer1.0.bn1.pbn.running_mean"].normal_()
    state["layer1.0.bn1.pbn.running_var"].uniform_(0.5, 2.)
    converted = convert_official(state, model)
    model.load_state_dict(converted)
    model.eval()

    w = conv.weight
    w_official = (w - w.mean((1, 2, 3), keepdim=True)) / (w.flatten(1).var(1)[:, None, None, None] + 1e-5).sqrt()
    x = torch.randn(2, conv.in_channels, 8, 8)
    y = F.conv2d(x, w_official, None, conv.stride, conv.padding)
    pbn = bn.pbn
    official = (y - _per_channel(state["layer1.0.bn1.pbn.running_mean"])) / _per_channel(
        state["layer1.0.bn1.pbn.running_var"] + 1e-5).sqrt() * _per_channel(pbn.weight) + _per_channel(pbn.bias)
    with torch.no_grad():
        torch.testing.assert_close(bn(conv(x)), _naive_channel_norm(official, bn), atol=1e-4, rtol=1e-4)


def test_a_missing_or_extra_official_key_is_named(official_key_errors_named):
    state = {k: torch.zeros(s, device="meta") for k, s in _official_keys("resnet18").items()}
    official_key_errors_named("gf_resnet18_ws_bcn", state, missing="layer3.1.bn2.pbn.running_var",
                              extra="layer3.1.bn3.weight", extra_shape=(1, 32, 1))


def test_groups_that_do_not_divide_the_channels_are_refused():
    with pytest.raises(ValueError, match="48 channels do not split into 32 groups"):
        BatchChannelNorm2d(48, num_groups=32)
