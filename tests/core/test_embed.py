"""Specification of genforge.core.embed: DiT's timestep, label, patch and position embeddings."""

import math

import pytest
import torch

from genforge.core.embed import (
    LabelEmbedding,
    PatchEmbed,
    TimestepEmbedding,
    batch_conditions,
    drop_labels,
    sincos_2d_pos_embed,
    timestep_sinusoidal,
)


# -- timestep ---------------------------------------------------------------------------


def test_sinusoidal_entries_equal_closed_form_cos_half_then_sin_half():
    t = torch.tensor([0.0, 3.0, 517.5])
    dim, half = 64, 32
    emb = timestep_sinusoidal(t, dim)
    for b, tb in enumerate(t.tolist()):
        for i in (0, 1, 7, 31):
            freq = 10000 ** (-i / half)
            assert emb[b, i].item() == pytest.approx(math.cos(tb * freq), abs=1e-5)
            assert emb[b, half + i].item() == pytest.approx(math.sin(tb * freq), abs=1e-5)


def test_sinusoidal_embeddings_of_different_timesteps_differ():
    emb = timestep_sinusoidal(torch.arange(50).float(), 128)
    distances = torch.cdist(emb, emb)
    off_diagonal = distances[~torch.eye(50, dtype=torch.bool)]
    assert off_diagonal.min() > 0.1
    # every vector has norm sqrt(half): cos^2 + sin^2 = 1 per frequency
    torch.testing.assert_close(emb.norm(dim=1), torch.full((50,), 8.0), atol=1e-5, rtol=0)


def test_sinusoidal_odd_dim_pads_one_zero_column_and_rejects_batched_shapes():
    emb = timestep_sinusoidal(torch.tensor([1.0, 2.0]), 7)
    assert torch.equal(emb[:, -1], torch.zeros(2))
    torch.testing.assert_close(emb[:, :6], timestep_sinusoidal(torch.tensor([1.0, 2.0]), 6))
    with pytest.raises(ValueError, match=r"\(2, 1\)"):
        timestep_sinusoidal(torch.zeros(2, 1), 8)


def test_timestep_embedding_is_mlp_of_sinusoidal_features():
    torch.manual_seed(0)
    embed = TimestepEmbedding(32, freq_dim=16)
    t = torch.tensor([0.0, 10.0, 999.0])
    lin1, lin2 = embed.mlp[0], embed.mlp[2]
    h = timestep_sinusoidal(t, 16) @ lin1.weight.T + lin1.bias
    expected = (h * torch.sigmoid(h)) @ lin2.weight.T + lin2.bias
    torch.testing.assert_close(embed(t), expected)


# -- labels and classifier-free guidance dropout ----------------------------------------


def test_drop_probability_one_nulls_every_label_and_zero_none():
    labels = torch.randint(0, 10, (1000,))
    assert torch.equal(drop_labels(labels, 1.0, null_index=10), torch.full((1000,), 10))
    assert torch.equal(drop_labels(labels, 0.0, null_index=10), labels)


def test_empirical_drop_rate_is_near_p():
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (200_000,))
    p = 0.1
    rate = (drop_labels(labels, p, null_index=10) == 10).float().mean().item()
    # 5 binomial standard deviations: sqrt(p (1 - p) / n) ~ 6.7e-4
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / labels.numel())


def test_drop_uses_torchs_global_rng():
    labels = torch.zeros(64, dtype=torch.long)
    torch.manual_seed(3)
    first = drop_labels(labels, 0.5, null_index=10)
    torch.manual_seed(3)
    assert torch.equal(drop_labels(labels, 0.5, null_index=10), first)


def test_force_drop_ids_nulls_exactly_the_marked_positions():
    labels = torch.tensor([3, 1, 4, 1, 5])
    forced = torch.tensor([1, 0, 0, 1, 0])
    assert torch.equal(drop_labels(labels, 0.9, null_index=7, force_drop_ids=forced), torch.tensor([7, 1, 4, 7, 5]))
    with pytest.raises(ValueError, match="force_drop_ids shape"):
        drop_labels(labels, 0.5, null_index=7, force_drop_ids=torch.zeros(4))


def test_label_embedding_has_a_null_row_only_with_dropout():
    assert LabelEmbedding(10, 8, dropout_prob=0.1).embedding_table.num_embeddings == 11
    no_drop = LabelEmbedding(10, 8, dropout_prob=0.0)
    assert no_drop.embedding_table.num_embeddings == 10 and no_drop.null_index is None


def test_label_embedding_drops_to_the_null_row_in_training_only():
    torch.manual_seed(0)
    embed = LabelEmbedding(10, 8, dropout_prob=1.0)
    labels = torch.arange(10)
    null_row = embed.embedding_table.weight[10]
    assert torch.equal(embed(labels, train=True), null_row.expand(10, 8))
    assert torch.equal(embed(labels, train=False), embed.embedding_table.weight[:10])


def test_label_embedding_force_drop_ids_at_sampling_time():
    embed = LabelEmbedding(10, 8, dropout_prob=0.1)
    labels = torch.tensor([2, 5])
    out = embed(labels, train=False, force_drop_ids=torch.tensor([0, 1]))
    weight = embed.embedding_table.weight
    assert torch.equal(out, torch.stack([weight[2], weight[10]]))
    # the null class may also be asked for directly
    assert torch.equal(embed(torch.tensor([10]), train=False), weight[10:11])


def test_label_embedding_rejects_out_of_range_labels_and_forced_drop_without_null():
    with pytest.raises(ValueError, match=r"\[0, 10\].*\[0, 11\]"):
        LabelEmbedding(10, 8, dropout_prob=0.1)(torch.tensor([0, 11]), train=False)
    with pytest.raises(ValueError, match="null class"):
        LabelEmbedding(10, 8, dropout_prob=0.0)(torch.tensor([1]), train=False, force_drop_ids=torch.tensor([1]))


# -- patches ----------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_patch_embed_equals_unfold_matmul(bias):
    torch.manual_seed(0)
    p, c, dim = 4, 3, 24
    embed = PatchEmbed(c, dim, p, bias=bias)
    x = torch.randn(2, c, 8, 12)
    patches = torch.nn.functional.unfold(x, kernel_size=p, stride=p)  # (B, C*p*p, N), row-major patches
    expected = patches.transpose(1, 2) @ embed.proj.weight.reshape(dim, -1).T
    if bias:
        expected = expected + embed.proj.bias
    out = embed(x)
    assert out.shape == (2, (8 // p) * (12 // p), dim)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_patch_embed_rejects_sizes_not_divisible_by_the_patch():
    with pytest.raises(ValueError, match="10x12.*patch_size=4"):
        PatchEmbed(3, 8, 4)(torch.randn(1, 3, 10, 12))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        PatchEmbed(3, 8, 4)(torch.randn(1, 1, 8, 8))


# -- 2-D positions ----------------------------------------------------------------------


def test_sincos_2d_equals_closed_form_column_half_then_row_half():
    dim, height, width = 32, 5, 7
    emb = sincos_2d_pos_embed(dim, height, width)
    assert emb.shape == (height * width, dim) and emb.dtype == torch.float32
    quarter = dim // 4
    for r, c in [(0, 0), (0, 6), (4, 0), (2, 3), (4, 6)]:
        token = emb[r * width + c]
        for i in range(quarter):
            omega = 10000 ** (-i / quarter)
            assert token[i].item() == pytest.approx(math.sin(c * omega), abs=1e-6)
            assert token[quarter + i].item() == pytest.approx(math.cos(c * omega), abs=1e-6)
            assert token[2 * quarter + i].item() == pytest.approx(math.sin(r * omega), abs=1e-6)
            assert token[3 * quarter + i].item() == pytest.approx(math.cos(r * omega), abs=1e-6)


def test_sincos_2d_positions_are_distinct_and_dim_must_divide_by_four():
    emb = sincos_2d_pos_embed(16, 4, 4)
    assert torch.cdist(emb, emb)[~torch.eye(16, dtype=torch.bool)].min() > 0.1
    with pytest.raises(ValueError, match="divisible by 4.*18"):
        sincos_2d_pos_embed(18, 4, 4)


def test_batch_conditions_repeat_a_scheduler_timestep_and_default_to_the_null_class():
    t, y = batch_conditions(torch.tensor(500), None, 3, null_index=10, device=torch.device("cpu"))
    assert t.tolist() == [500, 500, 500] and y.tolist() == [10, 10, 10]
    given_t, given_y = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    t, y = batch_conditions(given_t, given_y, 3, null_index=10, device=torch.device("cpu"))
    assert torch.equal(t, given_t) and torch.equal(y, given_y)
