"""The shipped digits CNN: accurate on held-out digits, a sharp judge of labels, reproducible."""

import json

import pytest
import torch

from genforge.data import DigitsDataset
from genforge.metrics import (
    DigitsCNN,
    classifier_agreement,
    digits_test_accuracy,
    load_digits_classifier,
    per_class_agreement,
    train_digits_classifier,
)
from genforge.metrics.digits_classifier import WEIGHTS_PATH, random_shift


@pytest.fixture(scope="module")
def cnn():
    return load_digits_classifier()


@pytest.fixture(scope="module")
def test_set():
    return DigitsDataset("test", image_size=16, resize="pad")


def test_shipped_cnn_reaches_97_percent_on_the_test_split_in_both_layouts(cnn):
    assert digits_test_accuracy(cnn, "pad") >= 0.97
    assert digits_test_accuracy(cnn, "resize") >= 0.97


def test_shipped_weights_match_their_recorded_facts(cnn):
    facts = json.loads(WEIGHTS_PATH.with_suffix(".json").read_text())
    assert facts["seed"] == 0 and facts["epochs"] > 0
    assert facts["parameters"] == sum(p.numel() for p in cnn.parameters())
    for mode, accuracy in facts["test_accuracy"].items():
        assert digits_test_accuracy(cnn, mode) == pytest.approx(accuracy, abs=1e-4)


def test_loaded_classifier_is_frozen_in_eval_mode(cnn):
    assert not cnn.training and not any(p.requires_grad for p in cnn.parameters())


def test_agreement_is_high_for_true_labels_and_low_for_shifted_labels(cnn, test_set):
    assert classifier_agreement(test_set.images, test_set.labels) >= 0.97
    rolled = (test_set.labels + 1) % 10
    assert classifier_agreement(test_set.images, rolled, cnn) <= 0.2


def test_per_class_agreement_averages_to_the_overall_agreement(cnn, test_set):
    per_class = per_class_agreement(test_set.images, test_set.labels, cnn)
    counts = torch.bincount(test_set.labels, minlength=10).float()
    overall = classifier_agreement(test_set.images, test_set.labels, cnn)
    assert per_class.shape == (10,) and torch.all(per_class >= 0.9)
    assert (per_class * counts).sum() / counts.sum() == pytest.approx(overall, abs=1e-6)
    only_threes = test_set.labels == 3
    partial = per_class_agreement(test_set.images[only_threes], test_set.labels[only_threes], cnn)
    assert torch.isnan(partial[[0, 1, 2, 4]]).all() and partial[3] == per_class[3]


def test_native_8x8_and_rgb_inputs_are_judged_like_the_16x16_grey_layout(cnn):
    native = DigitsDataset("test", image_size=8)
    assert classifier_agreement(native.images, native.labels, cnn) >= 0.97
    grey = DigitsDataset("test", image_size=16).images[:32]
    assert torch.allclose(cnn(grey), cnn(grey.expand(-1, 3, -1, -1)), atol=1e-5)


def test_logits_are_the_head_applied_to_the_features(cnn, test_set):
    x = test_set.images[:16]
    features = cnn.features(x)
    assert features.shape == (16, DigitsCNN.feature_dim) and torch.all(features >= 0)
    assert torch.allclose(cnn(x), cnn.head(features))


def test_agreement_rejects_mismatched_labels(test_set):
    with pytest.raises(ValueError, match="labels must be"):
        classifier_agreement(test_set.images[:4], test_set.labels[:3])


def test_labels_the_judge_cannot_predict_are_an_error_not_agreement_zero(test_set):
    with pytest.raises(ValueError, match=r"labels span 0\.\.10, but the judge knows classes 0\.\.9"):
        classifier_agreement(test_set.images[:4], torch.tensor([0, 3, 10, 2]))


def test_random_shift_moves_digits_by_at_most_one_pixel_and_keeps_their_ink():
    images = DigitsDataset("test", image_size=16).images[:64]
    shifted = random_shift(images, torch.Generator().manual_seed(0))
    # padded digits have a 4-px margin, so a 1-px shift loses no ink
    assert torch.allclose((shifted + 1).sum(dim=(1, 2, 3)), (images + 1).sum(dim=(1, 2, 3)))
    assert not torch.equal(shifted, images)
    matches = [torch.equal(torch.roll(images[i], (dy, dx), (1, 2)), shifted[i])
               for i in range(8) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    assert sum(matches) == 8


def test_training_is_reproducible_for_a_seed_and_learns():
    a = train_digits_classifier(seed=0, epochs=2)
    b = train_digits_classifier(seed=0, epochs=2)
    c = train_digits_classifier(seed=1, epochs=2)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])
    assert not torch.equal(a.head.weight, c.head.weight)
    assert digits_test_accuracy(a) > 0.3  # two short epochs already beat chance (0.1)


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_digits_classifier(tmp_path / "nope.safetensors")
