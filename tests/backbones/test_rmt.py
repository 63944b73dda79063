"""RMT (arXiv 2309.11523): the Manhattan decay, full and decomposed MaSA against naive references,
the rotary embedding, the block, paper sizes, and the official qhfan/RMT checkpoint layout."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import genforge.backbones.rmt  # noqa: F401  (registers the gf_rmt_* models)
from genforge.backbones.registry import load_official
from genforge.backbones.rmt import (ManhattanSelfAttention, RetBlock, RetNetRelPos2d, decayed_attention,
                                    theta_shift)

OFFICIAL = json.loads((Path(__file__).parents[1] / "fixtures/backbones/rmt_official_keys.json").read_text())


def _randomise(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)


def _gammas(heads: int, init: float, span: float) -> torch.Tensor:
    return torch.tensor([1 - 2 ** (-init - span * h / heads) for h in range(heads)])


def test_decay_is_zero_on_the_diagonal_and_log_gamma_times_manhattan_distance():
    relpos = RetNetRelPos2d(dim=32, num_heads=4, initial_value=2, heads_range=4)
    H, W = 3, 4
    decay = relpos.decay_2d(H, W)
    log_gamma = _gammas(4, 2, 4).log()
    for n in range(H * W):
        for m in range(H * W):
            dist = abs(n // W - m // W) + abs(n % W - m % W)
            torch.testing.assert_close(decay[:, n, m], log_gamma * dist)
    assert (decay.diagonal(dim1=1, dim2=2) == 0).all()


def test_attention_weights_fall_with_manhattan_distance_for_equal_logits():
    relpos = RetNetRelPos2d(dim=16, num_heads=2, initial_value=2, heads_range=4)
    H, W = 4, 4
    zeros = torch.zeros(1, 2, H * W, 8)
    weights = decayed_attention(zeros, zeros, torch.eye(H * W).expand(1, 2, -1, -1), relpos.decay_2d(H, W))
    grid = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij"), -1).view(-1, 2)
    dist = (grid[:, None] - grid[None]).abs().sum(-1)
    gamma = _gammas(2, 2, 4)
    # with q = k = 0 the weight of key m for query n is gamma^dist(n, m), normalised
    torch.testing.assert_close(weights[0] / weights[0].diagonal(dim1=1, dim2=2)[..., None],
                               gamma[:, None, None] ** dist)
    for h in range(2):
        by_distance = [weights[0, h, 5][dist[5] == r] for r in range(int(dist[5].max()) + 1)]
        assert all(w.std(unbiased=False) < 1e-7 for w in by_distance)  # equal distance, equal weight
        assert all(a[0] > b[0] for a, b in zip(by_distance, by_distance[1:]))  # strictly falling


def _rope(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Explicit rotary embedding: channel pair (2i, 2i+1) of the token at raster index p turns by p * angle_i."""
    out = torch.empty_like(x)
    for p in range(x.shape[-2]):
        theta = p * angle[::2]
        a, b = x[..., p, ::2], x[..., p, 1::2]
        out[..., p, ::2] = a * theta.cos() - b * theta.sin()
        out[..., p, 1::2] = a * theta.sin() + b * theta.cos()
    return out


def _naive_projections(attn: ManhattanSelfAttention, relpos: RetNetRelPos2d, x: torch.Tensor):
    """q, k (rotated, k scaled by 1/sqrt(d)), v as (heads, H*W, d), and LCE = DWConv5x5(v) as (H, W, C)."""
    H, W, C = x.shape[1:]
    heads, d = attn.num_heads, C // attn.num_heads
    q, k, v = attn.q_proj(x[0]), attn.k_proj(x[0]) / math.sqrt(d), attn.v_proj(x[0])
    lce = F.conv2d(v.permute(2, 0, 1)[None], attn.lepe.conv.weight, attn.lepe.conv.bias, padding=2, groups=C)
    q, k, v = (t.reshape(H * W, heads, d).transpose(0, 1) for t in (q, k, v))
    return _rope(q, relpos.angle), _rope(k, relpos.angle), v, lce[0].permute(1, 2, 0)


def _masa_case(H: int, W: int, C: int, heads: int, decomposed: bool):
    """From seed 0: MaSA with random weights, its relative position, a random (1, H, W, C) input,
    the naive projections of that input (q, k, v, lce) and log(gamma) per head."""
    torch.manual_seed(0)
    attn, relpos = ManhattanSelfAttention(C, heads, decomposed=decomposed), RetNetRelPos2d(C, heads, 2, 4)
    _randomise(attn)
    x = torch.randn(1, H, W, C)
    return attn, relpos, x, _naive_projections(attn, relpos, x), _gammas(heads, 2, 4).log()


def test_full_masa_equals_a_naive_2d_decay_reference():
    H, W, C, heads = 3, 4, 8, 2
    attn, relpos, x, (q, k, v, lce), log_gamma = _masa_case(H, W, C, heads, decomposed=False)
    out = torch.zeros(H * W, heads, C // heads)
    for h in range(heads):
        for n in range(H * W):
            dist = torch.tensor([abs(n // W - m // W) + abs(n % W - m % W) for m in range(H * W)])
            out[n, h] = (q[h, n] @ k[h].t() + log_gamma[h] * dist).softmax(0) @ v[h]
    expected = attn.out_proj(out.reshape(H, W, C) + lce)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, *relpos(H, W, decomposed=False))[0], expected, atol=1e-5, rtol=1e-4)


def test_decomposed_masa_equals_naive_1d_decay_attention_along_w_then_h():
    H, W, C, heads = 3, 4, 8, 2
    attn, relpos, x, (q, k, v, lce), log_gamma = _masa_case(H, W, C, heads, decomposed=True)
    along_w = torch.zeros_like(v)
    out = torch.zeros_like(v)
    for h in range(heads):
        for y in range(H):  # each row on its own, decay log(gamma) * |x_n - x_m|
            row = [y * W + c for c in range(W)]
            for c in range(W):
                logits = q[h, y * W + c] @ k[h, row].t() + log_gamma[h] * torch.tensor([abs(c - m) for m in range(W)])
                along_w[h, y * W + c] = logits.softmax(0) @ v[h, row]
        for c in range(W):  # then each column of that result, decay log(gamma) * |y_n - y_m|
            col = [r * W + c for r in range(H)]
            for y in range(H):
                logits = q[h, y * W + c] @ k[h, col].t() + log_gamma[h] * torch.tensor([abs(y - m) for m in range(H)])
                out[h, y * W + c] = logits.softmax(0) @ along_w[h, col]
    expected = attn.out_proj(out.transpose(0, 1).reshape(H, W, C) + lce)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, *relpos(H, W, decomposed=True))[0], expected, atol=1e-5, rtol=1e-4)


def test_rotary_embedding_preserves_norms_and_sees_only_offsets():
    torch.manual_seed(0)
    relpos = RetNetRelPos2d(dim=16, num_heads=2, initial_value=2, heads_range=4)
    sin, cos = relpos.rotary(3, 5)  # (3, 5, 8)
    x = torch.randn(2, 2, 3, 5, 8)
    torch.testing.assert_close(theta_shift(x, sin, cos).norm(dim=-1), x.norm(dim=-1))
    q, k = torch.randn(8), torch.randn(8)
    rot = theta_shift(torch.stack([q, k]).expand(3, 5, 2, 8).permute(2, 0, 1, 3), sin, cos).flatten(1, 2)

    def score(m, n):
        return rot[0, m] @ rot[1, n]
    torch.testing.assert_close(score(2, 7), score(5, 10))  # same raster offset, same score
    torch.testing.assert_close(score(0, 0), q @ k)


def test_block_adds_position_conv_then_scaled_masa_then_scaled_ffn_with_inner_dwconv_residual():
    torch.manual_seed(0)
    block, relpos = RetBlock(8, 2, mlp_ratio=2, decomposed=False, layerscale=True), RetNetRelPos2d(8, 2, 2, 4)
    _randomise(block)
    x = torch.randn(1, 3, 3, 8)
    rel_pos = relpos(3, 3, decomposed=False)

    def dwconv(conv, t):
        return F.conv2d(t.permute(0, 3, 1, 2), conv.weight, conv.bias, padding=conv.padding, groups=t.shape[-1]
                        ).permute(0, 2, 3, 1)
    with torch.no_grad():
        x1 = x + dwconv(block.pos.conv, x)
        x2 = x1 + block.gamma_1 * block.retention(block.retention_layer_norm(x1), *rel_pos)
        hidden = F.gelu(block.ffn.fc1(block.final_layer_norm(x2)))
        x3 = x2 + block.gamma_2 * block.ffn.fc2(hidden + dwconv(block.ffn.dwconv.conv, hidden))
        torch.testing.assert_close(block(x, *rel_pos), x3)


def test_nano_honours_the_timm_contract(timm_contract):
    timm_contract("gf_rmt_nano", img_size=32)


def test_nano_loss_falls_on_digits(loss_falls):
    loss_falls("gf_rmt_nano", img_size=32, optimizer=torch.optim.AdamW, lr=3e-3)


@pytest.mark.parametrize("name,paper_millions", [
    # README of qhfan/RMT: RMT-T 14M, RMT-S 27M, RMT-B 54M, RMT-L 95M
    ("gf_rmt_t", 14), ("gf_rmt_s", 27), ("gf_rmt_b", 54), ("gf_rmt_l", 95)])
def test_paper_configurations_have_the_paper_parameter_counts(meta_param_count, name, paper_millions):
    count = meta_param_count(name) / 1e6
    assert abs(count - paper_millions) / paper_millions < 0.05, count


def _official_meta_state() -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in OFFICIAL["keys"].items()}


def test_official_t3_checkpoint_layout_loads_strictly():
    assert OFFICIAL["model_fn"] == "RMT_T3"
    with torch.device("meta"):
        model = load_official("gf_rmt_t", _official_meta_state())
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL["num_params"]


def test_a_missing_or_extra_official_key_is_named_in_the_error(official_key_errors_named):
    official_key_errors_named("gf_rmt_t", _official_meta_state(), missing="layers.1.downsample.reduction.weight",
                              extra="layers.2.blocks.0.retention.extra",
                              named=("stages.2.downsample.reduction.weight", "stages.2.blocks.0.retention.extra"))


def _official_token_label_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """An official-layout RMT-T state dict with random values plus the ``aux_head`` of the token-labelled
    models (``classification_token_label_release/RMT.py``), saved as official training saves it."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in OFFICIAL["keys"].items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros(shape, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.1
    state["aux_head.weight"] = torch.randn(1000, 512, generator=g) * 0.1
    state["aux_head.bias"] = torch.randn(1000, generator=g) * 0.1
    torch.save({"model": state}, path)
    return state


def test_token_labelled_checkpoint_keeps_its_aux_head_in_the_official_inference_logits(tmp_path):
    state = _official_token_label_checkpoint(tmp_path / "rmt_token_label.pth")
    model = load_official("gf_rmt_t", tmp_path / "rmt_token_label.pth", token_label=True).eval()
    torch.testing.assert_close(model.head.aux_fc.weight, state["aux_head.weight"], rtol=0, atol=0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)  # (B, 512, 2, 2): the last stage, which official aux_head reads
        cls = model.head.fc(model.forward_head(tokens, pre_logits=True))
        aux = tokens.flatten(2).transpose(1, 2) @ state["aux_head.weight"].t() + state["aux_head.bias"]  # (B, 4, K)
        torch.testing.assert_close(model(x), cls + 0.5 * aux.amax(1))  # official: x_cls + 0.5 * x_aux.max(1)[0]

        with pytest.warns(UserWarning, match=r"aux_head.*token_label=True"):
            plain = load_official("gf_rmt_t", tmp_path / "rmt_token_label.pth").eval()
        assert plain.head.aux_fc is None
        torch.testing.assert_close(plain(x), cls)
