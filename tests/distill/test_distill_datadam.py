"""DataDAM (spec: dataset_distillation.md, "Properties to test / DataDAM")."""

import pytest
import torch

from genforge.distill.datadam import SAM_SCALE, attention_map, datadam_objective
from genforge.distill.dm import dm_objective
from genforge.distill.networks import build_convnet


def _features():
    torch.manual_seed(0)
    return torch.randn(4, 6, 5, 5)


@pytest.mark.parametrize("power", [1.0, 4.0])
def test_attention_rows_have_unit_norm(power):
    a = attention_map(_features(), power)
    assert a.shape == (4, 25)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(4))


@pytest.mark.parametrize("power", [1.0, 4.0])
def test_attention_is_invariant_to_positive_scale_channel_order_and_sign(power):
    f = _features()
    a = attention_map(f, power)
    torch.testing.assert_close(attention_map(3.7 * f, power), a)
    torch.testing.assert_close(attention_map(f[:, torch.randperm(6)], power), a)
    torch.testing.assert_close(attention_map(-f, power), a)


def test_higher_power_concentrates_attention_on_the_strongest_location():
    f = torch.ones(1, 2, 1, 3)
    f[..., 0] = 2.0  # one location with twice the activation
    share = {p: attention_map(f, p)[0, 0] / attention_map(f, p)[0, 1] for p in (1.0, 4.0)}
    assert share[1.0] == pytest.approx(2.0) and share[4.0] == pytest.approx(16.0)


def _batches(seed=0, classes=3, n_real=5, n_syn=2):
    g = torch.Generator().manual_seed(seed)
    real = [torch.randn(n_real, 1, 8, 8, generator=g) for _ in range(classes)]
    syn = [torch.randn(n_syn, 1, 8, 8, generator=g) for _ in range(classes)]
    return real, syn


def _net(depth=2, seed=0):
    return build_convnet(1, 3, 8, width=8, depth=depth, seed=seed).requires_grad_(False)


def test_loss_is_zero_when_the_synthetic_batch_is_the_real_batch():
    real, _ = _batches()
    loss, _ = datadam_objective(_net(), real, [r.clone() for r in real])
    assert float(loss) == pytest.approx(0.0, abs=1e-10)


def test_loss_is_non_negative_and_per_class():
    real, syn = _batches()
    loss, _ = datadam_objective(_net(), real, syn)
    assert float(loss) > 0
    swapped = [real[1], real[0], real[2]]
    assert float(datadam_objective(_net(), swapped, syn)[0]) != pytest.approx(float(loss))


def test_only_the_synthetic_pixels_receive_gradients():
    real, syn = _batches()
    net = _net()
    syn = [s.requires_grad_(True) for s in syn]
    loss, _ = datadam_objective(net, real, syn)
    loss.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in syn)
    assert all(p.grad is None for p in net.parameters())
    assert all(not r.requires_grad for r in real)


def test_sam_uses_every_block_but_the_last_plus_the_embedding_mmd():
    real, syn = _batches()
    net = _net(depth=3)
    power, balance = 4.0, 0.01
    maps_r, emb_r = net.activations(torch.cat(real))
    maps_s, emb_s = net.activations(torch.cat(syn))

    def per_class_mean(x, n):
        return x.flatten(1).reshape(3, n, -1).mean(1)

    expected = 0.0
    for fr, fs in zip(maps_r[:2], maps_s[:2]):  # depth - 1 = 2 SAM layers
        expected += SAM_SCALE * ((per_class_mean(attention_map(fr, power), 5)
                                  - per_class_mean(attention_map(fs, power), 2)) ** 2).sum()
    expected += SAM_SCALE * balance * ((per_class_mean(emb_r, 5) - per_class_mean(emb_s, 2)) ** 2).sum()
    loss, logs = datadam_objective(net, real, syn, power=power, task_balance=balance)
    torch.testing.assert_close(loss, expected)
    assert logs["sam"] > 0 and logs["mmd"] > 0


def test_without_sam_layers_and_unit_weight_datadam_is_dm():
    real, syn = _batches()
    net = _net(depth=1)  # a single block: no SAM layer, only the embedding term
    dam, logs = datadam_objective(net, real, syn, task_balance=1 / SAM_SCALE)
    dm, _ = dm_objective(net, real, syn)
    torch.testing.assert_close(dam, dm)
    assert logs["sam"] == 0.0
