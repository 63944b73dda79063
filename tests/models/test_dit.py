"""The DiT-style adaLN-Zero baseline (arXiv 2212.09748)."""

import torch

from genforge.methods.diffusion import DIT_CONFIGS
from genforge.models.dit import DiTModel


def tiny_dit() -> DiTModel:
    torch.manual_seed(0)
    return DiTModel(**DIT_CONFIGS["tiny"])


def test_adaln_zero_makes_every_block_start_as_the_identity():
    model = tiny_dit()
    x = torch.randn(2, 16, 32)
    cond = torch.randn(2, 32)
    for block in model.blocks:
        assert torch.equal(block(x, cond), x)


def test_conditioning_reaches_the_output_once_modulation_is_trained():
    model = tiny_dit()
    with torch.no_grad():
        for module in [*(b.ada_ln.linear for b in model.blocks), model.final_ada_ln.linear, model.final_proj]:
            module.weight.normal_(std=0.05)
    x = torch.randn(2, 4, 8, 8)
    a = model(x, torch.tensor([10, 10]), torch.tensor([1, 1])).sample
    assert a.shape == x.shape
    assert not torch.allclose(a, model(x, torch.tensor([900, 900]), torch.tensor([1, 1])).sample)
    assert not torch.allclose(a, model(x, torch.tensor([10, 10]), torch.tensor([2, 2])).sample)


def test_save_and_load_pretrained_round_trip(tmp_path):
    model = tiny_dit()
    with torch.no_grad():
        model.final_proj.weight.normal_()
    model.save_pretrained(tmp_path)
    loaded = DiTModel.from_pretrained(tmp_path)
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([3, 400]), torch.tensor([0, 10])
    assert torch.equal(loaded(x, t, y).sample, model(x, t, y).sample)
