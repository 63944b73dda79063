"""TransNeXt (arXiv 2311.17132): aggregated attention under one softmax, length-scaled cosine
attention, ConvGLU, the fixed input size, paper sizes, and the official checkpoint layout."""

import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import genforge.backbones.transnext  # noqa: F401  (registers the gf_transnext_* models)
from genforge.backbones.registry import load_official
from genforge.backbones.transnext import (AggregatedAttention, Attention, ConvGLU, checkpoint_filter_fn,
                                          relative_position_cpb)

OFFICIAL = json.loads((Path(__file__).parents[1] / "fixtures/backbones/transnext_official_keys.json").read_text())


def _randomise(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)


def _naive_aggregated_attention(attn: AggregatedAttention, x: torch.Tensor, grid) -> torch.Tensor:
    """Per query: build the 3x3-window and pooled logits explicitly, one softmax over all of them."""
    H, W = grid
    heads, d = attn.num_heads, attn.head_dim
    C = heads * d
    PH, PW = attn.pool_size
    xs = x[0]  # (N, C)
    q_hat = F.normalize(attn.q(xs).view(-1, heads, d), dim=-1)
    k, v = attn.kv(xs).view(-1, 2, heads, d).unbind(1)
    k = F.normalize(k, dim=-1)
    # pooled map: adaptive average bins [floor(i*H/P), ceil((i+1)*H/P)) of GELU(conv1x1(x))
    feat = F.gelu(attn.sr(xs.t().reshape(1, C, H, W)))[0]
    bins_h = [(math.floor(i * H / PH), math.ceil((i + 1) * H / PH)) for i in range(PH)]
    bins_w = [(math.floor(j * W / PW), math.ceil((j + 1) * W / PW)) for j in range(PW)]
    pooled = torch.stack([feat[:, a:b, c:e].mean((1, 2)) for a, b in bins_h for c, e in bins_w])
    k_pool, v_pool = attn.kv(attn.norm(pooled)).view(-1, 2, heads, d).unbind(1)
    k_pool = F.normalize(k_pool, dim=-1)
    centres = [((a + b - 1) / 2, (c + e - 1) / 2) for a, b in bins_h for c, e in bins_w]
    temperature = F.softplus(attn.temperature).view(heads)
    out = torch.zeros(H * W, heads, d)
    for i in range(H):
        for j in range(W):
            n = i * W + j
            window = [(i + di, j + dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)]
            inside = [0 <= a < H and 0 <= b < W for a, b in window]
            scale = temperature * math.log(sum(inside) + len(centres))
            for h in range(heads):
                q = (q_hat[n, h] + attn.query_embedding[h, 0]) * scale[h]
                logits = []
                for slot, (a, b) in enumerate(window):
                    logits.append(q @ k[a * W + b, h] + attn.relative_pos_bias_local[h, slot] if inside[slot]
                                  else torch.tensor(float("-inf")))
                for p, (ch, cw) in enumerate(centres):
                    rel = torch.tensor([(i - ch) / (H - 1) * 8, (j - cw) / (W - 1) * 8])
                    rel = torch.sign(rel) * torch.log2(rel.abs() + 1) / 3
                    bias = attn.cpb_fc2(F.relu(attn.cpb_fc1(rel)))[h]
                    logits.append(q @ k_pool[p, h] + bias)
                weights = torch.stack(logits).softmax(0)  # one softmax over 9 + P logits
                for slot, (a, b) in enumerate(window):
                    if inside[slot]:
                        dynamic = q_hat[n, h] @ attn.learnable_tokens[h, :, slot] + attn.learnable_bias[h, 0, slot]
                        out[n, h] += (weights[slot] + dynamic) * v[a * W + b, h]
                out[n, h] += weights[9:] @ v_pool[:, h]
    return attn.proj(out.reshape(1, H * W, C))


def test_aggregated_attention_equals_a_naive_single_softmax_reference():
    torch.manual_seed(0)
    grid, dim = (5, 6), 8
    attn = AggregatedAttention(dim, grid, num_heads=2, window_size=3, sr_ratio=2).eval()  # pool 2x3
    _randomise(attn)
    index, table = relative_position_cpb(grid, attn.pool_size, grid)
    x = torch.randn(1, grid[0] * grid[1], dim)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, grid, index, table), _naive_aggregated_attention(attn, x, grid),
                                   atol=1e-4, rtol=1e-4)


def test_window_and_pooled_weights_sum_to_one_jointly():
    torch.manual_seed(0)
    grid, dim = (4, 4), 8
    attn = AggregatedAttention(dim, grid, num_heads=2, sr_ratio=2).eval()
    _randomise(attn)
    with torch.no_grad():  # every value is 1, the query-dependent local weights are off, proj is identity
        attn.kv.weight[dim:].zero_()
        attn.kv.bias[dim:].fill_(1.0)
        attn.learnable_tokens.zero_()
        attn.learnable_bias.zero_()
        attn.proj.weight.copy_(torch.eye(dim))
        attn.proj.bias.zero_()
        index, table = relative_position_cpb(grid, attn.pool_size, grid)
        out = attn(torch.randn(2, 16, dim), grid, index, table)
    # separate softmaxes per branch would give 2 here
    torch.testing.assert_close(out, torch.ones_like(out))


def test_logits_are_scaled_by_log_of_the_number_of_keys_each_query_sees():
    attn = AggregatedAttention(8, (4, 4), num_heads=2, sr_ratio=2)  # 2x2 pooled keys
    seen = attn.seq_length_scale.exp().round().view(4, 4)
    assert seen[0, 0] == 4 + 4 and seen[0, 1] == 6 + 4 and seen[1, 1] == 9 + 4  # corner, edge, interior
    assert attn.padding_mask.view(4, 4, 9)[0, 0].sum() == 5
    assert torch.allclose(F.softplus(attn.temperature), torch.full((2, 1, 1), 1 / 0.24))


def test_full_attention_is_length_scaled_cosine_attention_with_position_bias():
    torch.manual_seed(0)
    grid, dim = (3, 3), 8
    attn = Attention(dim, grid, num_heads=2).eval()
    _randomise(attn)
    index, table = relative_position_cpb(grid, grid, grid)
    x = torch.randn(2, 9, dim)
    q, k, v = attn.qkv(x).view(2, 9, 3, 2, 4).permute(2, 0, 3, 1, 4)
    scale = F.softplus(attn.temperature) * math.log(9)
    logits = (F.normalize(q, dim=-1) + attn.query_embedding) * scale @ F.normalize(k, dim=-1).transpose(-2, -1)
    bias = attn.cpb_fc2(F.relu(attn.cpb_fc1(table))).t()[:, index].view(2, 9, 9)
    expected = attn.proj(((logits + bias).softmax(-1) @ v).transpose(1, 2).reshape(2, 9, dim))
    for fused in (True, False):
        attn.fused_attn = fused
        with torch.no_grad():
            torch.testing.assert_close(attn(x, grid, index, table), expected, atol=1e-5, rtol=1e-4)


def test_convglu_gates_the_value_half_with_the_convolved_first_half():
    torch.manual_seed(0)
    glu = ConvGLU(6, 12)  # hidden = 2/3 * 12 = 8
    _randomise(glu)
    x = torch.randn(2, 20, 6)
    gate, value = glu.fc1(x).split(8, dim=-1)
    gate_map = gate.transpose(1, 2).reshape(2, 8, 4, 5)
    conv = F.conv2d(gate_map, glu.dwconv.weight, glu.dwconv.bias, padding=1, groups=8)
    expected = glu.fc2(F.gelu(conv.flatten(2).transpose(1, 2)) * value)
    torch.testing.assert_close(glu(x, (4, 5)), expected)


def test_relative_coordinates_are_log_spaced_and_rescaled_to_the_pretraining_grid():
    index, table = relative_position_cpb((4, 4), (2, 2), (4, 4))
    assert index.shape == (16 * 4,)
    # query 0 -> key centre (0.5, 0.5): offset -0.5 grid cells, i.e. -0.5 / 3 * 8 after rescaling
    expected = -math.log2(1 + 0.5 / 3 * 8) / 3
    torch.testing.assert_close(table[index[0]], torch.tensor([expected, expected]))
    _, table_big = relative_position_cpb((8, 8), (4, 4), (4, 4))  # a larger input extrapolates past 8
    assert table.abs().max() <= 1 < table_big.abs().max()


def test_nano_honours_the_timm_contract(timm_contract):
    timm_contract("gf_transnext_nano", img_size=32)


def test_nano_loss_falls_on_digits(loss_falls):
    loss_falls("gf_transnext_nano", img_size=32, optimizer=torch.optim.AdamW, lr=3e-3)


def test_input_size_is_fixed_by_img_size_as_in_the_official_code():
    model = timm.create_model("gf_transnext_nano", num_classes=0, img_size=64).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 128)
        with pytest.raises(ValueError, match="img_size"):
            model(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("name,paper_millions", [
    # classification/README.md of DaiShiResearch/TransNeXt (ImageNet-1K 224px models)
    ("gf_transnext_micro", 12.8), ("gf_transnext_tiny", 28.2),
    ("gf_transnext_small", 49.7), ("gf_transnext_base", 89.7)])
def test_paper_configurations_have_the_paper_parameter_counts(meta_param_count, name, paper_millions):
    count = meta_param_count(name) / 1e6
    assert abs(count - paper_millions) / paper_millions < 0.05, count


def test_every_layernorm_has_the_official_eps(meta_model):
    """Patch embeddings and the pooled branch use torch's default 1e-5, blocks and stage norms 1e-6
    (the eps of each official LayerNorm, recorded from transnext_micro, under our name for it)."""
    model = meta_model("gf_transnext_micro")
    ours = {name: m.eps for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    official = {next(iter(checkpoint_filter_fn({f"{name}.weight": None}, model))).removesuffix(".weight"): eps
                for name, eps in OFFICIAL["layernorm_eps"].items()}
    assert ours == official


def _official_meta_state() -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in OFFICIAL["keys"].items()}


def test_official_micro_checkpoint_layout_loads_strictly():
    assert OFFICIAL["model_fn"] == "transnext_micro"
    with torch.device("meta"):
        model = load_official("gf_transnext_micro", _official_meta_state())
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL["num_params"]


def test_a_missing_or_extra_official_key_is_named_in_the_error(official_key_errors_named):
    official_key_errors_named("gf_transnext_micro", _official_meta_state(), missing="block3.7.attn.learnable_tokens",
                              extra="block3.7.attn.extra",
                              named=("stages.2.blocks.7.attn.learnable_tokens", "stages.2.blocks.7.attn.extra"))
