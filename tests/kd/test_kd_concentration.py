import math

import pytest
import torch
from torch import nn

from genforge.kd.concentration import (
    ConcentrationHead,
    SelfPacedScale,
    StructurallyConnected,
    Verticals,
    concentration_loss,
    concentration_targets,
)

SIZES = (3, 4, 5)


def _verticals():
    # non-contiguous groups, so class-id order differs from vertical order
    return Verticals([[0, 5, 9], [1, 2, 10, 11], [3, 4, 6, 7, 8]])


def test_verticals_reject_overlap_and_gaps():
    with pytest.raises(ValueError, match="disjoint"):
        Verticals([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="cover"):
        Verticals([[0, 1], [3]])


def test_target_zero_outside_vertical_and_outside_top_k():
    torch.manual_seed(0)
    vert = _verticals()
    labels = torch.tensor([0, 2, 7, 11, 4])
    probs = [torch.rand(5, n) for n in vert.sizes]
    z = concentration_targets(probs, labels, vert, top_k=2)
    for b, y in enumerate(labels.tolist()):
        v = int(vert.vertical_of[y])
        outside = [c for c in range(vert.num_classes) if c not in vert.groups[v]]
        assert torch.all(z[b, outside] == 0)
        row = probs[v][b]
        top = set(row.topk(2).indices.tolist())
        for j, c in enumerate(vert.groups[v]):
            expected = row[j] if j in top else torch.tensor(0.0)
            torch.testing.assert_close(z[b, c], expected)
        assert int((z[b] > 0).sum()) == 2


def test_teacher_is_chosen_by_label_vertical():
    vert = _verticals()
    labels = torch.tensor([5, 10, 8])  # verticals 0, 1, 2
    # teacher v predicts the constant 0.1 * (v + 1): the kept values name the teacher
    probs = [torch.full((3, n), 0.1 * (v + 1)) for v, n in enumerate(vert.sizes)]
    z = concentration_targets(probs, labels, vert, top_k=100)
    for b, v in enumerate([0, 1, 2]):
        torch.testing.assert_close(
            z[b, vert.groups[v]], torch.full((vert.sizes[v],), 0.1 * (v + 1))
        )
        assert int((z[b] > 0).sum()) == vert.sizes[v]


def test_head_weight_count_is_the_papers_formula_for_layout_b():
    vert = _verticals()
    s_b, s1, s2 = 20, 16, 8
    head = ConcentrationHead(s_b, s1, s2, vert)
    weights = (
        head.fc.weight.numel()
        + sum(w.numel() for w in head.sc.weights)
        + sum(w.numel() for w in head.classifier.weights)
    )
    # (b) FC(s1)-SC(s2): s_b*s1 + s1*s2*M + s2*N, with M = 3 verticals and N = 12 classes
    assert weights == s_b * s1 + s1 * s2 * 3 + s2 * 12


def test_sc_blocks_are_independent():
    torch.manual_seed(0)
    vert = _verticals()
    head = ConcentrationHead(10, 16, 8, vert)
    logits = head(torch.randn(4, 10))
    for u in range(3):
        grads = torch.autograd.grad(
            logits[:, vert.groups[u]].sum(),
            list(head.sc.weights) + list(head.classifier.weights),
            retain_graph=True,
            allow_unused=True,
        )
        sc_grads, cls_grads = grads[:3], grads[3:]
        for v in range(3):
            for g in (sc_grads[v], cls_grads[v]):
                if v == u:
                    assert g is not None and g.abs().sum() > 0
                else:
                    assert g is None or torch.all(g == 0)


def test_block_diagonal_weight_has_exact_zeros_across_blocks():
    layer = StructurallyConnected([2, 3], [4, 1])
    w = layer.weight()
    assert w.shape == (5, 5)
    assert torch.all(w[:4, 2:] == 0) and torch.all(w[4:, :2] == 0)


def test_gamma_starts_at_sqrt_size_is_trainable_and_sets_vertical_norm():
    torch.manual_seed(0)
    scale = SelfPacedScale(SIZES)
    torch.testing.assert_close(
        scale.gamma.detach(), torch.tensor([math.sqrt(n) for n in SIZES])
    )
    assert scale.gamma.requires_grad
    with torch.no_grad():
        scale.gamma.mul_(torch.tensor([0.5, 2.0, 3.0]))
    y = scale(torch.randn(6, sum(SIZES)))
    for part, g in zip(torch.split(y, SIZES, dim=-1), scale.gamma):
        torch.testing.assert_close(part.norm(dim=-1), g.detach().expand(6))
    y.pow(2).sum().backward()
    assert scale.gamma.grad is not None and scale.gamma.grad.abs().sum() > 0


def test_tiny_concentration_training_lowers_loss():
    torch.manual_seed(0)
    vert = Verticals.from_sizes(SIZES)
    x = torch.randn(32, 3, 8, 8)
    labels = torch.randint(0, vert.num_classes, (32,))
    # one tiny MLP specialist per vertical, outputs sigmoid probabilities over its classes
    teachers = [
        nn.Sequential(
            nn.Flatten(), nn.Linear(192, 16), nn.ReLU(), nn.Linear(16, n)
        ).eval()
        for n in SIZES
    ]
    with torch.no_grad():
        z = concentration_targets(
            [t(x).sigmoid() for t in teachers], labels, vert, top_k=2
        )
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    student = nn.Sequential(backbone, ConcentrationHead(8, 16, 8, vert))
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = concentration_loss(student(x), z)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
