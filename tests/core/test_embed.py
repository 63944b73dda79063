"""Specification of genforge.core.embed (class conditioning for CFG) and of the diffusers embedding
helpers that replaced ours: they give exactly ADM/DiT's timestep features and MAE/DiT's 2-D positions."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel, UNet2DModel
from diffusers.models.embeddings import PatchEmbed, TimestepEmbedding, Timesteps, get_2d_sincos_pos_embed, get_timestep_embedding

from genforge.core.embed import batch_conditions, drop_labels, null_class_of
from genforge.models.dimr import DiMRModel, dimr_config


# -- timestep features: diffusers' helper with DiT's settings ---------------------------------


def adm_timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """genforge's previous ``timestep_sinusoidal`` (ADM / DiT): [cos(t f_i), sin(t f_i)], f_i = 10000^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


@pytest.mark.parametrize("dim", [256, 64, 7])
def test_diffusers_timestep_embedding_is_exactly_our_previous_adm_dit_features(dim):
    t = torch.cat([torch.arange(1000).float(), torch.rand(50, generator=torch.Generator().manual_seed(0)) * 1000])
    ours = adm_timestep_features(t, dim)
    assert torch.equal(get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0), ours)
    half = dim // 2
    for i in (0, 1, half - 1):  # and the closed form itself
        assert ours[517, i].item() == pytest.approx(math.cos(517 * 10000 ** (-i / half)), abs=1e-4)
        assert ours[517, half + i].item() == pytest.approx(math.sin(517 * 10000 ** (-i / half)), abs=1e-4)


def test_diffusers_timestep_mlp_is_linear_silu_linear_of_those_features():
    torch.manual_seed(0)
    features, mlp = Timesteps(16, flip_sin_to_cos=True, downscale_freq_shift=0), TimestepEmbedding(16, 32)
    t = torch.tensor([0.0, 10.0, 999.0])
    # genforge's previous TimestepEmbedding: Sequential(Linear, SiLU, Linear) on those features
    h = F.silu(F.linear(adm_timestep_features(t, 16), mlp.linear_1.weight, mlp.linear_1.bias))
    assert torch.equal(mlp(features(t)), F.linear(h, mlp.linear_2.weight, mlp.linear_2.bias))


# -- 2-D positions and patches: diffusers' helpers against MAE / DiT ------------------------------


def mae_2d_sincos(dim: int, grid: int) -> np.ndarray:
    """The official MAE / DiT ``get_2d_sincos_pos_embed`` (numpy, float64): column half, then row half."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    halves = [np.einsum("m,d->md", pos.reshape(-1), omega) for pos in (cols, rows)]
    return np.concatenate([np.concatenate([np.sin(a), np.cos(a)], axis=1) for a in halves], axis=1)


@pytest.mark.parametrize("dim, grid", [(32, 4), (128, 8), (1152, 16)])
def test_diffusers_2d_sincos_is_exactly_the_official_mae_table(dim, grid):
    ours = get_2d_sincos_pos_embed(dim, grid, base_size=grid)
    assert torch.equal(ours.float(), torch.from_numpy(mae_2d_sincos(dim, grid)).float())


def test_dits_patch_embedding_is_an_unfold_matmul_plus_the_fixed_table():
    torch.manual_seed(0)
    p, c, dim, size = 2, 3, 24, 8
    embed = PatchEmbed(height=size, width=size, patch_size=p, in_channels=c, embed_dim=dim)
    x = torch.randn(2, c, size, size)
    patches = torch.nn.functional.unfold(x, kernel_size=p, stride=p).transpose(1, 2)  # (B, N, C*p*p), row-major
    expected = patches @ embed.proj.weight.reshape(dim, -1).T + embed.proj.bias
    expected = expected + torch.from_numpy(mae_2d_sincos(dim, size // p)).float()
    torch.testing.assert_close(embed(x), expected, atol=1e-5, rtol=0)


# -- class conditioning ---------------------------------------------------------------------


def test_drop_probability_one_nulls_every_label_and_zero_none():
    labels = torch.randint(0, 10, (1000,))
    assert torch.equal(drop_labels(labels, 1.0, null_index=10), torch.full((1000,), 10))
    assert torch.equal(drop_labels(labels, 0.0, null_index=10), labels)
    with pytest.raises(ValueError, match="1.5"):
        drop_labels(labels, 1.5, null_index=10)


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


def test_the_null_class_of_each_network_family_is_the_extra_row_of_its_label_table():
    dimr = DiMRModel(**dimr_config("tiny"))
    assert null_class_of(dimr) == 10 == dimr.stages[0].class_embed.num_embeddings - 1
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, num_layers=1,
                                sample_size=4, patch_size=2, num_embeds_ada_norm=7)
    table = dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert null_class_of(dit) == 7 == table.num_embeddings - 1
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, num_class_embeds=5)
    assert null_class_of(unet) == 4
    unet.register_to_config(num_class_embeds=None)
    with pytest.raises(ValueError, match="UNet2DModel is not class-conditional"):
        null_class_of(unet)


def test_batch_conditions_repeat_a_scheduler_timestep_and_default_to_the_null_class():
    t, y = batch_conditions(torch.tensor(500), None, 3, null_index=10, device=torch.device("cpu"))
    assert t.tolist() == [500, 500, 500] and y.tolist() == [10, 10, 10]
    given_t, given_y = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    t, y = batch_conditions(given_t, given_y, 3, null_index=10, device=torch.device("cpu"))
    assert torch.equal(t, given_t) and torch.equal(y, given_y)
