"""Image folders and the dataset registry."""

import numpy as np
import pytest
import torch
from PIL import Image

from genforge.data import ImageFolderDataset, build_dataset, dataset_names, register_dataset


def _write_png(path, rgb, size=(12, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), rgb, dtype=np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    # class folder names sorted: "cat" -> 0, "dog" -> 1, "zebra" -> 2
    _write_png(tmp_path / "zebra" / "a.png", (255, 0, 0))
    _write_png(tmp_path / "cat" / "a.png", (0, 0, 0))
    _write_png(tmp_path / "cat" / "b.png", (255, 255, 255))
    _write_png(tmp_path / "dog" / "x.png", (0, 255, 0), size=(20, 10))
    return tmp_path


def test_class_folders_sorted_give_labels_and_pixels_map_to_minus_one_one(folder):
    ds = ImageFolderDataset(folder, image_size=8)
    assert ds.classes == ["cat", "dog", "zebra"] and ds.num_classes == 3
    items = [ds[i] for i in range(len(ds))]
    assert [label for _, label in items] == [0, 0, 1, 2]
    black, white, green, red = (image for image, _ in items)
    assert torch.all(black == -1) and torch.all(white == 1)
    assert torch.all(green[1] == 1) and torch.all(green[0] == -1) and torch.all(green[2] == -1)
    assert torch.all(red[0] == 1) and torch.all(red[1:] == -1)
    assert all(image.shape == (3, 8, 8) and image.dtype == torch.float32 for image, _ in items)


def test_non_square_images_are_resized_then_center_cropped(tmp_path):
    array = np.zeros((10, 30), dtype=np.uint8)
    array[:, 10:20] = 255  # only the middle third is white
    (tmp_path / "only").mkdir()
    Image.fromarray(array).save(tmp_path / "only" / "img.png")
    image, _ = ImageFolderDataset(tmp_path, image_size=10, channels=1)[0]
    assert image.shape == (1, 10, 10)
    assert image[0, :, 2:8].min() > 0.9  # the crop keeps the white center


def test_grey_option_gives_one_channel(folder):
    ds = build_dataset("image_folder", root=str(folder), image_size=6, channels=1)
    assert ds[0][0].shape == (1, 6, 6) and ds.channels == 1 and ds.image_size == 6


def test_missing_root_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(missing, image_size=8)


def test_root_without_images_is_named(tmp_path):
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ImageFolderDataset(tmp_path, image_size=8)
    with pytest.raises(FileNotFoundError, match="no class subfolders"):
        ImageFolderDataset(tmp_path / "empty_class", image_size=8)


def test_unknown_dataset_error_lists_known_names():
    with pytest.raises(ValueError) as err:
        build_dataset("mnist")
    for name in ("digits", "image_folder", "cifar10", "cifar100"):
        assert name in str(err.value)


def test_registering_a_name_twice_is_an_error():
    assert "digits" in dataset_names()
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("digits", lambda **kw: None)


def test_builder_argument_errors_are_clear(folder):
    with pytest.raises(ValueError, match="needs root"):
        build_dataset("cifar10")
    with pytest.raises(ValueError, match="needs image_size"):
        build_dataset("image_folder", root=str(folder))
    with pytest.raises(ValueError, match="takes no root"):
        build_dataset("digits", root=str(folder))
    with pytest.raises(ValueError, match="resize='stretch'"):
        build_dataset("digits", resize="stretch")
