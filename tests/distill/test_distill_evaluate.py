"""The train-on-synthetic evaluator (VICO's evaluate_synset protocol)."""

import pytest
import torch

import genforge
from genforge.distill import EvalOptions, evaluate_synthetic
from genforge.distill.dwa import DWAOptions, train_teacher
from genforge.distill.evaluate import train_network
from genforge.distill.networks import build_convnet

def test_training_on_the_full_train_set_learns_the_digits(digits):
    real, test = digits
    options = EvalOptions(num_eval=1, epochs=40, net_width=16)
    result = evaluate_synthetic(real.images, test, options, labels=real.labels, progress=False)
    assert result.mean > 0.9


def test_lr_drops_tenfold_once_after_half_the_epochs(digits, monkeypatch):
    real, _ = digits
    created = []
    original = torch.optim.SGD

    def recording(params, **kwargs):
        created.append(kwargs)
        return original(params, **kwargs)

    monkeypatch.setattr(torch.optim, "SGD", recording)
    net = build_convnet(1, 10, 8, width=4, depth=2, seed=0)
    train_network(net, real.images[:20], real.labels[:20], EvalOptions(epochs=4), torch.Generator().manual_seed(0))
    assert [c["lr"] for c in created] == pytest.approx([0.01, 0.001])
    assert all(c["momentum"] == 0.9 and c["weight_decay"] == 5e-4 for c in created)


def test_teacher_relabelling_never_reads_the_hard_labels(digits):
    real, test = digits
    teacher = train_teacher(real, DWAOptions(teacher_width=16, teacher_epochs=15), seed=0, progress=False)
    syn = genforge.distill("random", real, ipc=10, seed=0)
    wrong = (syn.labels + 1) % 10
    options = EvalOptions(soft="teacher", num_eval=1, epochs=30, batch_size=25, net_width=16)
    result = evaluate_synthetic(syn.images, test, options, labels=wrong, teacher=teacher, progress=False)
    assert result.mean > 0.5  # far above the ~0% that the shifted hard labels would give


def test_soft_label_modes_need_their_inputs_and_shapes_must_match(digits):
    real, test = digits
    syn = genforge.distill("random", real, ipc=1, seed=0)
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
