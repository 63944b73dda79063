"""IdentityFormer / RandFormer (arXiv 2210.13452) as timm MetaFormer configurations: the
identity mixer, the frozen row-stochastic random mixing, StarReLU's start, sizes, and the
official sail-sg/metaformer checkpoint layout."""

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.metaformer import StarReLU
from timm.optim import create_optimizer_v2
from torch import nn

import genforge.backbones.metaformer_extras  # noqa: F401  (registers gf_identityformer_* / gf_randformer_*)
from genforge.backbones.metaformer_extras import RandomMixing, stage_token_counts
from genforge.backbones.registry import load_official


def _mixers(model):
    return [[blk.token_mixer for blk in stage.blocks] for stage in model.stages]


@pytest.mark.parametrize("name", ["gf_identityformer_nano", "gf_randformer_nano"])
def test_nano_honours_the_timm_contract(timm_contract, name):
    timm_contract(name, img_size=32)


def test_randformer_nano_loss_falls_on_digits(loss_falls):
    loss_falls("gf_randformer_nano", img_size=32, optimizer=torch.optim.AdamW, lr=3e-3)


def test_identityformer_token_mixer_is_the_identity(meta_model):
    assert all(isinstance(m, nn.Identity) for stage in _mixers(meta_model("gf_identityformer_s12")) for m in stage)
    torch.manual_seed(0)
    blk = timm.create_model("gf_identityformer_nano").stages[0].blocks[0]
    x = torch.randn(2, 16, 8, 8)
    y = x + blk.norm1(x)  # x + TokenMixer(Norm(x)) with TokenMixer = id
    torch.testing.assert_close(blk(x), y + blk.mlp(blk.norm2(y)))


def test_randformer_mixes_randomly_in_stages_3_and_4_only(meta_model):
    mixers = _mixers(meta_model("gf_randformer_s12"))
    assert all(isinstance(m, nn.Identity) for stage in mixers[:2] for m in stage)
    assert [{m.num_tokens for m in stage} for stage in mixers[2:]] == [{196}, {49}]  # 14x14, 7x7 at 224 px
    assert stage_token_counts(224) == (3136, 784, 196, 49) and stage_token_counts(32) == (64, 16, 4, 1)
    assert {m.num_tokens for m in _mixers(meta_model("gf_randformer_s12", img_size=384))[2]} == {576}


def test_random_matrix_is_row_stochastic():
    mix = RandomMixing(49)
    r = mix.random_matrix
    assert r.shape == (49, 49) and torch.all(r > 0)
    torch.testing.assert_close(r.sum(-1), torch.ones(49))


def test_random_mixing_is_the_matrix_product_over_row_major_tokens():
    torch.manual_seed(0)
    mix = RandomMixing(6)
    x = torch.randn(2, 3, 2, 3)
    expected = torch.zeros_like(x)
    for m in range(6):
        for n in range(6):
            expected[:, :, m // 3, m % 3] += mix.random_matrix[m, n] * x[:, :, n // 3, n % 3]
    torch.testing.assert_close(mix(x), expected)


def test_random_matrix_is_frozen_saved_and_never_optimised():
    torch.manual_seed(0)
    model = timm.create_model("gf_randformer_nano", num_classes=3)
    names = [n for n, _ in model.named_buffers() if n.endswith("random_matrix")]
    assert len(names) == 3  # 2 blocks in stage 3, 1 in stage 4
    assert not any("random_matrix" in n for n, _ in model.named_parameters())
    before = {n: b.clone() for n, b in model.named_buffers() if n in names}

    opt = create_optimizer_v2(model, "adamw", lr=0.1, weight_decay=0.5)
    optimised = {id(p) for group in opt.param_groups for p in group["params"]}
    assert not optimised & {id(b) for n, b in model.named_buffers() if n in names}
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2])).backward()
        opt.step()
    for n, b in model.named_buffers():
        if n in names:
            assert torch.equal(b, before[n]), n

    torch.manual_seed(1)  # another draw of R; loading restores the saved one
    other = timm.create_model("gf_randformer_nano", num_classes=3)
    assert not torch.equal(other.get_buffer(names[0]), before[names[0]])
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.get_buffer(names[0]), before[names[0]])


def test_random_mixing_refuses_a_map_of_another_size_by_name():
    with pytest.raises(ValueError, match="built for 196 tokens but got a 7x7 map"):
        RandomMixing(196)(torch.randn(1, 4, 7, 7))


def test_starrelu_starts_as_the_official_code_and_the_paper_constants_standardise_it():
    model = timm.create_model("gf_identityformer_nano")
    acts = [m for m in model.modules() if isinstance(m, StarReLU)]
    assert len(acts) == 5 and all(a.scale.item() == 1. and a.bias.item() == 0. for a in acts)
    assert all(a.scale.requires_grad and a.bias.requires_grad for a in acts)
    # the paper's s = 1/sqrt(Var[relu(x)^2]) = 0.8944, b = -s E[relu(x)^2] = -0.4472 for x ~ N(0, 1)
    star = StarReLU(scale_value=0.8944, bias_value=-0.4472)
    y = star(torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))).detach()
    assert abs(y.mean().item()) < 0.01 and abs(y.var().item() - 1) < 0.03


# sail-sg/metaformer README: IdentityFormer-S12/S24/M36 11.9M / 21.3M / 56.1M; RandFormer-S12
# 11.9M + 0.2M and RandFormer-S36 30.8M + 0.7M frozen random-mixing entries.
@pytest.mark.parametrize("name, paper_params, paper_frozen", [
    ("gf_identityformer_s12", 11.9e6, 0), ("gf_identityformer_m36", 56.1e6, 0),
    ("gf_randformer_s12", 11.9e6, 0.2e6), ("gf_randformer_s36", 30.8e6, 0.7e6)])
def test_parameter_counts_match_the_paper(meta_model, name, paper_params, paper_frozen):
    model = meta_model(name)
    n = sum(p.numel() for p in model.parameters())
    frozen = sum(b.numel() for n_, b in model.named_buffers() if n_.endswith("random_matrix"))
    assert abs(n - paper_params) / paper_params < 0.05, n
    assert abs(frozen - paper_frozen) <= 0.05e6, frozen


def _official_keys(depths, dims, random_tokens=(None, None, None, None)) -> dict[str, tuple[int, ...]]:
    """The state-dict layout of the official MetaFormer (sail-sg/metaformer@64c534a,
    metaformer_baselines.py) for IdentityFormer/RandFormer, with 1000 classes."""
    keys = {"downsample_layers.0.conv.weight": (dims[0], 3, 7, 7), "downsample_layers.0.conv.bias": (dims[0],),
            "downsample_layers.0.post_norm.weight": (dims[0],)}
    for i in range(1, 4):
        keys.update({f"downsample_layers.{i}.pre_norm.weight": (dims[i - 1],),
                     f"downsample_layers.{i}.conv.weight": (dims[i], dims[i - 1], 3, 3),
                     f"downsample_layers.{i}.conv.bias": (dims[i],)})
    for i, (depth, c, tokens) in enumerate(zip(depths, dims, random_tokens)):
        for j in range(depth):
            p = f"stages.{i}.{j}."
            keys[p + "norm1.weight"] = (c,)
            if tokens:
                keys[p + "token_mixer.random_matrix"] = (tokens, tokens)
            if i >= 2:
                keys[p + "res_scale1.scale"] = (c,)
            keys.update({p + "norm2.weight": (c,), p + "mlp.fc1.weight": (4 * c, c), p + "mlp.act.scale": (1,),
                         p + "mlp.act.bias": (1,), p + "mlp.fc2.weight": (c, 4 * c)})
            if i >= 2:
                keys[p + "res_scale2.scale"] = (c,)
    keys.update({"norm.weight": (dims[-1],), "norm.bias": (dims[-1],), "head.weight": (1000, dims[-1]),
                 "head.bias": (1000,)})
    return keys


@pytest.mark.parametrize("name, tokens", [("identityformer_s12", (None, None, None, None)),
                                          ("randformer_s12", (None, None, 196, 49))])
def test_official_checkpoint_layout_loads_strictly(name, tokens):
    keys = _official_keys((2, 2, 6, 2), (64, 128, 320, 512), tokens)
    with torch.device("meta"):
        model = load_official("gf_" + name, {k: torch.zeros(s) for k, s in keys.items()})
    assert len(model.state_dict()) == len(keys)


def test_a_missing_or_extra_official_key_is_named(official_key_errors_named):
    keys = _official_keys((2, 2, 6, 2), (64, 128, 320, 512), (None, None, 196, 49))
    official_key_errors_named(
        "gf_randformer_s12", {k: torch.zeros(s, device="meta") for k, s in keys.items()},
        missing="stages.2.3.token_mixer.random_matrix", extra="stages.1.0.token_mixer.random_matrix", extra_shape=(784, 784),
        named=("stages.2.blocks.3.token_mixer.random_matrix", "stages.1.blocks.0.token_mixer.random_matrix"))
