"""HorNet (arXiv 2207.14284): gnConv's widths and recursion, the GF filter, layer scale,
paper sizes, and the official raoyongming/HorNet checkpoint layout."""

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import genforge.backbones.hornet  # noqa: F401  (registers the gf_hornet_* models)
from genforge.backbones.hornet import GlobalLocalFilter, GnConv, HorNetBlock, gnconv_widths
from genforge.backbones.registry import load_official

OFFICIAL = json.loads((Path(__file__).parents[1] / "fixtures/backbones/hornet_official_keys.json").read_text())


def _official_zeros(name: str) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(shape) for k, shape in OFFICIAL["models"][name]["state_dict"].items()}


def test_nano_honours_the_timm_contract(timm_contract):
    timm_contract("gf_hornet_nano", img_size=32)


def test_nano_loss_falls_on_digits(loss_falls):
    loss_falls("gf_hornet_nano", img_size=32, optimizer=torch.optim.AdamW, lr=3e-3)


@pytest.mark.parametrize("dim", [64, 128, 512])
@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_gnconv_widths_split_2c_and_end_at_c(dim, order):
    dims = gnconv_widths(dim, order)
    assert dims[0] + sum(dims) == 2 * dim  # proj_in's 2C outputs split exactly into p_0 and q
    assert dims[-1] == dim  # the last gate feeds proj_out's C inputs
    assert all(b == 2 * a for a, b in zip(dims, dims[1:]))  # C_k = C / 2^(n-1-k)
    conv = GnConv(dim, order)
    assert conv.proj_in.out_channels == 2 * dim and conv.proj_out.in_channels == dims[-1]
    assert [(pw.in_channels, pw.out_channels) for pw in conv.pws] == list(zip(dims, dims[1:]))


def test_gnconv_width_not_divisible_by_the_order_is_refused():
    with pytest.raises(ValueError, match="divisible by 16"):
        gnconv_widths(40, 5)


def test_gnconv_order1_is_the_gated_form():
    torch.manual_seed(0)
    dim, s = 8, 1 / 3
    conv = GnConv(dim, order=1, scale=s)
    x = torch.randn(2, dim, 9, 9)
    t = F.conv2d(x, conv.proj_in.weight, conv.proj_in.bias)
    p0, q = t[:, :dim], t[:, dim:]
    gate = s * F.conv2d(q, conv.dwconv.weight, conv.dwconv.bias, padding=3, groups=dim)
    expected = F.conv2d(p0 * gate, conv.proj_out.weight, conv.proj_out.bias)
    torch.testing.assert_close(conv(x), expected)


def _naive_gnconv(conv: GnConv, x: torch.Tensor) -> torch.Tensor:
    """Eq. 3-5 one gate at a time: a separate depthwise 7x7 conv per q_k and an explicit 1x1 sum per g_k."""
    dims, order = conv.dims, conv.order
    w_in, b_in = conv.proj_in.weight[:, :, 0, 0], conv.proj_in.bias
    t = torch.einsum("oc,bchw->bohw", w_in, x) + b_in[None, :, None, None]
    p = t[:, :dims[0]]
    start = dims[0]
    for k in range(order):
        q_k = t[:, start:start + dims[k]]
        lo = start - dims[0]
        w_k = conv.dwconv.weight[lo:lo + dims[k]]
        b_k = conv.dwconv.bias[lo:lo + dims[k]]
        f_k = conv.scale * F.conv2d(q_k, w_k, b_k, padding=3, groups=dims[k])
        if k > 0:
            pw = conv.pws[k - 1]
            p = torch.einsum("oc,bchw->bohw", pw.weight[:, :, 0, 0], p) + pw.bias[None, :, None, None]
        p = p * f_k
        start += dims[k]
    w_out, b_out = conv.proj_out.weight[:, :, 0, 0], conv.proj_out.bias
    return torch.einsum("oc,bchw->bohw", w_out, p) + b_out[None, :, None, None]


@pytest.mark.parametrize("order", [2, 3, 5])
def test_gnconv_recursion_equals_a_naive_loop(order):
    torch.manual_seed(order)
    conv = GnConv(32, order=order, scale=1 / 3)
    x = torch.randn(2, 32, 8, 8)
    torch.testing.assert_close(conv(x), _naive_gnconv(conv, x), atol=1e-5, rtol=1e-4)


def test_global_filter_is_a_circular_convolution_interleaved_with_the_local_branch():
    """GF: the frequency-domain product is a circular convolution with the filter's spatial kernel."""
    torch.manual_seed(0)
    dim, size = 4, 6
    gf = GlobalLocalFilter(dim, filter_size=(size, size // 2 + 1))
    kernel = torch.randn(dim // 2, size, size)  # a real spatial kernel, stored as its rfft2 like a trained filter
    with torch.no_grad():
        gf.complex_weight.copy_(torch.view_as_real(torch.fft.rfft2(kernel)))
    x = torch.randn(1, dim, size, size)

    xn = gf.pre_norm(x)
    local = F.conv2d(xn[:, :dim // 2], gf.dw.weight, padding=1, groups=dim // 2)
    glob = torch.zeros_like(local)
    for dy in range(size):  # y[n] = sum_m x[n - m] k[m], indices modulo the map size
        for dx in range(size):
            glob += kernel[None, :, dy, dx, None, None] * torch.roll(xn[:, dim // 2:], (dy, dx), dims=(2, 3))
    expected = torch.empty_like(x)
    expected[:, 0::2], expected[:, 1::2] = local, glob
    torch.testing.assert_close(gf(x), gf.post_norm(expected), atol=1e-5, rtol=1e-4)


def test_global_filter_resizes_its_stored_filter_to_other_map_sizes():
    gf = GlobalLocalFilter(8, filter_size=(14, 8))
    x = torch.randn(1, 8, 10, 10)
    assert gf(x).shape == x.shape
    gf(x).sum().backward()
    assert gf.complex_weight.grad.abs().sum() > 0


def test_layer_scale_starts_at_1e_6_so_blocks_start_near_identity():
    torch.manual_seed(0)
    block = HorNetBlock(32, order=3, scale=1 / 3)
    assert torch.equal(block.gamma1, torch.full((32,), 1e-6)) and torch.equal(block.gamma2, torch.full((32,), 1e-6))
    x = torch.randn(2, 32, 8, 8)
    assert (block(x) - x).abs().max() < 1e-4
    model = timm.create_model("gf_hornet_nano")
    gammas = [p for n, p in model.named_parameters() if n.endswith(("gamma1", "gamma2"))]
    assert len(gammas) == 8 and all(torch.all(g == 1e-6) for g in gammas)
    assert HorNetBlock(32, order=3, scale=1 / 3, layer_scale_init_value=0).gamma1 is None


def test_gf_variant_puts_the_global_filter_in_stages_3_and_4_only(meta_model):
    model = meta_model("gf_hornet_tiny_gf")
    kinds = [{type(b.gnconv.dwconv).__name__ for b in stage.blocks} for stage in model.stages]
    assert kinds == [{"Conv2d"}, {"Conv2d"}, {"GlobalLocalFilter"}, {"GlobalLocalFilter"}]
    assert [{b.gnconv.order for b in stage.blocks} for stage in model.stages] == [{2}, {3}, {4}, {5}]
    assert all(b.gnconv.scale == pytest.approx(1 / 3) for stage in model.stages for b in stage.blocks)


# HorNet README (raoyongming/HorNet), ImageNet-1k table: HorNet-T 7x7 22M, T GF 23M, S 7x7 50M,
# B GF 88M parameters.
@pytest.mark.parametrize("name, paper_params", [("gf_hornet_small_7x7", 50e6), ("gf_hornet_base_gf", 88e6)])
def test_parameter_count_matches_the_paper(meta_param_count, name, paper_params):
    n = meta_param_count(name)
    assert abs(n - paper_params) / paper_params < 0.05, n


@pytest.mark.parametrize("name, paper_params", [("hornet_tiny_7x7", 22e6), ("hornet_tiny_gf", 23e6)])
def test_official_checkpoint_layout_loads_strictly_with_the_paper_parameter_count(name, paper_params):
    with torch.device("meta"):
        model = load_official("gf_" + name, _official_zeros(name))
    n = sum(p.numel() for p in model.parameters())
    assert n == OFFICIAL["models"][name]["num_params"]
    assert abs(n - paper_params) / paper_params < 0.05, n


def test_a_missing_or_extra_official_key_is_named(official_key_errors_named):
    official_key_errors_named("gf_hornet_tiny_7x7", _official_zeros("hornet_tiny_7x7"),
                              missing="stages.2.5.gnconv.pws.1.weight", extra="stages.3.1.gnconv.bogus",
                              named=("stages.2.blocks.5.gnconv.pws.1.weight", "stages.3.blocks.1.gnconv.bogus"))
