"""BK-SDM's distillation losses (arXiv 2305.15798) and A-SDM's SAS and progressive incubation (ours)."""

import copy

import pytest
import torch
from diffusers import DDPMScheduler

from genforge.sd import feature_layers, prune
from genforge.sd.configs import UNET_CONFIGS
from genforge.sd.distill import Distiller, LossWeights, predicted_x0
from genforge.sd.incubation import hybrid, incubation_phase, stage_modules, train_only

SD_LIKE = UNET_CONFIGS["sd-like-tiny"]


def pooled_encoder(x):
    """A fixed 'semantic' encoder for the tests: 4x4 average pooling."""
    return torch.nn.functional.avg_pool2d(x, 4)


def noisy_batch(config, unet_inputs, scheduler=None):
    x0, t, c = unet_inputs(config)
    scheduler = scheduler or DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    return scheduler.add_noise(x0, noise, t), t, c, noise, scheduler


def test_kd_losses_are_zero_when_the_student_is_a_copy_of_the_teacher(teacher, unet_inputs):
    noisy, t, c, noise, scheduler = noisy_batch(SD_LIKE, unet_inputs)
    distiller = Distiller(copy.deepcopy(teacher), teacher, feature_layers(SD_LIKE, "bk-base"),
                          LossWeights(sas=1.0), pooled_encoder, scheduler.alphas_cumprod)
    terms = distiller.losses(noisy, t, c, noise)
    assert terms["out"] == 0 and terms["feat"] == 0 and terms["sas"].abs() < 1e-6
    assert terms["sd"] > 0
    torch.testing.assert_close(terms["total"], terms["sd"] + terms["sas"])


@pytest.mark.parametrize("plan", ["bk-base", "bk-small", "bk-tiny", "asdm"])
def test_pruned_students_get_a_feature_loss_on_every_matched_layer_and_the_teacher_no_gradient(
        teacher, unet_inputs, plan):
    student = prune(teacher, plan, {"gri_window": 4, "gri_pool": 2} if plan == "asdm" else None)
    noisy, t, c, noise, _ = noisy_batch(SD_LIKE, unet_inputs)
    layers = feature_layers(SD_LIKE, plan)
    distiller = Distiller(student, teacher, layers)
    terms = distiller.losses(noisy, t, c, noise)
    assert set(distiller.student_features.features) == {s for _, s in layers}
    for t_name, s_name in layers:
        assert distiller.student_features.features[s_name].shape == distiller.teacher_features.features[t_name].shape
    assert terms["feat"] > 0 and terms["out"] > 0
    terms["total"].backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_one_bk_kd_step_lowers_the_loss_on_a_fixed_batch(build_unet, unet_inputs):
    # The spec's smallest BK-SDM setting: diffusers' tiny UNet, student layers_per_block=1, batch 2, 32x32.
    config = UNET_CONFIGS["diffusers-tiny"]
    teacher = build_unet(config)
    student = prune(teacher, "bk-base")
    noisy, t, c, noise, _ = noisy_batch(config, unet_inputs)
    distiller = Distiller(student, teacher, feature_layers(config, "bk-base"))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    before = distiller.losses(noisy, t, c, noise)["total"]
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = distiller.losses(noisy, t, c, noise)["total"]
    assert after < before


def test_predicted_x0_inverts_the_forward_process(unet_inputs):
    x0, t, _ = unet_inputs(SD_LIKE)
    noisy, t, _, noise, scheduler = noisy_batch(SD_LIKE, unet_inputs)
    torch.testing.assert_close(predicted_x0(noisy, noise, t, scheduler.alphas_cumprod), x0, rtol=1e-4, atol=1e-4)


def test_hybrids_interpolate_between_teacher_and_student(teacher, unet_inputs):
    student = prune(teacher, "asdm", {"gri_window": 4, "gri_pool": 2})
    x, t, c = unet_inputs(SD_LIKE)
    with torch.no_grad():
        torch.testing.assert_close(hybrid(teacher, student, [])(x, t, c).sample, teacher(x, t, c).sample)
        # All stages swapped: the student (its stem, time embedding and head equal the teacher's at inheritance).
        torch.testing.assert_close(hybrid(teacher, student, [0, 1, 2])(x, t, c).sample, student(x, t, c).sample)
        middle = hybrid(teacher, student, [0])(x, t, c).sample
    assert not torch.allclose(middle, teacher(x, t, c).sample)
    assert hybrid(teacher, student, [2]).mid_block is None and teacher.mid_block is not None


def test_incubation_trains_only_the_stage_being_incubated(teacher, unet_inputs):
    student = prune(teacher, "bk-small")
    before_student = copy.deepcopy(student.state_dict())
    before_teacher = copy.deepcopy(teacher.state_dict())
    stage, stages = incubation_phase(step=5, order=[0, 1, 2], steps_per_stage=4)
    assert (stage, stages) == (1, [0, 1])
    optimizer = torch.optim.SGD(train_only(student, stage), lr=0.1)
    noisy, t, c, noise, _ = noisy_batch(SD_LIKE, unet_inputs)
    distiller = Distiller(student, teacher, feature_layers(SD_LIKE, "bk-small"))
    distiller.losses(noisy, t, c, noise, model=hybrid(teacher, student, stages))["total"].backward()
    optimizer.step()
    trained = {id(p) for m in stage_modules(student, stage) for p in m.parameters()}
    for name, p in student.named_parameters():
        assert torch.equal(p, before_student[name]) != (id(p) in trained), name
    assert all(torch.equal(v, before_teacher[k]) for k, v in teacher.state_dict().items())
    assert incubation_phase(step=12, order=[0, 1, 2], steps_per_stage=4) == (None, [0, 1, 2])
    assert len(train_only(student, None)) == len(list(student.parameters()))


def test_incubation_needs_the_teachers_stages(teacher):
    with pytest.raises(ValueError, match="keep the teacher's 3 stages"):
        hybrid(teacher, prune(teacher, "bk-tiny"), [0])
