"""FID/KID/IS through torch-fidelity with the registered "digits-cnn" feature extractor."""

import importlib
import warnings

import numpy as np
import pytest
import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

import genforge.metrics
from genforge.data import DigitsDataset
from genforge.data.transforms import signed_to_uint8
from genforge.metrics import (
    FeatureExtractorDigitsCNN,
    compute_fidelity,
    images_from_array,
    register_digits_feature_extractor,
)


@pytest.fixture(scope="module")
def digits():
    return DigitsDataset("train", image_size=16).images, DigitsDataset("test", image_size=16).images


def test_digits_cnn_is_registered_with_torch_fidelity():
    assert FEATURE_EXTRACTORS_REGISTRY["digits-cnn"] is FeatureExtractorDigitsCNN


def test_registration_is_idempotent_but_a_different_class_under_the_name_is_refused():
    register_digits_feature_extractor()
    importlib.reload(genforge.metrics)  # importing again must not fail
    assert FEATURE_EXTRACTORS_REGISTRY["digits-cnn"] is FeatureExtractorDigitsCNN

    class Impostor(FeatureExtractorBase):
        pass

    with pytest.raises(ValueError, match="already registered"):
        torch_fidelity.register_feature_extractor("digits-cnn", Impostor)


def test_fid_from_fewer_images_than_feature_dimensions_comes_with_a_warning(digits):
    _, test = digits
    with pytest.warns(UserWarning, match="FID from 2 images .* singular below 65 images"):
        compute_fidelity(test[:2], test[2:4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_fidelity(test[:65], test[65:130])  # enough images: no warning


def test_fid_of_a_set_against_itself_is_zero(digits):
    _, test = digits
    assert abs(compute_fidelity(test, test)["fid"]) < 1e-3


def test_fid_equals_the_naive_frechet_distance_on_digits_cnn_features(digits, frechet_reference):
    train, test = digits
    extractor = FeatureExtractorDigitsCNN("digits-cnn", ["features"])
    rgb = lambda x: signed_to_uint8(x).expand(-1, 3, -1, -1)  # noqa: E731 - what torch-fidelity feeds
    f_train = extractor(rgb(train))[0].double().numpy()
    f_test = extractor(rgb(test))[0].double().numpy()
    fid = compute_fidelity(train, test)["fid"]
    assert fid == pytest.approx(frechet_reference(f_test, f_train), rel=1e-3)


def test_fid_ranks_held_out_digits_far_closer_than_noise(digits):
    train, test = digits
    noise = torch.rand(len(test), 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    close = compute_fidelity(train, test)["fid"]
    far = compute_fidelity(train, noise)["fid"]
    assert close > 0 and close < 0.05 * far


def test_kid_subset_is_clamped_to_small_sample_counts_and_ranks_like_fid(digits):
    train, test = digits
    noise = torch.rand(30, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    near = compute_fidelity(train[:40], test[:30], fid=False, kid=True)
    far = compute_fidelity(train[:40], noise, fid=False, kid=True)
    assert set(near) == {"kid_mean", "kid_std"}
    assert near["kid_mean"] < 0.05 * far["kid_mean"]


def test_inception_score_counts_distinct_recognisable_classes(digits):
    _, test = digits
    labels = DigitsDataset("test").labels
    all_classes = compute_fidelity(None, test, fid=False, isc=True)["isc_mean"]
    one_class = compute_fidelity(None, test[labels == 3], fid=False, isc=True)["isc_mean"]
    assert all_classes > 7 and one_class < 1.5


def test_datasets_and_tensors_give_the_same_result(digits):
    _, test = digits
    dataset = DigitsDataset("test", image_size=16)
    shifted = torch.roll(test, 1, dims=3)
    assert compute_fidelity(dataset, shifted)["fid"] == pytest.approx(compute_fidelity(test, shifted)["fid"])


def test_inception_without_local_weights_is_a_clear_error_not_a_download(digits):
    _, test = digits
    with pytest.raises(ValueError, match="never downloads"):
        compute_fidelity(test, test, feature_extractor="inception-v3-compat")


def test_other_downloading_extractors_and_unknown_names_are_refused(digits):
    _, test = digits
    with pytest.raises(ValueError, match="would download"):
        compute_fidelity(test, test, feature_extractor="vgg16")
    with pytest.raises(ValueError, match="registered: .*digits-cnn"):
        compute_fidelity(test, test, feature_extractor="resnet-9000")


def test_arrays_in_any_documented_layout_map_to_the_same_images(digits):
    _, test = digits
    pixels = signed_to_uint8(test[:5]).numpy()  # (5, 1, 16, 16)
    expected = images_from_array(pixels)
    assert torch.allclose(expected, test[:5], atol=1 / 127.5)
    for layout in (pixels[:, 0], pixels.transpose(0, 2, 3, 1), pixels.astype(np.float32) / 127.5 - 1):
        assert torch.allclose(images_from_array(layout), expected, atol=1e-6)
    with pytest.raises(ValueError, match="expected \\[-1, 1\\]"):
        images_from_array(pixels.astype(np.float32))
