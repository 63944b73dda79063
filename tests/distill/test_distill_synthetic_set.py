"""The synthetic set object: save/load, merge, grid, initialisation, input checks."""

import pytest
import torch
from PIL import Image

from genforge.distill import Normalisation, RealData, SyntheticSet, distill_dataset
from genforge.distill.synthetic import initial_images
from genforge.distill.zca import ZCA


def _set(with_extras=True):
    torch.manual_seed(0)
    images = torch.randn(6, 1, 8, 8)
    return SyntheticSet(images=images, labels=torch.tensor([0, 0, 1, 1, 2, 2]), method="dwa", ipc=2, seed=3,
                        normalisation=Normalisation((0.3,), (0.4,)),
                        soft_labels=torch.softmax(torch.randn(6, 3), 1) if with_extras else None,
                        zca=ZCA.fit(torch.randn(40, 1, 8, 8)) if with_extras else None,
                        extra={"flip": True, "options": {"rho": 0.015}})


def test_a_saved_synthetic_set_reloads_identically(tmp_path):
    syn = _set()
    syn.save(tmp_path / "set.safetensors")
    back = SyntheticSet.load(tmp_path / "set.safetensors")
    assert torch.equal(back.images, syn.images) and torch.equal(back.labels, syn.labels)
    assert torch.equal(back.soft_labels, syn.soft_labels)
    assert (back.method, back.ipc, back.seed, back.normalisation, back.extra) == \
        (syn.method, syn.ipc, syn.seed, syn.normalisation, syn.extra)
    torch.testing.assert_close(back.pixels(), syn.pixels())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.safetensors"]  # no temporary file left


def test_pixels_undo_zca_and_standardisation():
    syn = _set()
    x01 = torch.rand(6, 1, 8, 8)
    syn.images = syn.zca(syn.normalisation(x01))
    torch.testing.assert_close(syn.pixels(), x01, atol=1e-4, rtol=1e-4)


def test_a_file_that_is_not_a_synthetic_set_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"images": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a genforge synthetic set"):
        SyntheticSet.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        SyntheticSet.load(tmp_path / "missing.safetensors")


def test_the_grid_has_one_row_per_class(tmp_path):
    syn = _set(with_extras=False)
    syn.save_grid(tmp_path / "grid.png", upscale=1)
    width, height = Image.open(tmp_path / "grid.png").size
    assert (width, height) == (2 + 2 * (8 + 2), 2 + 3 * (8 + 2))  # ipc columns x classes rows


def test_merging_shards_restores_class_order():
    syn = _set(with_extras=False)
    parts = [SyntheticSet(images=syn.images[idx], labels=syn.labels[idx], method="dwa", ipc=2, seed=3,
                          normalisation=syn.normalisation) for idx in ([2, 3], [0, 1, 4, 5])]
    merged = SyntheticSet.merge(parts)
    assert torch.equal(merged.labels, syn.labels) and torch.equal(merged.images, syn.images)
    with pytest.raises(ValueError, match="different runs"):
        SyntheticSet.merge([parts[0], SyntheticSet(images=syn.images[:1], labels=syn.labels[:1], method="dm",
                                                   ipc=2, seed=3, normalisation=syn.normalisation)])


def test_real_initialisation_takes_distinct_images_of_each_class(digits):
    real, _ = digits
    images, labels = initial_images(real, [0, 1], 3, "real", seed=0)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    for c in (0, 1):
        pool = real.images[real.indices_by_class[c]].flatten(1)
        chosen = images[labels == c].flatten(1)
        matches = [(pool == row).all(1).nonzero().flatten().tolist() for row in chosen]
        assert all(m for m in matches) and len({m[0] for m in matches}) == 3


def test_bad_input_is_refused_before_any_work(digits):
    real, _ = digits
    smallest = min(real.class_count(c) for c in range(10))
    with pytest.raises(ValueError, match=f"ipc={smallest + 1} is larger"):
        distill_dataset("dm", real, ipc=smallest + 1, progress=False)
    with pytest.raises(ValueError, match="unknown distillation method 'datadm'"):
        distill_dataset("datadm", real, ipc=1)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rhoo'\]"):
        distill_dataset("dwa", real, ipc=1, rhoo=0.1)
    with pytest.raises(ValueError, match="flip"):
        distill_dataset("random", real, ipc=1, flip=True)
    with pytest.raises(ValueError, match=r"must be \(N, C, H, W\)"):
        RealData(torch.rand(10, 8, 8), torch.zeros(10, dtype=torch.long), 1)
    odd = RealData(torch.rand(20, 1, 6, 6), torch.arange(20) % 2, 2)
    with pytest.raises(ValueError, match="not divisible"):
        distill_dataset("dm", odd, ipc=1, net_depth=2, iterations=1, progress=False)
