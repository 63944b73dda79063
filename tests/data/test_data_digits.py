"""The bundled digits: a fixed stratified split, exact pixels under padding, [-1, 1] range."""

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from genforge.data import DigitsDataset, build_dataset
from genforge.data.digits import SPLIT_FILE


@pytest.fixture(scope="module")
def raw():
    bunch = load_digits()
    return bunch.images, bunch.target


def test_stored_split_is_the_documented_sklearn_split(raw):
    _, y = raw
    train, test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    spec = json.loads(SPLIT_FILE.read_text())
    assert spec["train"] == sorted(train.tolist())
    assert spec["test"] == sorted(test.tolist())


def test_split_is_disjoint_and_covers_all_1797_digits():
    train, test = DigitsDataset("train"), DigitsDataset("test")
    a, b = set(train.indices.tolist()), set(test.indices.tolist())
    assert not a & b
    assert a | b == set(range(1797))
    assert (len(train), len(test)) == (1437, 360)


def test_split_is_stratified_each_class_about_20_percent_in_test(raw):
    _, y = raw
    test_counts = torch.bincount(DigitsDataset("test").labels, minlength=10).numpy()
    share = test_counts / np.bincount(y, minlength=10)
    assert np.all(np.abs(share - 0.2) < 0.01), share


def test_loading_twice_gives_identical_data():
    a, b = DigitsDataset("test", image_size=16), DigitsDataset("test", image_size=16)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_labels_and_pixels_match_sklearn(raw):
    images, y = raw
    d = DigitsDataset("train")
    idx = d.indices.numpy()
    assert torch.equal(d.labels, torch.from_numpy(y[idx]))
    expected = torch.from_numpy(images[idx]).float() / 8 - 1
    assert torch.allclose(d.images[:, 0], expected)


def test_pad_keeps_original_pixels_at_the_center_and_background_is_minus_one():
    small, big = DigitsDataset("test", image_size=8), DigitsDataset("test", image_size=16)
    assert torch.equal(big.images[:, :, 4:12, 4:12], small.images)
    border = big.images.clone()
    border[:, :, 4:12, 4:12] = -1.0
    assert torch.all(border == -1.0)


def test_odd_padding_puts_the_extra_row_bottom_right():
    small, big = DigitsDataset("test", image_size=8), DigitsDataset("test", image_size=11)
    assert torch.equal(big.images[:, :, 1:9, 1:9], small.images)


def test_values_lie_in_minus_one_one_and_span_it():
    for resize in ("pad", "resize"):
        x = DigitsDataset("train", image_size=16, resize=resize).images
        assert x.dtype == torch.float32
        assert x.min() == -1.0 and x.max() == 1.0


def test_resize_fills_the_frame_and_keeps_the_mean_intensity():
    pad, res = DigitsDataset("test", 16, "pad"), DigitsDataset("test", 16, "resize")
    native = DigitsDataset("test", 8)
    # resized digits reach the outer ring that padding leaves empty
    assert (res.images[:, :, :4] > -1).any() and torch.all(pad.images[:, :, :4] == -1)
    assert torch.allclose(res.images.mean(dim=(2, 3)), native.images.mean(dim=(2, 3)), atol=0.05)


def test_items_are_float_image_and_int_label_with_attributes():
    d = build_dataset("digits", split="test", image_size=16, channels=3)
    image, label = d[5]
    assert isinstance(label, int) and label == int(d.labels[5])
    assert torch.equal(image[0], image[2]) and image.shape == (3, 16, 16)
    assert (d.num_classes, d.channels, d.image_size) == (10, 3, 16)


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="val"), "split='val'"),
    (dict(image_size=6), "image_size=6"),
    (dict(resize="crop"), "resize='crop'"),
])
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataset(**kwargs)


def test_resize_mode_allows_sizes_below_8():
    assert DigitsDataset("test", image_size=4, resize="resize").images.shape[-1] == 4
