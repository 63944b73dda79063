"""MOAT (arXiv 2210.01820): MBConv before attention, relative-position attention, configs.

The official MOAT is TensorFlow only (google-research/deeplab2), with no PyTorch state dict,
so there is no official-key fixture or converter to test for this family.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import genforge.backbones.moat  # noqa: F401  (registers the gf_*moat_* models)
from genforge.backbones.moat import MBConvBlock, MoatBlock, RelativePositionBias


def test_moat_block_is_mbconv_then_attention_with_no_mlp_after_it(randomise_running_stats):
    torch.manual_seed(0)
    block = randomise_running_stats(MoatBlock(16, 16, stride=1, head_size=8, pos_embed_size=4))
    assert {name for name, _ in block.named_children()} == {"mbconv", "norm", "attn", "rel_pos", "drop_path"}
    assert isinstance(block.mbconv.se, nn.Identity), "the MBConv inside a MOAT block has no SE"
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        m = block.mbconv(x)
        tokens = m.flatten(2).transpose(1, 2)                           # (B, HW, C)
        attn = block.attn(block.norm(tokens), attn_mask=block.rel_pos(4, 4)[None])
        expected = (tokens + attn).transpose(1, 2).reshape_as(m)
        torch.testing.assert_close(block(x), expected)


def test_mbconv_is_bn_expand_gelu_depthwise_gelu_project_plus_shortcut(randomise_running_stats):
    torch.manual_seed(0)
    block = randomise_running_stats(MBConvBlock(8, 8, stride=1, se_ratio=None))
    assert block.expand_conv.out_channels == 32 and block.depthwise_conv.groups == 32  # expansion 4
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        y = F.gelu(block.expand_norm(block.expand_conv(block.pre_norm(x))))
        y = F.gelu(block.depthwise_norm(block.depthwise_conv(y)))
        torch.testing.assert_close(block(x), x + block.shrink_conv(y))


def test_downsampling_mbconv_strides_the_depthwise_conv_and_pools_the_shortcut(randomise_running_stats):
    torch.manual_seed(0)
    block = randomise_running_stats(MBConvBlock(8, 16, stride=2))
    assert block.depthwise_conv.stride == (2, 2) and block.expand_conv.stride == (1, 1)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        nn.init.zeros_(block.shrink_conv.weight)
        nn.init.zeros_(block.shrink_conv.bias)
        # with the residual branch silenced only the official shortcut remains: 2x2 avg pool, 1x1 conv
        torch.testing.assert_close(block(x), block.shortcut_conv(F.avg_pool2d(x, 2)))


def test_relative_position_bias_depends_only_on_the_offset():
    torch.manual_seed(0)
    rel = RelativePositionBias(num_heads=2, size=4)
    nn.init.normal_(rel.relative_position_embedding)
    table = rel.relative_position_embedding
    with torch.no_grad():
        bias = rel(4, 4).reshape(2, 4, 4, 4, 4)                        # (heads, hq, wq, hk, wk)
        for hq, wq, hk, wk in [(0, 0, 3, 3), (3, 1, 0, 2), (2, 2, 2, 2)]:
            torch.testing.assert_close(bias[:, hq, wq, hk, wk], table[:, hk - hq + 3, wk - wq + 3])
        # translation invariance, also for a resized table on a non-square map
        for h, w in [(4, 4), (6, 3)]:
            b = rel(h, w).reshape(2, h, w, h, w)
            torch.testing.assert_close(b[:, 1:, :, 1:, :], b[:, :-1, :, :-1, :])
            torch.testing.assert_close(b[:, :, 1:, :, 1:], b[:, :, :-1, :, :-1])
    assert not torch.equal(bias[:, 0, 0, 0, 1], bias[:, 0, 0, 1, 0]), "vertical and horizontal offsets differ"


def test_attention_equals_a_naive_softmax_with_relative_position_bias():
    torch.manual_seed(0)
    block = MoatBlock(16, 16, head_size=8, pos_embed_size=3).eval()
    nn.init.normal_(block.rel_pos.relative_position_embedding)
    h, w, heads, d = 3, 2, 2, 8
    x = torch.randn(2, h * w, 16)
    table = F.interpolate(block.rel_pos.relative_position_embedding[None], size=(2 * h - 1, 2 * w - 1),
                          mode="bilinear", align_corners=False)[0]
    positions = [(i, j) for i in range(h) for j in range(w)]
    bias = torch.stack([torch.stack([table[:, hk - hq + h - 1, wk - wq + w - 1] for hk, wk in positions], -1)
                        for hq, wq in positions], -2)                  # (heads, HW, HW), built by loops
    with torch.no_grad():
        q, k, v = block.attn.qkv(x).reshape(2, h * w, 3, heads, d).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5 + bias, dim=-1)
        expected = block.attn.proj((weights @ v).transpose(1, 2).reshape(2, h * w, 16))
        got = block.attn(x, attn_mask=block.rel_pos(h, w)[None])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_layout_is_stem_then_two_mbconv_stages_then_two_moat_stages():
    model = timm.create_model("gf_moat_nano")
    kinds = [{type(b) for b in stage.blocks} for stage in model.stages]
    assert kinds == [{MBConvBlock}, {MBConvBlock}, {MoatBlock}, {MoatBlock}]
    assert all(not isinstance(b.se, nn.Identity) for stage in model.stages[:2] for b in stage.blocks)
    assert [info["reduction"] for info in model.feature_info] == [4, 8, 16, 32]


def test_timm_contract(timm_contract):
    # 64 px: at 32 px the last stage is 1x1, where attention's queries/keys get no gradient
    timm_contract("gf_moat_nano", img_size=64)


def test_loss_falls_on_digits(loss_falls):
    loss_falls("gf_moat_nano", img_size=64, optimizer=torch.optim.AdamW, lr=3e-3)


# deeplab2 g3doc/projects/moat_imagenet_pretrained_checkpoints.md (models with position embedding)
PAPER_PARAMS_M = {"gf_moat_0": 27.8, "gf_moat_1": 41.6, "gf_moat_2": 73.4,
                  "gf_tiny_moat_0": 3.4, "gf_tiny_moat_1": 5.1, "gf_tiny_moat_2": 9.8}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_paper_parameter_counts(meta_param_count, name):
    count = meta_param_count(name) / 1e6
    assert abs(count - PAPER_PARAMS_M[name]) / PAPER_PARAMS_M[name] < 0.05, count


def test_nano_running_statistics_reach_its_batch_statistics_in_a_short_run():
    torch.manual_seed(0)
    model = timm.create_model("gf_moat_nano", num_classes=3, in_chans=1).train()
    x = torch.randn(16, 1, 32, 32)
    with torch.no_grad():
        for _ in range(200):  # training-mode passes: 0.9^200 of the initial statistics remain
            train_out = model(x)
        eval_out = model.eval()(x)
    # what remains is BN's unbiased-vs-biased variance at 16 samples on the 1x1 last stage
    assert (eval_out - train_out).abs().max() < 0.1 * train_out.abs().max()
