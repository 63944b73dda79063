"""The train-on-synthetic evaluator (VICO's evaluate_synset protocol)."""

import copy

import pytest
import torch

from genforge.distill import EvalOptions, distill_dataset, evaluate_synthetic
from genforge.distill.dwa import DWAOptions, train_teacher
from genforge.distill.evaluate import _kd_loss, train_network
from genforge.distill.networks import build_convnet


def test_training_on_the_full_train_set_learns_the_digits(digits):
    real, test = digits
    options = EvalOptions(num_eval=1, epochs=40, net_width=16)
    result = evaluate_synthetic(real.images, test, options, labels=real.labels, progress=False)
    assert result.mean > 0.9


def _vico_evaluate_synset(net, images, labels, epochs):
    """VICO's evaluate_synset loop, written out by hand: full-batch SGD (momentum 0.9, wd 5e-4),
    ``for ep in range(Epoch + 1)``, lr x0.1 and a fresh momentum after ep in [Epoch // 2 + 1]."""
    params = list(net.parameters())
    lr, buffers, lrs = 0.01, None, []
    for ep in range(epochs + 1):
        loss = torch.nn.functional.cross_entropy(net(images), labels)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            grads = [g + 5e-4 * p for g, p in zip(grads, params)]
            buffers = grads if buffers is None else [0.9 * v + g for v, g in zip(buffers, grads)]
            for p, v in zip(params, buffers):
                p.sub_(lr * v)
        lrs.append(lr)
        if ep in [epochs // 2 + 1]:
            lr, buffers = lr * 0.1, None
    return lrs


@pytest.mark.parametrize("epochs", [1, 6, 7])
def test_training_follows_vicos_evaluate_synset_epoch_by_epoch(digits, monkeypatch, epochs):
    """E + 1 epochs, the tenfold drop after epoch index E // 2 + 1, momentum reset there."""
    real, _ = digits
    images, labels = real.images[:20], real.labels[:20]
    net = build_convnet(1, 10, 8, width=4, depth=2, seed=0)
    reference = copy.deepcopy(net)
    steps = []
    step = torch.optim.SGD.step

    def recording(self, *args, **kwargs):
        steps.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording)
    options = EvalOptions(epochs=epochs, batch_size=20, dsa_strategy="none")  # one full batch per epoch
    train_network(net, images, labels, options, torch.Generator().manual_seed(0))
    monkeypatch.undo()
    expected_lrs = _vico_evaluate_synset(reference.train(), images, labels, epochs)
    assert len(steps) == epochs + 1
    assert steps == pytest.approx(expected_lrs)
    for (name, p), q in zip(net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_soft_label_loss_is_t2_scaled_kl_at_the_temperature():
    """Our documented choice (DWA's own CIFAR script: plain KL at T = 30)."""
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 10), torch.randn(8, 10)
    t = 4.0
    p = (teacher / t).softmax(1)
    naive = t * t * (p * (p.log() - (student / t).log_softmax(1))).sum(1).mean()
    torch.testing.assert_close(_kd_loss(student, p, t), naive)


def test_teacher_relabelling_never_reads_the_hard_labels(digits):
    real, test = digits
    teacher = train_teacher(real, DWAOptions(teacher_width=16, teacher_epochs=15), seed=0, progress=False)
    syn = distill_dataset("random", real, ipc=10, seed=0)
    wrong = (syn.labels + 1) % 10
    options = EvalOptions(soft="teacher", num_eval=1, epochs=30, batch_size=25, net_width=16)
    result = evaluate_synthetic(syn.images, test, options, labels=wrong, teacher=teacher, progress=False)
    assert result.mean > 0.5  # far above the ~0% that the shifted hard labels would give


def test_soft_label_modes_need_their_inputs_and_shapes_must_match(digits):
    real, test = digits
    syn = distill_dataset("random", real, ipc=1, seed=0)
    with pytest.raises(ValueError, match="carries no soft labels"):
        evaluate_synthetic(syn, test, EvalOptions(soft="stored"), progress=False)
    with pytest.raises(ValueError, match="needs the teacher"):
        evaluate_synthetic(syn, test, EvalOptions(soft="teacher"), progress=False)
    with pytest.raises(ValueError, match="do not match the test images"):
        evaluate_synthetic(torch.zeros(10, 1, 16, 16), test, labels=syn.labels, progress=False)
    with pytest.raises(ValueError, match="needs labels="):
        evaluate_synthetic(syn.images, test, progress=False)
    with pytest.raises(ValueError, match="unknown soft-label mode"):
        EvalOptions(soft="hard").check()
