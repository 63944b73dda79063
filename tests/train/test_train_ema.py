"""EMA: the average is the hand-computed exponential average of every parameter and buffer."""

import pytest
import torch

from genforge.train import EMA


def linear():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


@pytest.mark.parametrize("warmup", [True, False])
def test_average_equals_hand_computed_exponential_average(warmup):
    model = linear()
    ema = EMA(model, decay=0.8, warmup=warmup)
    expected = model.weight.detach().clone()
    for t in range(6):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        d = min(0.8, (1 + t) / (10 + t)) if warmup else 0.8
        expected = d * expected + (1 - d) * model.weight.detach()
        ema.update(model)
    torch.testing.assert_close(ema.module.weight, expected, rtol=1e-6, atol=1e-7)
    assert ema.num_updates == 6


def test_warmup_decay_follows_one_plus_t_over_ten_plus_t_capped_at_decay():
    ema = EMA(torch.nn.Linear(1, 1), decay=0.5, warmup=True)
    decays = []
    for _ in range(12):
        decays.append(ema.current_decay())
        ema.num_updates += 1
    assert decays[:3] == [1 / 10, 2 / 11, 3 / 12]
    assert decays[-1] == 0.5 and max(decays) == 0.5


def test_batchnorm_running_statistics_are_averaged_and_the_batch_count_copied():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = EMA(model, decay=0.5, warmup=False)
    expected_mean = model[1].running_mean.clone()
    for _ in range(4):
        model(torch.randn(16, 4) * 3 + 2)  # train mode: moves the running statistics
        ema.update(model)
        expected_mean = 0.5 * expected_mean + 0.5 * model[1].running_mean
    torch.testing.assert_close(ema.module[1].running_mean, expected_mean)
    assert not torch.allclose(ema.module[1].running_mean, model[1].running_mean)
    assert int(ema.module[1].num_batches_tracked) == int(model[1].num_batches_tracked) == 4
    assert not ema.module.training  # scored in eval mode, with the averaged statistics


def test_save_load_round_trip(tmp_path):
    model = linear()
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.mul_(3)
    ema.update(model)
    ema.save(tmp_path / "ema.safetensors")
    restored = EMA(torch.nn.Linear(3, 2), decay=0.1, warmup=False)
    restored.load(tmp_path / "ema.safetensors", ema.counters())
    assert (restored.decay, restored.warmup, restored.num_updates) == (0.9, True, 1)
    for a, b in zip(ema.module.state_dict().values(), restored.module.state_dict().values()):
        assert torch.equal(a, b)


def test_state_of_another_model_is_rejected(tmp_path):
    EMA(torch.nn.Linear(3, 2, bias=False)).save(tmp_path / "no_bias.safetensors")
    EMA(torch.nn.Linear(4, 2)).save(tmp_path / "wide.safetensors")
    ema = EMA(torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match="missing.*bias"):
        ema.load(tmp_path / "no_bias.safetensors", ema.counters())
    with pytest.raises(RuntimeError, match="size mismatch"):
        ema.load(tmp_path / "wide.safetensors", ema.counters())
