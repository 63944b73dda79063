"""EMA: the shadow is the hand-computed exponential average, with and without warm-up."""

import pytest
import torch

from genforge.train import EMA


def linear():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


@pytest.mark.parametrize("warmup", [True, False])
def test_shadow_equals_hand_computed_exponential_average(warmup):
    model = linear()
    ema = EMA(model, decay=0.8, warmup=warmup)
    expected = model.weight.detach().clone()
    for t in range(6):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        d = min(0.8, (1 + t) / (10 + t)) if warmup else 0.8
        expected = d * expected + (1 - d) * model.weight.detach()
        ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], expected, rtol=1e-6, atol=1e-7)
    assert ema.num_updates == 6


def test_warmup_decay_follows_one_plus_t_over_ten_plus_t_capped_at_decay():
    ema = EMA(torch.nn.Linear(1, 1), decay=0.5, warmup=True)
    decays = []
    for _ in range(12):
        decays.append(ema.current_decay())
        ema.num_updates += 1
    assert decays[:3] == [1 / 10, 2 / 11, 3 / 12]
    assert decays[-1] == 0.5 and max(decays) == 0.5


def test_copy_to_and_state_dict_round_trip():
    model = linear()
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.mul_(3)
    ema.update(model)
    restored = EMA(torch.nn.Linear(3, 2), decay=0.1, warmup=False)
    restored.load_state_dict(ema.state_dict())
    assert (restored.decay, restored.warmup, restored.num_updates) == (0.9, True, 1)
    target = torch.nn.Linear(3, 2)
    restored.copy_to(target)
    assert torch.equal(target.weight, ema.shadow["weight"])
    assert torch.equal(target.bias, ema.shadow["bias"])


def test_state_of_another_model_is_rejected():
    ema = EMA(torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match="shape"):
        ema.load_state_dict(EMA(torch.nn.Linear(4, 2)).state_dict())
    with pytest.raises(ValueError, match="missing"):
        ema.load_state_dict(EMA(torch.nn.Linear(3, 2, bias=False)).state_dict())
