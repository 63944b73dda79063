"""A-SDM's components (arXiv 2312.15516, our reconstruction): CLME-CondConv and GRI attention."""

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from genforge.sd.condconv import CondConv2d
from genforge.sd.configs import UNET_CONFIGS
from genforge.sd.gri import GRIAttnProcessor, apply_gri


def condconv(routing="softmax", experts=3) -> CondConv2d:
    torch.manual_seed(0)
    return CondConv2d(8, 8, 3, experts, padding=1, routing=routing)


def test_condconv_with_equal_experts_is_the_plain_convolution():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    layer = condconv()
    layer.inherit([conv, conv, conv])
    x = torch.randn(2, 8, 16, 16)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)


def test_condconv_mixes_a_different_kernel_for_each_sample():
    layer = condconv()
    x = torch.randn(2, 8, 16, 16)
    x[1] = x[1] * 3 + 1
    alpha = layer.routing_weights(x)
    assert not torch.allclose(alpha[0], alpha[1])
    # Each sample's output is the convolution with its own mixed kernel: per-sample naive reference.
    for b in range(2):
        kernel = sum(alpha[b, k] * layer.experts_weight[k] for k in range(3))
        bias = sum(alpha[b, k] * layer.experts_bias[k] for k in range(3))
        torch.testing.assert_close(layer(x)[b:b + 1], F.conv2d(x[b:b + 1], kernel, bias, padding=1),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ["softmax", "sigmoid"])
def test_condconv_inherits_experts_and_starts_with_the_kept_prior(routing):
    torch.manual_seed(0)
    convs = [torch.nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)]
    layer = condconv(routing)
    layer.inherit(convs, kept_share=0.8)
    with torch.no_grad():
        layer.route.weight.zero_()
    alpha = layer.routing_weights(torch.randn(2, 8, 16, 16))
    torch.testing.assert_close(alpha, torch.tensor([[0.8, 0.1, 0.1]] * 2))
    assert all(torch.equal(layer.experts_weight[k], convs[k].weight) for k in range(3))
    with pytest.raises(ValueError, match=r"expert 0 has shape \(8, 4, 3, 3\)"):
        layer.inherit([torch.nn.Conv2d(4, 8, 3)] * 3)


def self_attention(dim=32, heads=4) -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=dim, heads=heads, dim_head=dim // heads, bias=False)


def test_gri_with_one_window_over_the_grid_and_no_pooling_is_full_attention():
    attn = self_attention()
    x = torch.randn(2, 64, 32)
    full = AttnProcessor2_0()(attn, x)
    gri = GRIAttnProcessor(window=8, pool=1, local_weight=0.3)
    gri.grid = (8, 8)
    torch.testing.assert_close(gri(attn, x), full, rtol=1e-5, atol=1e-5)


def naive_attention(q, k, v, scale):
    return (q @ k.transpose(-1, -2) * scale).softmax(-1) @ v


def test_gri_branches_are_window_attention_and_attention_over_pooled_keys():
    attn = self_attention()
    x = torch.randn(1, 64, 32)  # an 8x8 grid
    heads = lambda t: t.view(1, -1, 4, 8).transpose(1, 2)  # noqa: E731
    q, k, v = heads(attn.to_q(x)), heads(attn.to_k(x)), heads(attn.to_v(x))
    grid = x.view(1, 8, 8, 32)
    pooled = grid.view(1, 4, 2, 4, 2, 32).mean(dim=(2, 4)).reshape(1, 16, 32)
    global_out = naive_attention(q, heads(attn.to_k(pooled)), heads(attn.to_v(pooled)), attn.scale)
    local_out = torch.zeros_like(q)
    index = torch.arange(64).view(8, 8)
    for wy in range(2):
        for wx in range(2):
            tokens = index[wy * 4:(wy + 1) * 4, wx * 4:(wx + 1) * 4].flatten()
            local_out[:, :, tokens] = naive_attention(q[:, :, tokens], k[:, :, tokens], v[:, :, tokens], attn.scale)
    fused = (0.25 * local_out + 0.75 * global_out).transpose(1, 2).reshape(1, 64, 32)
    gri = GRIAttnProcessor(window=4, pool=2, local_weight=0.25)
    gri.grid = (8, 8)
    torch.testing.assert_close(gri(attn, x), attn.to_out[0](fused), rtol=1e-5, atol=1e-5)


def test_gri_processors_learn_the_grid_from_the_unet_and_survive_deepcopy(build_unet, unet_inputs):
    config = UNET_CONFIGS["diffusers-tiny"]
    unet = build_unet(config)
    x, t, c = unet_inputs(config)
    reference = unet(x, t, c).sample
    # Window and pool as large as each grid: GRI is full attention, so the UNet's output is unchanged.
    assert apply_gri(unet, [1], window=32, pool=1) == 5  # 2 down + 3 up self-attention layers
    copied = copy.deepcopy(unet)
    for model in (unet, copied):
        torch.testing.assert_close(model(x, t, c).sample, reference, rtol=1e-4, atol=1e-5)
    grids = {p.grid for p in copied.attn_processors.values() if isinstance(p, GRIAttnProcessor)}
    assert grids == {(16, 16)}
    apply_gri(unet, [1], window=4, pool=2)
    assert not torch.allclose(unet(x, t, c).sample, reference, atol=1e-4)


def test_gri_rejects_a_grid_it_cannot_tile_and_cross_attention():
    attn = self_attention()
    gri = GRIAttnProcessor(window=3, pool=1)
    gri.grid = (8, 8)
    with pytest.raises(ValueError, match="must divide the 8x8 grid"):
        gri(attn, torch.randn(1, 64, 32))
    with pytest.raises(ValueError, match="self-attention"):
        gri(attn, torch.randn(1, 64, 32), encoder_hidden_states=torch.randn(1, 5, 32))
