"""MEAL V2 (arXiv 2009.08453): the properties listed in specs/knowledge_transfer.md."""

import copy
import inspect
import itertools

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from genforge.kd.ensemble import TeacherEnsemble
from genforge.kd.meal_v2 import MealV2Discriminator, MealV2Method, meal_v2_loss, meal_v2_param_groups
from genforge.kd.teachers import load_classifier
from genforge.train import train
from genforge.train.loop import _optimizer

B, C = 8, 10


def _cnn(width, classes=C, kernel=3):
    return nn.Sequential(
        nn.Conv2d(3, width, kernel, stride=2, padding=kernel // 2),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, classes),
    )


@pytest.fixture
def setup():
    torch.manual_seed(0)
    student = _cnn(8)
    teachers = TeacherEnsemble([_cnn(12), _cnn(6, kernel=5)])
    disc = MealV2Discriminator(C, channel_divisor=2)
    x = torch.randn(B, 3, 32, 32)
    labels = torch.randint(0, C, (B,))
    return student, teachers, disc, x, labels


def _sgd(student, disc, lr=0.1, d_lr=1e-2):
    return torch.optim.SGD(
        meal_v2_param_groups(student, disc, lr, d_lr), lr=lr, momentum=0.9
    )


def _step(student, teachers, disc, opt, x, labels):
    """One MEAL V2 step; labels only feed the top-1 log, never the loss."""
    p_t, z_t = teachers.probs_and_mean_logits(x)
    z_s = student(x)
    out = meal_v2_loss(z_s, p_t, z_t, disc)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    top1 = (z_s.argmax(-1) == labels).float().mean()
    return out, top1


def test_target_is_mean_of_teacher_softmaxes(setup):
    _, teachers, _, x, _ = setup
    p_t, z_t = teachers.probs_and_mean_logits(x)
    z = torch.stack([t(x) for t in teachers.teachers])
    torch.testing.assert_close(p_t, z.softmax(-1).mean(0))
    torch.testing.assert_close(p_t.sum(-1), torch.ones(B))
    torch.testing.assert_close(z_t, z.mean(0))
    assert not torch.allclose(p_t, z_t.softmax(-1), atol=1e-5)


def test_teachers_frozen_through_a_training_step(setup):
    student, teachers, disc, x, labels = setup
    before = copy.deepcopy(teachers.state_dict())
    teachers.train()
    _step(student, teachers, disc, _sgd(student, disc), x, labels)
    assert all(not t.training for t in teachers.teachers)
    for p in teachers.parameters():
        assert not p.requires_grad and p.grad is None
    for k, v in teachers.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_loss_takes_no_labels_and_permuting_labels_changes_nothing(setup):
    assert "labels" not in inspect.signature(meal_v2_loss).parameters
    student, teachers, disc, x, labels = setup
    runs = []
    for y in (labels, labels[torch.randperm(B)]):
        s, d = copy.deepcopy(student), copy.deepcopy(disc)
        out, _ = _step(s, teachers, d, _sgd(s, d), x, y)
        runs.append(
            (
                out.loss.detach(),
                [p.detach() for p in [*s.parameters(), *d.parameters()]],
            )
        )
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_kd_gradient_wrt_student_logits_is_ps_minus_pt_over_batch(setup):
    student, teachers, disc, x, _ = setup
    p_t, z_t = teachers.probs_and_mean_logits(x)
    z_s = student(x).detach().requires_grad_(True)
    out = meal_v2_loss(z_s, p_t, z_t, disc)
    (grad,) = torch.autograd.grad(out.kd_loss, z_s)
    torch.testing.assert_close(grad, (z_s.detach().softmax(-1) - p_t) / B)
    torch.testing.assert_close(out.loss, out.kd_loss + out.d_loss)


def test_discriminator_sees_student_half_first_then_teacher_half(setup):
    student, teachers, disc, x, _ = setup
    p_t, z_t = teachers.probs_and_mean_logits(x)
    z_s = student(x)
    out = meal_v2_loss(z_s, p_t, z_t, disc)
    assert out.d_output.shape == (2 * B, 2)
    torch.testing.assert_close(
        out.d_target[:B], torch.tensor([[1.0, 0.0]]).expand(B, 2)
    )
    torch.testing.assert_close(
        out.d_target[B:], torch.tensor([[0.0, 1.0]]).expand(B, 2)
    )
    torch.testing.assert_close(out.d_output[:B], disc(z_s))
    torch.testing.assert_close(out.d_output[B:], disc(z_t))


def test_student_also_descends_the_discriminator_loss(setup):
    student, teachers, _, x, _ = setup
    disc = MealV2Discriminator(C, channel_divisor=2, relu_last=False)
    p_t, z_t = teachers.probs_and_mean_logits(x)
    z_s = student(x)
    out = meal_v2_loss(z_s, p_t, z_t, disc)
    (g_total,) = torch.autograd.grad(out.loss, z_s, retain_graph=True)
    (g_kd,) = torch.autograd.grad(out.kd_loss, z_s, retain_graph=True)
    (g_d,) = torch.autograd.grad(out.d_loss, z_s)
    assert g_d.abs().sum() > 0  # joint update: no gradient reversal, no detach
    torch.testing.assert_close(g_total, g_kd + g_d)


def test_discriminator_layout_and_relu_quirk():
    d = MealV2Discriminator(1000, channel_divisor=8)
    widths = [(m.in_channels, m.out_channels) for m in (d.conv1, d.conv2, d.conv3)]
    assert widths == [(1000, 125), (125, 15), (15, 2)]
    torch.manual_seed(0)
    z = torch.randn(64, 1000) * 5
    assert (d(z) >= 0).all()
    plain = MealV2Discriminator(1000, channel_divisor=8, relu_last=False)
    plain.load_state_dict(d.state_dict())
    assert (plain(z) < 0).any()
    torch.testing.assert_close(plain(z).clamp_min(0), d(z))
    with pytest.raises(ValueError, match="channel_divisor"):
        MealV2Discriminator(10, channel_divisor=8)


def test_optimiser_groups_have_no_weight_decay_and_separate_lrs(setup):
    student, _, disc, _, _ = setup
    initial = copy.deepcopy(student.state_dict())
    opt = _sgd(student, disc, lr=0.1, d_lr=1e-4)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 1e-4]
    assert {id(p) for p in opt.param_groups[1]["params"]} == {
        id(p) for p in disc.parameters()
    }
    faithful = meal_v2_param_groups(student, disc, 0.1, 1e-4, follow_student_lr=True)
    assert [g["lr"] for g in faithful] == [0.1, 0.1]
    for k, v in student.state_dict().items():  # step 0: the student is its initial self
        torch.testing.assert_close(v, initial[k], rtol=0, atol=0)


def test_a_few_steps_lower_the_similarity_loss(setup):
    student, teachers, disc, x, labels = setup
    p_t = teachers(x)
    floor = -(p_t * p_t.log()).sum(-1).mean().item()  # L_KD = KL(p_T || p_S) + H(p_T)
    opt = _sgd(student, disc, lr=0.05)
    kl = [
        _step(student, teachers, disc, opt, x, labels)[0].kd_loss.item() - floor
        for _ in range(6)
    ]
    assert all(
        b < a for a, b in itertools.pairwise(kl)
    )  # falls at every step, from the 2nd on
    assert kl[-1] < 0.85 * kl[0]


def test_teachers_with_different_class_counts_are_refused():
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="teacher 1 \\(Sequential\\): 7 classes"):
        TeacherEnsemble([_cnn(4), _cnn(4, classes=7)], sample_input=x)


# ----------------------------------------------------------------------------- the meal_v2 method


def test_meal_v2_loss_never_reads_labels(tmp_path, teachers, kd_recipe, batch_of):
    method = MealV2Method(kd_recipe(tmp_path, "meal_v2", teachers, channel_divisor=2))
    model = method.build_model()
    images, labels = batch_of(method)
    grads = []
    for y in (labels, labels.flip(0), torch.zeros_like(labels)):
        model.zero_grad()
        loss, _ = method.training_step(model, (images, y))
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    for loss, g in grads[1:]:
        assert torch.equal(loss, grads[0][0])
        assert all(torch.equal(a, b) for a, b in zip(g, grads[0][1]))


def test_meal_v2_groups_have_no_weight_decay_and_their_own_lr(tmp_path, teachers, kd_recipe):
    for follow, d_lr in ((False, 1e-4), (True, 1e-3)):
        method = MealV2Method(kd_recipe(tmp_path, "meal_v2", teachers, channel_divisor=2, follow_student_lr=follow))
        groups = method.parameter_groups(method.build_model())
        assert [g["name"] for g in groups] == ["student", "discriminator"]
        assert [g["weight_decay"] for g in groups] == [0.0, 0.0]
        assert groups[1]["lr"] == pytest.approx(d_lr)


def test_adversarial_update_reverses_only_the_discriminator_gradient():
    torch.manual_seed(0)
    disc = MealV2Discriminator(10, channel_divisor=2, relu_last=False)
    z = torch.randn(6, 10, requires_grad=True)
    probs, mean_logits = torch.softmax(torch.randn(6, 10), -1), torch.randn(6, 10)
    parts = {}
    for name in ("kd_loss", "d_loss"):
        (g,) = torch.autograd.grad(getattr(meal_v2_loss(z, probs, mean_logits, disc), name), z)
        parts[name] = g
    for adversarial, sign in ((False, 1.0), (True, -1.0)):
        (g,) = torch.autograd.grad(meal_v2_loss(z, probs, mean_logits, disc, adversarial=adversarial).loss, z)
        torch.testing.assert_close(g, parts["kd_loss"] + sign * parts["d_loss"])


def test_meal_v2_trains_from_the_pretrained_student_and_resumes_with_its_discriminator(tmp_path, teachers, kd_recipe,
                                                                                         classifier_run):
    start = classifier_run(tmp_path / "student", "test_efficientnet", seed=5)
    weights = str(start / "model.safetensors")
    base = dict(channel_divisor=2, pretrained_file=weights)
    step0 = MealV2Method(kd_recipe(tmp_path, "meal_v2", teachers, **base)).build_model()
    reference = load_classifier(start, num_classes=10).state_dict()
    for key, value in step0.student.state_dict().items():
        assert torch.equal(value, reference[key]), key

    full = train(kd_recipe(tmp_path / "full", "meal_v2", teachers, steps=4, **base))
    train(kd_recipe(tmp_path / "cut", "meal_v2", teachers, steps=2, **base))
    resumed = train(kd_recipe(tmp_path / "cut", "meal_v2", teachers, steps=4, **base), resume=True)
    assert resumed.resumed_from == 2
    a = load_file(str(full.output_dir / "model" / "model.safetensors"))
    b = load_file(str(resumed.output_dir / "model" / "model.safetensors"))
    assert any(k.startswith("discriminator.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert "test_accuracy" in resumed.metrics
    saved = load_classifier(resumed.output_dir)  # the student alone, loadable as a teacher
    assert sum(p.numel() for p in saved.parameters()) == sum(p.numel() for p in step0.student.parameters())


def test_sgd_from_the_recipe_accelerates_along_a_constant_gradient(tmp_path, teachers, kd_recipe):
    """Heavy ball: with a constant gradient the second step is (1 + momentum) times the first."""
    r = kd_recipe(tmp_path, "meal_v2", teachers, steps=1, channel_divisor=2)
    r.train.optimizer, r.train.momentum = "sgd", 0.5
    method = MealV2Method(r)
    model = method.build_model()
    opt = _optimizer(r.train, method.parameter_groups(model))
    params = [p for group in opt.param_groups for p in group["params"]]
    positions = [torch.cat([p.detach().flatten() for p in params])]
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        positions.append(torch.cat([p.detach().flatten() for p in params]))
    first, second = positions[0] - positions[1], positions[1] - positions[2]
    assert (first > 0).all()
    torch.testing.assert_close(second, 1.5 * first)
