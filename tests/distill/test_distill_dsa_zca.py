"""DSA augmentation and ZCA whitening (spec: "The field's standard protocol")."""

import pytest
import torch

from genforge.distill.dsa import DSA, FAMILIES
from genforge.distill.zca import ZCA


@pytest.mark.parametrize("family", FAMILIES)
def test_siamese_seed_gives_real_and_synthetic_batches_the_same_transform(family):
    torch.manual_seed(0)
    dsa = DSA(family)
    real, syn = torch.randn(5, 3, 8, 8), torch.randn(2, 3, 8, 8)
    both = dsa(torch.cat([real, syn]), seed=123)
    torch.testing.assert_close(dsa(real, seed=123), both[:5])
    torch.testing.assert_close(dsa(syn, seed=123), both[5:])


def test_without_a_seed_every_image_draws_its_own_parameters():
    x = torch.randn(1, 1, 8, 8).expand(16, 1, 8, 8).contiguous()
    out = DSA("scale_rotate", mode="M")(x, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(out[0], out[1])


def test_dsa_is_differentiable_in_the_pixels():
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    for family in FAMILIES:
        (g,) = torch.autograd.grad(DSA(family)(x, seed=1).sum(), x)
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_crop_translates_an_eight_pixel_image_by_at_most_one_pixel():
    x = torch.zeros(1, 1, 8, 8)
    x[..., 3, 4] = 1.0
    for seed in range(20):
        moved = DSA("crop")(x, seed=seed)
        (r, c), = torch.nonzero(moved[0, 0]).tolist()
        assert abs(r - 3) <= 1 and abs(c - 4) <= 1


def test_a_strategy_without_flip_never_mirrors_and_flip_does():
    x = torch.arange(64.0).view(1, 1, 8, 8)
    flipped = [torch.equal(DSA("flip")(x, seed=s), x.flip(-1)) for s in range(40)]
    assert any(flipped) and not all(flipped)


def test_unknown_families_and_modes_are_refused():
    with pytest.raises(ValueError, match="colour"):
        DSA("colour_crop")
    with pytest.raises(ValueError, match="mode"):
        DSA("crop", mode="X")


def test_zca_inverse_undoes_the_whitening_and_whitened_data_is_decorrelated():
    torch.manual_seed(0)
    mix = torch.randn(12, 12)
    x = (torch.randn(500, 12) @ mix).view(500, 3, 2, 2)
    zca = ZCA.fit(x, eps=1e-6)
    w = zca(x)
    torch.testing.assert_close(zca.inverse(w), x, atol=1e-3, rtol=1e-3)
    cov = torch.cov(w.view(500, -1).T)
    torch.testing.assert_close(cov, torch.eye(12), atol=2e-2, rtol=0)
    rebuilt = ZCA.from_state(zca.state())
    torch.testing.assert_close(rebuilt(x), w)
