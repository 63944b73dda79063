"""The real data of distillation: train statistics, test sets, image folders (ImageNet layout)."""

import numpy as np
import torch
from PIL import Image

from genforge.distill import SyntheticSet, distill_dataset, load_real


def _folder(root, colours):
    for name, rgb in colours.items():
        for i in range(3):
            (root / name).mkdir(parents=True, exist_ok=True)
            pixels = np.clip(np.array(rgb) + 20 * i, 0, 255).astype(np.uint8)
            Image.fromarray(np.broadcast_to(pixels, (8, 8, 3)).copy()).save(root / name / f"{i}.png")


def test_train_split_is_standardised_and_test_uses_train_statistics(digits):
    real, test = digits
    torch.testing.assert_close(real.images.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(real.images.std(), torch.tensor(1.0), atol=1e-3, rtol=0)
    assert test.normalisation == real.normalisation
    assert torch.equal(real.to_pixels(real.images).clamp(0, 1), real.to_pixels(real.images))


def test_an_image_folder_with_a_separate_test_folder_distils(tmp_path):
    colours = {"blue": (0, 0, 200), "green": (0, 200, 0)}
    _folder(tmp_path / "train", colours)
    _folder(tmp_path / "val", colours)
    real, test = load_real("image_folder", root=str(tmp_path / "train"), test_root=str(tmp_path / "val"),
                           image_size=8)
    assert real.num_classes == 2 and real.image_shape == (3, 8, 8) and len(test.labels) == 6
    syn = distill_dataset("dm", real, ipc=2, iterations=2, net_width=4, net_depth=2, batch_real=3, progress=False)
    assert syn.images.shape == (4, 3, 8, 8) and syn.labels.tolist() == [0, 0, 1, 1]


def test_zca_data_round_trips_to_pixels(tmp_path):
    real, test = load_real("digits", zca=True)
    assert real.zca is not None and test.zca is real.zca
    syn = distill_dataset("random", real, ipc=1, seed=0)
    path = tmp_path / "zca.safetensors"
    syn.save(path)
    back = SyntheticSet.load(path)
    pixels = back.pixels()
    original = real.to_pixels(real.images)
    assert any(torch.allclose(pixels[0], img, atol=1e-3) for img in original[real.labels == 0])
