"""DWA, directed weight adjustment (spec: "Properties to test / DWA")."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from genforge.distill.dwa import BNStatisticsLoss, DWAOptions, directed_weight_adjustment, recover_batch
from genforge.distill.networks import build_convnet


def _teacher(seed=0):
    net = build_convnet(1, 3, 8, width=8, depth=2, norm="batchnorm", seed=seed)
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():  # trained-looking running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net.eval()


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 1, 8, 8, generator=g), torch.arange(3)


BOX = (torch.full((1, 1, 1, 1), -1.5), torch.full((1, 1, 1, 1), 1.5))


def _flat(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def _sre2l_reference(teacher, init, targets, options, generator):
    """SRe2L's recover loop written out naively: no weight adjustment at all."""
    model = copy.deepcopy(teacher).eval()
    x = init.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=options.lr, betas=(options.beta1, options.beta2), eps=1e-8)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for it in range(options.iterations):
        for group in opt.param_groups:
            group["lr"] = 0.5 * (1 + math.cos(math.pi * it / options.iterations)) * options.lr
        dy, dx = (int(v) for v in torch.randint(0, options.jitter + 1, (2,), generator=generator))
        x_jit = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        inputs = []
        handles = [bn.register_forward_hook(lambda m, i, o: inputs.append(i[0])) for bn in bns]
        logits = model(x_jit)
        for h in handles:
            h.remove()
        bn_terms = []
        for k, (bn, a) in enumerate(zip(bns, inputs)):
            mean = a.mean(dim=(0, 2, 3))
            var = ((a - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
            term = options.r_var * (bn.running_var - var).norm() + (bn.running_mean - mean).norm()
            bn_terms.append(term * (options.first_bn_multiplier if k == 0 else 1.0))
        loss = F.cross_entropy(logits, targets) + options.r_bn * sum(bn_terms)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.copy_(x.clamp(BOX[0], BOX[1]))
    return x.detach()


@pytest.mark.parametrize("iterations", [1, 2, 6])
def test_rho_zero_is_sre2l_step_for_step(iterations):
    teacher = _teacher()
    init, y = _batch()
    options = DWAOptions(iterations=iterations, rho=0.0, steps=12, jitter=1)
    ours = recover_batch(teacher, init, y, options, BOX, torch.Generator().manual_seed(5))
    reference = _sre2l_reference(teacher, init, y, options, torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, reference)
    no_steps = recover_batch(teacher, init, y, DWAOptions(iterations=iterations, rho=15e-3, steps=0, jitter=1),
                             BOX, torch.Generator().manual_seed(5))
    torch.testing.assert_close(no_steps, reference)


def test_adjustment_moves_the_weights_by_at_most_rho_and_exactly_rho_in_one_step():
    init, y = _batch()
    for steps, exact in [(1, True), (12, False)]:
        teacher = _teacher()
        before = _flat(teacher)
        directed_weight_adjustment(teacher, init, y, rho=0.05, steps=steps)
        moved = (_flat(teacher) - before).norm()
        assert moved <= 0.05 + 1e-6
        if exact:
            assert float(moved) == pytest.approx(0.05, rel=1e-4)


def test_adjustment_ascends_the_loss_of_its_batch():
    init, y = _batch()
    teacher = _teacher()
    before = F.cross_entropy(teacher(init), y)
    directed_weight_adjustment(teacher, init, y, rho=1e-2, steps=12)
    assert F.cross_entropy(teacher(init), y) > before


def test_adjustment_depends_on_the_batch_and_leaves_bn_statistics_alone():
    deltas = []
    for seed in (0, 1):
        teacher = _teacher()
        stats = [b.clone() for b in teacher.buffers()]
        before = _flat(teacher)
        directed_weight_adjustment(teacher, *_batch(seed), rho=1e-2, steps=3)
        deltas.append(_flat(teacher) - before)
        assert all(torch.equal(a, b) for a, b in zip(stats, teacher.buffers()))
        assert not teacher.training
    assert not torch.allclose(deltas[0], deltas[1])


def test_recovery_leaves_the_given_teacher_unperturbed_and_keeps_pixels_in_the_box():
    teacher = _teacher()
    weights = _flat(teacher)
    init, y = _batch()
    x = recover_batch(teacher, init * 3, y, DWAOptions(iterations=5, lr=1.0, jitter=1), BOX,
                      torch.Generator().manual_seed(0))
    torch.testing.assert_close(_flat(teacher), weights)
    assert float(x.min()) >= -1.5 and float(x.max()) <= 1.5


def test_bn_matching_loss_is_zero_at_the_running_statistics_and_weights_the_first_layer_tenfold():
    teacher = _teacher()
    x, _ = _batch()
    layers = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for layer in layers:  # in order: each layer's input depends on the statistics before it
        seen = []
        handle = layer.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
        teacher(x)
        handle.remove()
        layer.running_mean.copy_(seen[0].mean(dim=(0, 2, 3)))
        layer.running_var.copy_(seen[0].var(dim=(0, 2, 3), unbiased=False))
    with BNStatisticsLoss(teacher, r_var=11.0, first_multiplier=10.0) as bn:
        teacher(x)
    assert float(bn.value().detach()) == pytest.approx(0.0, abs=1e-5)

    first = layers[0]
    first.running_mean.add_(1.0)
    values = {}
    for multiplier in (1.0, 10.0):
        with BNStatisticsLoss(teacher, r_var=11.0, first_multiplier=multiplier) as bn:
            teacher(x)
        values[multiplier] = float(bn.value().detach())
    # the first layer's input does not depend on its statistics: its term is exactly ||1||_2
    assert values[10.0] - values[1.0] == pytest.approx(9.0 * math.sqrt(first.num_features), rel=1e-4)


def test_networks_without_batch_norm_are_refused():
    with pytest.raises(ValueError, match="BatchNorm2d"):
        BNStatisticsLoss(build_convnet(1, 3, 8, width=4, depth=1, norm="instancenorm"), 11.0, 10.0)


def test_dwa_batches_start_from_the_random_subset_of_the_same_seed(digits):
    from genforge.distill import distill_dataset

    real, _ = digits
    subset = distill_dataset("random", real, ipc=2, seed=4)
    teacher = build_convnet(1, 10, 8, width=4, depth=2, norm="batchnorm", seed=0).eval()
    start = distill_dataset("dwa", real, ipc=2, seed=4, teacher=teacher, iterations=1, lr=1e-12, rho=0.0,
                            progress=False)
    torch.testing.assert_close(start.images, subset.images, atol=1e-6, rtol=0)
    assert torch.equal(start.labels, subset.labels)
