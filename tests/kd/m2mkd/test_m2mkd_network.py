"""m2mKD's pieces (Lo et al., arXiv 2402.16918): splitting, the hybrid forward, stitches, the loss, the MoE student."""

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from genforge.kd.m2mkd import (
    MetaModel,
    ModularStudent,
    MoEMlp,
    hybrid_forward,
    m2mkd_loss,
    m2mkd_pair_loss,
    split_vit,
    student_module,
)
from genforge.kd.teachers import freeze

VIT = {"img_size": 32, "patch_size": 8, "num_heads": 2, "num_classes": 10}
STUDENT = dict(
    depths=[1, 1, 1], meta_dim=32, embed_dim=16, num_experts=3, top_k=2, **VIT
)


def _setup():
    torch.manual_seed(0)
    teacher = VisionTransformer(embed_dim=32, depth=3, **VIT)
    teacher_modules = freeze(split_vit(teacher, [1, 1, 1]))
    meta = freeze(MetaModel(3, embed_dim=32, **VIT))
    images = torch.randn(8, 3, 32, 32)
    labels = torch.randint(0, 10, (8,))
    return teacher, teacher_modules, meta, images, labels


def test_split_teacher_reproduces_the_whole_vit():
    teacher, modules, _, images, _ = _setup()
    x = images
    for m in modules:
        x = m(x)
    torch.testing.assert_close(x, teacher(images))


@pytest.mark.parametrize("index", [0, 1, -1])
def test_only_student_module_trains_meta_and_teacher_unchanged(index):
    _, teacher_modules, meta, images, labels = _setup()
    student = student_module(index, **STUDENT)
    frozen_before = {
        k: v.clone()
        for k, v in {
            **meta.state_dict(prefix="meta."),
            **teacher_modules.state_dict(prefix="t."),
        }.items()
    }
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    opt = torch.optim.AdamW(student.parameters(), lr=5e-4)
    loss = m2mkd_pair_loss(
        meta.stages, teacher_modules[index], student, index, images, labels
    )
    loss.backward()
    assert all(
        p.grad is None
        for p in list(meta.parameters()) + list(teacher_modules.parameters())
    )
    stitches = [m for m in (student.pre_stitch, student.post_stitch) if m is not None]
    assert len(stitches) == (1 if index in (0, -1) else 2)
    for p in [p for m in stitches for p in m.parameters()] + list(
        student.module.blocks[0].attn.parameters()
    ):
        assert p.grad is not None and p.grad.abs().sum() > 0
    opt.step()
    after = {
        **meta.state_dict(prefix="meta."),
        **teacher_modules.state_dict(prefix="t."),
    }
    for k, v in frozen_before.items():
        assert torch.equal(v, after[k]), k
    assert any(
        not torch.equal(v, student.state_dict()[k]) for k, v in student_before.items()
    )


def test_alpha_zero_is_cross_entropy_and_kl_matches_reference():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    torch.testing.assert_close(m2mkd_loss(s, t, y, alpha=0.0), F.cross_entropy(s, y))
    tau = 2.0
    p_t = (t / tau).softmax(-1)
    kl = (p_t * (p_t.log() - (s / tau).log_softmax(-1))).sum() * tau**2 / s.numel()
    torch.testing.assert_close(
        m2mkd_loss(s, t, y, alpha=0.5, tau=tau), 0.5 * F.cross_entropy(s, y) + 0.5 * kl
    )
    torch.testing.assert_close(
        m2mkd_loss(s, t, y, alpha=0.0, distillation_type="hard"), F.cross_entropy(s, y)
    )


def test_alpha_one_with_student_identical_to_teacher_is_zero():
    _, teacher_modules, meta, images, labels = _setup()
    same = copy.deepcopy(teacher_modules[1])
    loss = m2mkd_pair_loss(
        meta.stages, teacher_modules[1], same, 1, images, labels, alpha=1.0
    )
    assert abs(loss.item()) < 1e-6


@pytest.mark.parametrize("index", [0, 1, -1])
def test_hybrid_with_meta_stage_as_teacher_equals_meta_model(index):
    _, _, meta, images, _ = _setup()
    torch.testing.assert_close(
        hybrid_forward(meta.stages, index, meta.stages[index], images), meta(images)
    )


def test_stitches_are_layernorm_then_linear_like_official_vmoe():
    """Both stitches compute fc(LN(x)), with the official vmoe.py key names (ln, fc)."""
    torch.manual_seed(0)
    middle = student_module(1, **STUDENT)
    with torch.no_grad():  # non-trivial LN affine, so a missing or misplaced LN shows
        for p in middle.parameters():
            p.add_(0.3 * torch.randn_like(p))
    for stitch, in_dim in ((middle.pre_stitch, 32), (middle.post_stitch, 16)):
        x = 3.0 * torch.randn(2, 17, in_dim) + 1.0
        ln, fc = stitch.ln, stitch.fc
        expected = F.linear(
            F.layer_norm(x, (in_dim,), ln.weight, ln.bias, ln.eps), fc.weight, fc.bias
        )
        torch.testing.assert_close(stitch(x), expected)
    keys = {
        k for k in middle.state_dict() if k.startswith(("pre_stitch", "post_stitch"))
    }
    assert keys == {
        f"{where}_stitch.{layer}.{p}"
        for where in ("pre", "post")
        for layer in ("ln", "fc")
        for p in ("weight", "bias")
    }
    assert student_module(0, **STUDENT).pre_stitch is None
    assert student_module(-1, **STUDENT).post_stitch is None


def test_post_stitch_output_ignores_per_token_scale_and_shift_of_the_module_output():
    """The post-stitch normalises each token first (a bare Linear would not be invariant)."""
    torch.manual_seed(0)
    post = student_module(1, **STUDENT).post_stitch
    x = torch.randn(2, 17, 16)
    scale = torch.rand(2, 17, 1) * 5 + 0.5
    shift = torch.randn(2, 17, 1) * 4
    torch.testing.assert_close(
        post(scale * x + shift), post(x), atol=1e-4, rtol=1e-4
    )


def test_index_zero_takes_images_and_last_returns_logits():
    _, teacher_modules, meta, images, _ = _setup()
    first, last = student_module(0, **STUDENT), student_module(-1, **STUDENT)
    tokens = first(images)
    assert tokens.shape == (8, 17, 32)
    assert last(tokens).shape == (8, 10)
    assert hybrid_forward(meta.stages, -1, teacher_modules[-1], images).shape == (8, 10)
    with pytest.raises(ValueError, match="out of range"):
        hybrid_forward(meta.stages, 3, teacher_modules[-1], images)


def test_moe_routes_each_token_to_its_gated_experts():
    torch.manual_seed(0)
    moe = MoEMlp(8, 16, num_experts=3, top_k=1)
    x = torch.randn(2, 5, 8)
    chosen = moe.gate(x).argmax(-1)
    expected = torch.stack(
        [
            torch.stack([moe.experts[int(chosen[b, t])](x[b, t]) for t in range(5)])
            for b in range(2)
        ]
    )
    torch.testing.assert_close(moe(x), expected)


def test_trained_modules_load_strictly_and_end_to_end_training_lowers_loss():
    _, teacher_modules, meta, images, labels = _setup()
    trained = []
    for index in (0, 1, -1):
        student = student_module(index, **STUDENT)
        opt = torch.optim.AdamW(student.parameters(), lr=5e-4)
        m2mkd_pair_loss(
            meta.stages, teacher_modules[index], student, index, images, labels
        ).backward()
        opt.step()
        trained.append(student.state_dict())
    full = ModularStudent(**STUDENT)
    full.load_modules(trained)
    for stage, sd in zip(full.stages, trained):
        for k, v in stage.state_dict().items():
            assert torch.equal(v, sd[k])
    broken = dict(trained[1])
    broken.pop("post_stitch.fc.weight")
    with pytest.raises(RuntimeError, match="Missing key"):
        full.load_modules([trained[0], broken, trained[2]])
    ModularStudent(keep_stitches=False, **STUDENT).load_modules(trained)

    opt = torch.optim.AdamW(full.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        loss = F.cross_entropy(full(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
