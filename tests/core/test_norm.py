"""TD-LN / TD-RMSNorm as DiMR defines them (arXiv 2406.09416, Eq. 4), against adaLN-Zero's cost."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.normalization import AdaLayerNormZero

from genforge.core.norm import TDLayerNorm, TDRMSNorm, TimeDependentParameter, split_no_decay_parameters


def reference_theta(tdp: TimeDependentParameter, tau: float) -> torch.Tensor:
    """theta(tau) = p1 + sigmoid(tau * (1 + w') + b') * (p0 - p1), written out per channel."""
    p0, p1 = tdp.param0.detach(), tdp.param1.detach()
    w, b = tdp.nodecay_weight.detach(), tdp.nodecay_bias.detach()
    return torch.stack([p1[i] + torch.sigmoid(tau * (1 + w[i]) + b[i]) * (p0[i] - p1[i]) for i in range(len(p0))])


def perturb(module: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.5)


def test_fresh_td_norm_is_time_independent_and_becomes_time_dependent_once_endpoints_differ():
    norm = TDLayerNorm(16)
    x = torch.randn(3, 5, 16)
    early, late = torch.full((3,), -0.9), torch.full((3,), 0.9)
    assert torch.equal(norm(x, early), norm(x, late))
    perturb(norm)
    assert not torch.allclose(norm(x, early), norm(x, late))


def test_theta_tends_to_param0_for_large_tau_and_param1_for_very_negative_tau():
    tdp = TimeDependentParameter(8, 1.0)
    perturb(tdp)
    with torch.no_grad():
        tdp.nodecay_weight.abs_()  # keep 1 + w' > 0 so the limits are the ones named
    assert torch.allclose(tdp(torch.tensor([1e4]))[0], tdp.param0, atol=1e-6)
    assert torch.allclose(tdp(torch.tensor([-1e4]))[0], tdp.param1, atol=1e-6)


def test_theta_matches_the_hand_written_formula_per_sample_and_broadcasts_equal_times():
    tdp = TimeDependentParameter(6, 0.0)
    perturb(tdp, seed=1)
    taus = torch.tensor([-0.7, 0.1, 0.95])
    values = tdp(taus)
    assert values.shape == (3, 6)
    for row, tau in zip(values, taus):
        assert torch.allclose(row, reference_theta(tdp, float(tau)), atol=1e-6)
    shared = tdp(torch.full((4,), 0.3))
    assert shared.shape == (1, 6)
    assert torch.allclose(shared[0], reference_theta(tdp, 0.3), atol=1e-6)


def test_td_layernorm_at_fixed_time_is_layernorm_with_time_dependent_affine():
    norm = TDLayerNorm(10)
    perturb(norm, seed=2)
    x = torch.randn(2, 7, 10)
    tau = 0.25
    expected = F.layer_norm(x, (10,), weight=reference_theta(norm.weight, tau), bias=reference_theta(norm.bias, tau))
    assert torch.allclose(norm(x, torch.full((2,), tau)), expected, atol=1e-5)


def test_td_layernorm_uses_each_samples_own_time_on_channel_last_maps():
    norm = TDLayerNorm(4)
    perturb(norm, seed=3)
    x = torch.randn(2, 3, 3, 4)
    taus = torch.tensor([-0.5, 0.8])
    batched = norm(x, taus)
    for i in range(2):
        assert torch.allclose(batched[i:i + 1], norm(x[i:i + 1], taus[i:i + 1]), atol=1e-6)


def test_td_rmsnorm_matches_the_official_formula_without_bias():
    norm = TDRMSNorm(12)
    perturb(norm, seed=4)
    x = torch.randn(3, 5, 12)
    gamma = reference_theta(norm.scale, -0.2)
    expected = x / (x.norm(dim=-1, keepdim=True) / 12**0.5 + 1e-8) * gamma
    assert torch.allclose(norm(x, torch.full((3,), -0.2)), expected, atol=1e-5)


def test_td_norm_parameter_count_is_four_vectors_per_affine_far_below_adaln():
    dim = 960
    assert sum(p.numel() for p in TDLayerNorm(dim).parameters()) == 8 * dim
    assert sum(p.numel() for p in TDRMSNorm(dim).parameters()) == 4 * dim
    adaln = sum(p.numel() for p in AdaLayerNormZero(dim).parameters())  # DiT's, without its embedder
    assert adaln == 6 * dim * dim + 6 * dim
    assert 8 * dim * 100 < adaln


def test_only_td_gate_vectors_escape_weight_decay():
    norm = TDLayerNorm(4)
    decay, no_decay = split_no_decay_parameters(norm, 0.03)
    named = dict(norm.named_parameters())
    assert {id(p) for p in no_decay["params"]} == {id(p) for n, p in named.items() if "nodecay" in n}
    assert decay["weight_decay"] == 0.03 and no_decay["weight_decay"] == 0.0


def test_bad_time_shape_is_rejected():
    with pytest.raises(ValueError, match="tau"):
        TimeDependentParameter(3, 1.0)(torch.zeros(2, 2))
