"""The teacher ensemble (mean of softmaxes, frozen) and the shared distillation losses."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genforge.kd.ensemble import TeacherEnsemble
from genforge.kd.losses import kd_kl_loss, soft_cross_entropy


def _linear(in_features, classes, seed):
    torch.manual_seed(seed)
    return nn.Linear(in_features, classes)


class _Dropper(nn.Module):
    """A teacher whose output changes in train mode (dropout), to see that eval mode sticks."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.fc(x))


def test_target_is_mean_of_softmaxes_not_softmax_of_mean():
    teachers = [_linear(6, 4, 0), _linear(6, 4, 1)]
    ens = TeacherEnsemble(teachers)
    x = torch.randn(5, 6)
    p = ens(x)
    z = torch.stack([t(x) for t in teachers])
    torch.testing.assert_close(p, z.softmax(-1).mean(0))
    torch.testing.assert_close(p.sum(-1), torch.ones(5))
    torch.testing.assert_close(ens.mean_logits(x), z.mean(0))
    assert TeacherEnsemble(teachers, sample_input=x).num_classes == 4
    assert not torch.allclose(p, z.mean(0).softmax(-1), atol=1e-4)


def test_temperature_softens_each_teacher_before_averaging():
    teachers = [_linear(6, 4, 0), _linear(6, 4, 1)]
    x = torch.randn(5, 6)
    p = TeacherEnsemble(teachers, temperature=3.0)(x)
    z = torch.stack([t(x) for t in teachers])
    torch.testing.assert_close(p, (z / 3.0).softmax(-1).mean(0))
    with pytest.raises(ValueError, match="temperature"):
        TeacherEnsemble(teachers, temperature=0.0)


def test_teachers_are_frozen_and_stay_in_eval_mode():
    ens = TeacherEnsemble([_Dropper(), _Dropper()])
    ens.train()
    assert all(not t.training for t in ens.teachers)
    assert all(not p.requires_grad for p in ens.parameters())
    x = torch.randn(3, 6, requires_grad=True)
    out = ens(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, ens(x))  # dropout is off


def test_teachers_with_different_class_counts_are_refused():
    with pytest.raises(ValueError, match=r"teacher 1 \(Linear\): 5 classes"):
        TeacherEnsemble(
            [_linear(6, 4, 0), _linear(6, 5, 1)], sample_input=torch.randn(2, 6)
        )
    ens = TeacherEnsemble([_linear(6, 4, 0), _linear(6, 5, 1)])
    with pytest.raises(ValueError, match="same number of classes"):
        ens(torch.randn(2, 6))


def test_class_counts_checked_from_num_classes_attribute():
    a, b = _linear(6, 4, 0), _linear(6, 3, 1)
    a.num_classes, b.num_classes = 4, 3
    with pytest.raises(ValueError, match="teacher 0 \\(Linear\\): 4 classes"):
        TeacherEnsemble([a, b])


def test_soft_cross_entropy_gradient_is_ps_minus_pt_over_batch():
    z_s = torch.randn(4, 7, requires_grad=True)
    p_t = torch.randn(4, 7).softmax(-1)
    soft_cross_entropy(z_s, p_t).backward()
    torch.testing.assert_close(z_s.grad, (z_s.detach().softmax(-1) - p_t) / 4)


def test_soft_cross_entropy_is_kl_plus_teacher_entropy():
    z_s = torch.randn(4, 7)
    p_t = torch.randn(4, 7).softmax(-1)
    kl = F.kl_div(z_s.log_softmax(-1), p_t, reduction="batchmean")
    entropy = -(p_t * p_t.log()).sum(-1).mean()
    torch.testing.assert_close(soft_cross_entropy(z_s, p_t), kl + entropy)


def test_kd_kl_is_t_squared_batchmean_kl_and_zero_when_matched():
    torch.manual_seed(0)
    z_s, z_t, T = torch.randn(4, 7), torch.randn(4, 7), 4.0
    ref = T**2 * F.kl_div(
        (z_s / T).log_softmax(-1), (z_t / T).softmax(-1), reduction="batchmean"
    )
    torch.testing.assert_close(kd_kl_loss(z_s, temperature=T, teacher_logits=z_t), ref)
    from_probs = kd_kl_loss(z_s, temperature=T, teacher_probs=(z_t / T).softmax(-1))
    torch.testing.assert_close(from_probs, ref)
    assert kd_kl_loss(z_t, temperature=T, teacher_logits=z_t).abs() < 1e-6
    with pytest.raises(ValueError, match="exactly one"):
        kd_kl_loss(z_s, temperature=T)


def test_kd_kl_accepts_sparse_teacher_probs():
    z_s = torch.randn(2, 3)
    p_t = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    loss = kd_kl_loss(z_s, temperature=1.0, teacher_probs=p_t)
    assert torch.isfinite(loss)
    torch.testing.assert_close(
        loss, F.kl_div(z_s.log_softmax(-1), p_t, reduction="batchmean")
    )


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        soft_cross_entropy(torch.randn(4, 7), torch.randn(4, 6).softmax(-1))
