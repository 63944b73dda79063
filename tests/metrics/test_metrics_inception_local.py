"""FID with torch-fidelity's Inception-v3 built from a LOCAL weights file, with no network.

The weights are random (the ``inception_weights_file`` fixture of tests/conftest.py): the file is
made from the module's own layer definitions, so it has exactly the keys and shapes
torch-fidelity's loader expects. Inception at 299 px is slow on
a CPU, so the tests use 8 images per set and the early ``"64"`` feature layer; the loading
path (``feature_extractor_weights_path``) is the same as for the default ``"2048"`` layer.
"""

import os
import socket

import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as inception

from genforge.data import DigitsDataset
from genforge.data.transforms import signed_to_uint8
from genforge.metrics import compute_fidelity

NAME = "inception-v3-compat"


def _refuse(*args, **kwargs):
    raise AssertionError("network access attempted")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)
    monkeypatch.setattr(inception, "load_state_dict_from_url", _refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _refuse)


@pytest.fixture(scope="module")
def images():
    """8 digits and 8 uniform-noise images."""
    noise = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return DigitsDataset("test", image_size=16).images[:8], noise


def test_fid_with_local_inception_weights_matches_the_frechet_distance_of_its_features(inception_weights_file, images,
                                                                                      frechet_reference):
    a, b = images
    fid = compute_fidelity(a, b, feature_extractor=NAME, inception_weights=inception_weights_file,
                           feature_layer="64")["fid"]
    net = inception.FeatureExtractorInceptionV3(NAME, ["64"],
                                                feature_extractor_weights_path=inception_weights_file)
    fa, fb = (net(signed_to_uint8(x).expand(-1, 3, -1, -1))[0].double().numpy() for x in (b, a))
    assert fid > 0.01
    assert fid == pytest.approx(frechet_reference(fa, fb), rel=1e-4)


def test_fid_with_local_inception_of_a_set_against_itself_is_zero(inception_weights_file, images):
    a, _ = images
    fid = compute_fidelity(a, a, feature_extractor=NAME, inception_weights=inception_weights_file,
                           feature_layer="64")["fid"]
    assert abs(fid) < 1e-3


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_weights_file_that_would_run_code_is_refused_before_torch_fidelity_loads_it(tmp_path, images):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": _Payload(str(marker))}, path)
    a, b = images
    with pytest.raises(ValueError, match="evil.pth.*cannot be read safely"):
        compute_fidelity(a, b, feature_extractor=NAME, inception_weights=str(path))
    assert not marker.exists()


def test_the_weights_file_is_opened_once_and_only_with_weights_only(inception_weights_file, images, monkeypatch):
    opened, real_load = [], torch.load

    def spy(f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and str(f) == inception_weights_file:
            opened.append(kwargs.get("weights_only"))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    a, b = images
    compute_fidelity(a, b, feature_extractor=NAME, inception_weights=inception_weights_file, feature_layer="64")
    assert opened == [True]  # torch-fidelity got the tensors, not the file


def test_missing_inception_weights_file_is_named(tmp_path, images):
    a, b = images
    with pytest.raises(FileNotFoundError, match="not_here.pth"):
        compute_fidelity(a, b, feature_extractor=NAME, inception_weights=str(tmp_path / "not_here.pth"))
