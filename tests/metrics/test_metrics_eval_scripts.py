"""eval/fid.py and eval/accuracy.py: thin CLIs over genforge.metrics, run in-process."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genforge.data import DigitsDataset
from genforge.data.transforms import signed_to_uint8
from genforge.metrics import load_image_source

EVAL = Path(__file__).resolve().parents[2] / "eval"


def _script(name):
    spec = importlib.util.spec_from_file_location(f"eval_{name}", EVAL / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def test_npz(tmp_path_factory):
    """The digits test split at native 8x8, stored as a generator would: uint8 (N, H, W) + labels."""
    test = DigitsDataset("test", image_size=8)
    path = tmp_path_factory.mktemp("samples") / "samples.npz"
    np.savez(path, images=signed_to_uint8(test.images[:, 0]).numpy(), labels=test.labels.numpy())
    return path


def test_fid_script_scores_real_digits_as_samples_near_zero_and_noise_far(test_npz, tmp_path, capsys):
    fid = _script("fid")
    out = tmp_path / "fid.json"
    near = fid.main(["--real", "digits:test", "--fake", str(test_npz), "--isc", "--json", str(out)])
    record = json.loads(out.read_text())
    assert record["fid"] == near["fid"] and record["n_fake"] == 360 and record["isc_mean"] > 7
    assert near["fid"] < 1e-2  # same images, only uint8 rounding differs
    assert "fid" in capsys.readouterr().out

    noise = tmp_path / "noise.npz"
    np.savez(noise, images=np.random.default_rng(0).integers(0, 256, (100, 8, 8), dtype=np.uint8))
    far = fid.main(["--real", "digits:train", "--fake", str(noise)])
    assert far["fid"] > 100 * max(near["fid"], 1e-3)


def test_fid_script_refuses_inception_without_local_weights(test_npz):
    with pytest.raises(ValueError, match="never downloads"):
        _script("fid").main(["--real", "digits:test", "--fake", str(test_npz),
                             "--extractor", "inception-v3-compat"])


def test_accuracy_script_reports_test_accuracy_and_sample_agreement(test_npz, tmp_path):
    accuracy = _script("accuracy")
    record = accuracy.main(["--json", str(tmp_path / "acc.json")])
    assert record["test_accuracy_pad"] >= 0.97
    assert json.loads((tmp_path / "acc.json").read_text()) == record

    agreement = accuracy.main(["--samples", str(test_npz)])
    assert agreement["agreement"] >= 0.97 and len(agreement["per_class"]) == 10


def test_folder_sources_load_grey_pngs_as_one_channel(tmp_path):
    pixels = signed_to_uint8(DigitsDataset("test", image_size=16).images[:3, 0]).numpy()
    for i, array in enumerate(pixels):
        Image.fromarray(array).save(tmp_path / f"{i}.png")
    images, labels = load_image_source(str(tmp_path))
    assert labels is None and images.shape == (3, 1, 16, 16)
    assert np.array_equal(signed_to_uint8(images[:, 0]).numpy(), pixels)


def test_digits_source_follows_the_fake_size_unless_given():
    like = DigitsDataset("test", image_size=8).images
    assert load_image_source("digits:test", like=like)[0].shape[-1] == 8
    images, labels = load_image_source("digits:train:16:resize")
    assert images.shape == (1437, 1, 16, 16) and labels.shape == (1437,)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_image_source("missing.npz")


def test_a_32px_digits_reference_must_say_pad_or_resize_and_follows_what_the_samples_record(tmp_path):
    from genforge.metrics import load_real_and_fake

    resized = DigitsDataset("test", image_size=32, resize="resize")
    fakes = tmp_path / "resized.npz"
    np.savez(fakes, images=signed_to_uint8(resized.images).numpy(), labels=resized.labels.numpy())
    with pytest.raises(ValueError, match="digits:train:32:pad or digits:train:32:resize"):
        load_real_and_fake("digits:train", str(fakes))  # padded would give FID ~1,400
    np.savez(fakes, images=signed_to_uint8(resized.images).numpy(), labels=resized.labels.numpy(),
             resize=np.array("resize"))
    real, fake, labels = load_real_and_fake("digits:test", str(fakes))
    assert torch.equal(signed_to_uint8(real), signed_to_uint8(fake)) and labels is not None
    explicit, _ = load_image_source("digits:test:32:pad", like=fake, resize="resize")
    assert not torch.equal(explicit, real)  # an explicit MODE wins over the record
