"""The online distillation methods ``kd`` and ``meal_v2`` in the training loop, and teacher loading."""

import pytest
import timm
import torch
import torch.nn.functional as F

from genforge.config import ConfigError, recipe_from_dict
from genforge.kd.meal_v2 import meal_v2_loss
from genforge.kd.teachers import TeacherError, load_classifier
from genforge.methods.kd import KDMethod, MealV2Method
from genforge.train import train
from genforge.train.loop import _lr_factor


def recipe(tmp_path, method, teachers, steps=2, **model):
    return recipe_from_dict({
        "method": method, "seed": 0, "output_dir": str(tmp_path / "run"),
        "data": {"name": "digits", "image_size": 16, "batch_size": 16},
        "model": {"name": "test_efficientnet", "teachers": [str(t) for t in teachers], **model},
        "train": {"max_steps": steps, "lr": 1e-3, "checkpoint_every": 100, "log_every": 100, "ema_decay": 0.0},
        "eval": {"batch_size": 360}})


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, classifier_run):
    root = tmp_path_factory.mktemp("teachers")
    return [classifier_run(root / "a", "test_efficientnet", seed=1),
            classifier_run(root / "b", "test_resnet", seed=2)]


def batch_of(method, size=8):
    images = torch.stack([method.train_set[i][0] for i in range(size)])
    labels = torch.tensor([method.train_set[i][1] for i in range(size)])
    return images, labels


def test_teacher_round_trip_is_frozen_and_exact(teachers):
    model = load_classifier(teachers[0], num_classes=10, in_chans=1)
    again = timm.create_model("test_efficientnet", num_classes=10, in_chans=1)
    again.load_state_dict(dict(model.state_dict()))
    x = torch.randn(4, 1, 16, 16)
    again.eval()
    assert torch.equal(model(x), again(x))
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_teacher_with_other_class_count_is_refused_before_training(tmp_path, teachers, classifier_run):
    five = classifier_run(tmp_path / "five", num_classes=5)
    with pytest.raises(TeacherError, match="predicts 5 classes but 10"):
        load_classifier(five, num_classes=10)
    method = MealV2Method(recipe(tmp_path, "meal_v2", [teachers[0], five], channel_divisor=2))
    with pytest.raises(ConfigError, match="predicts 5 classes"):
        method.build_model()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_teacher_entries_are_config_errors(tmp_path, teachers):
    with pytest.raises(ConfigError, match="model.teachers must be a non-empty list"):
        recipe(tmp_path, "kd", [])
    with pytest.raises(ConfigError, match=r"teachers\[1\].*not a classifier run directory"):
        recipe(tmp_path, "kd", [teachers[0], tmp_path / "nowhere"])
    with pytest.raises(ConfigError, match="model.alpha"):
        recipe(tmp_path, "kd", teachers, alpha=1.5)
    with pytest.raises(ConfigError, match="model.update"):
        recipe(tmp_path, "meal_v2", teachers, update="gan")
    with pytest.raises(ConfigError, match="never reads labels"):
        recipe(tmp_path, "meal_v2", teachers, label_smoothing=0.1)


def test_kd_step_equals_hinton_loss_with_the_ensemble_mean(tmp_path, teachers):
    method = KDMethod(recipe(tmp_path, "kd", teachers, alpha=0.7, temperature=3.0))
    student = method.build_model()
    images, labels = batch_of(method)
    loss, _ = method.training_step(student, (images, labels))
    t = 3.0
    members = [load_classifier(s, num_classes=10) for s in teachers]
    p_t = torch.stack([F.softmax(m(images) / t, dim=-1) for m in members]).mean(0)
    z = student(images)
    naive = 0.3 * F.cross_entropy(z, labels) + 0.7 * t * t * (
        p_t * (p_t.log() - F.log_softmax(z / t, dim=-1))).sum(-1).mean()
    assert loss.item() == pytest.approx(naive.item(), rel=1e-5)


def test_meal_v2_loss_never_reads_labels(tmp_path, teachers):
    method = MealV2Method(recipe(tmp_path, "meal_v2", teachers, channel_divisor=2))
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


def test_meal_v2_groups_have_no_weight_decay_and_their_own_lr(tmp_path, teachers):
    for follow, d_lr in ((False, 1e-4), (True, 1e-3)):
        method = MealV2Method(recipe(tmp_path, "meal_v2", teachers, channel_divisor=2, follow_student_lr=follow))
        groups = method.parameter_groups(method.build_model())
        assert [g["name"] for g in groups] == ["student", "discriminator"]
        assert [g["weight_decay"] for g in groups] == [0.0, 0.0]
        assert groups[1]["lr"] == pytest.approx(d_lr)


def test_adversarial_update_reverses_only_the_discriminator_gradient():
    torch.manual_seed(0)
    from genforge.kd.meal_v2 import MealV2Discriminator
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


def test_meal_v2_trains_from_the_pretrained_student_and_resumes_with_its_discriminator(tmp_path, teachers,
                                                                                         classifier_run):
    start = classifier_run(tmp_path / "student", "test_efficientnet", seed=5)
    weights = str(start / "model.safetensors")
    base = dict(channel_divisor=2, pretrained_file=weights)
    step0 = MealV2Method(recipe(tmp_path, "meal_v2", teachers, **base)).build_model()
    reference = load_classifier(start, num_classes=10).state_dict()
    for key, value in step0.student.state_dict().items():
        assert torch.equal(value, reference[key]), key

    full = train(recipe(tmp_path / "full", "meal_v2", teachers, steps=4, **base))
    train(recipe(tmp_path / "cut", "meal_v2", teachers, steps=2, **base))
    resumed = train(recipe(tmp_path / "cut", "meal_v2", teachers, steps=4, **base), resume=True)
    assert resumed.resumed_from == 2
    a = load_state(full.output_dir / "model" / "model.safetensors")
    b = load_state(resumed.output_dir / "model" / "model.safetensors")
    assert any(k.startswith("discriminator.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert "test_accuracy" in resumed.metrics
    saved = load_classifier(resumed.output_dir)  # the student alone, loadable as a teacher
    assert sum(p.numel() for p in saved.parameters()) == sum(p.numel() for p in step0.student.parameters())


def load_state(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def test_kd_student_learns_digits_from_a_trained_teacher(tmp_path):
    teacher_recipe = recipe_from_dict({
        "method": "classifier", "seed": 0, "output_dir": str(tmp_path / "teacher"),
        "data": {"name": "digits", "image_size": 16, "batch_size": 64},
        "model": {"name": "test_resnet"},
        "train": {"max_steps": 60, "lr": 3e-3, "checkpoint_every": 100, "log_every": 100, "ema_decay": 0.0},
        "eval": {"batch_size": 360}})
    assert train(teacher_recipe).metrics["test_accuracy"] > 0.8
    result = train(recipe(tmp_path / "kd", "kd", [tmp_path / "teacher"], steps=60, alpha=1.0, temperature=2.0,
                          kwargs={}))
    assert result.metrics["test_accuracy"] > 0.6  # alpha = 1: it learns from the teacher alone


def test_lr_factor_warms_up_then_steps_down_at_each_milestone():
    factor = _lr_factor(2, milestones=[5, 8], gamma=0.1)
    values = [factor(s) for s in range(10)]
    assert values[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert values[4] == 1.0 and values[5] == pytest.approx(0.1) and values[8] == pytest.approx(0.01)


def test_sgd_from_the_recipe_accelerates_along_a_constant_gradient(tmp_path, teachers):
    """Heavy ball: with a constant gradient the second step is (1 + momentum) times the first."""
    from genforge.train.loop import _optimizer
    r = recipe(tmp_path, "meal_v2", teachers, steps=1, channel_divisor=2)
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


def test_python_api_runs_the_recipe_and_rejects_bad_input(tmp_path, teachers):
    import genforge.kd
    result = genforge.kd.distill(teachers=teachers, student="test_efficientnet", method="meal_v2",
                                 steps=2, batch_size=16, output_dir=tmp_path / "api", channel_divisor=2,
                                 train_options={"optimizer": "sgd", "lr": 0.01, "log_every": 1})
    assert result.steps == 2 and "test_accuracy" in result.metrics
    assert (tmp_path / "api" / "recipe.yaml").is_file() and (tmp_path / "api" / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="did you mean 'temperature'"):
        genforge.kd.distill(teachers=teachers, student="test_efficientnet", method="kd", tempreature=2.0,
                            output_dir=tmp_path / "bad")
