"""FYI, Flip Your Images (spec: "Properties to test / FYI")."""

import torch

from genforge.distill.dm import dm_objective
from genforge.distill.fyi import flip_concat
from genforge.distill.matching import MatchingOptions, distill_by_matching
from genforge.distill.networks import build_convnet


def test_flip_concat_appends_the_mirror_and_duplicates_labels():
    x = torch.randn(3, 1, 4, 5)
    y = torch.tensor([0, 1, 2])
    doubled, labels = flip_concat(x, y)
    assert doubled.shape == (6, 1, 4, 5)
    torch.testing.assert_close(doubled[:3], x)
    torch.testing.assert_close(doubled[3:], x.flip(-1))
    assert labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert flip_concat(doubled)[0].shape[0] == 12  # not idempotent: the set doubles again


def test_dm_loss_with_fyi_is_invariant_to_flipping_the_whole_set():
    g = torch.Generator().manual_seed(0)
    real = [torch.randn(6, 1, 8, 8, generator=g) for _ in range(2)]
    syn = [torch.randn(2, 1, 8, 8, generator=g) for _ in range(2)]
    net = build_convnet(1, 2, 8, width=8, depth=2, seed=0)
    loss = dm_objective(net, real, [flip_concat(s)[0] for s in syn])[0]
    flipped = dm_objective(net, real, [flip_concat(s.flip(-1))[0] for s in syn])[0]
    torch.testing.assert_close(loss, flipped)


def test_fyi_gradient_is_the_gradient_plus_the_mirrored_gradient_of_the_mirror():
    torch.manual_seed(0)
    w = torch.randn(1, 2, 3)
    x = torch.randn(4, 1, 2, 3, requires_grad=True)

    def per_sample_loss(batch):  # separable over samples
        return ((batch * w).sum(dim=(1, 2, 3)) ** 2).sum()

    (g_fyi,) = torch.autograd.grad(per_sample_loss(flip_concat(x)[0]), x)
    (g,) = torch.autograd.grad(per_sample_loss(x), x)
    xf = x.detach().flip(-1).requires_grad_(True)
    (g_of_flip,) = torch.autograd.grad(per_sample_loss(xf), xf)
    torch.testing.assert_close(g_fyi, g + g_of_flip.flip(-1))


def test_a_mirror_symmetric_image_gets_exactly_twice_the_weight():
    torch.manual_seed(0)
    half = torch.randn(1, 1, 4, 2)
    x = torch.cat([half, half.flip(-1)], dim=-1).requires_grad_(True)  # x == flip(x)
    w = torch.randn(1, 4, 4)

    def loss(batch):
        return ((batch * w).sum(dim=(1, 2, 3)) ** 2).mean() * len(batch)

    (g_fyi,) = torch.autograd.grad(loss(flip_concat(x)[0]), x)
    (g,) = torch.autograd.grad(loss(x), x)
    torch.testing.assert_close(g_fyi, g + g.flip(-1))
    torch.testing.assert_close(loss(flip_concat(x)[0]), 2 * loss(x))


def test_the_engine_feeds_the_objective_the_synthetic_set_and_its_mirror(digits):
    real, _ = digits
    seen = []

    def spy(net, real_batches, syn_batches):
        seen.append([s.detach().clone() for s in syn_batches])
        return sum(s.sum() for s in syn_batches) * 0, {}

    options = MatchingOptions(iterations=1, batch_real=4, dsa_strategy="none", net_width=8, net_depth=2)
    images, _ = distill_by_matching(real, spy, options, ipc=2, seed=0, flip=True, progress=False)
    for c, batch in enumerate(seen[0]):
        assert batch.shape[0] == 4
        torch.testing.assert_close(batch[:2], images[2 * c:2 * c + 2])
        torch.testing.assert_close(batch[2:], images[2 * c:2 * c + 2].flip(-1))
