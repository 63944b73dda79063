"""CIFAR pickle batches: exact round trip, no code execution, clear errors."""

import os
import pickle

import numpy as np
import pytest
import torch

from genforge.data import CIFARDataset, build_dataset, safe_load_pickle


def _write_batch(path, data, labels, label_key="labels", bytes_keys=True, protocol=4):
    batch = {"data": data, label_key: labels, "batch_label": "fake batch"}
    if bytes_keys:
        batch = {k.encode(): v for k, v in batch.items()}
    path.write_bytes(pickle.dumps(batch, protocol=protocol))


def _fake_cifar10(root, n=4, seed=0, **kw):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        _write_batch(folder / name, data, labels, **kw)
        written[name] = (data, labels)
    return written


def test_cifar10_batches_read_back_exactly(tmp_path):
    written = _fake_cifar10(tmp_path)
    train = CIFARDataset(tmp_path, split="train")
    data = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert len(train) == 20
    assert torch.equal(train.data, torch.from_numpy(data.reshape(-1, 3, 32, 32)))
    assert train.labels.tolist() == labels
    image, label = train[7]
    pixels = torch.from_numpy(data[7].reshape(3, 32, 32)).float()
    assert torch.allclose(image, pixels / 127.5 - 1) and label == labels[7]
    # row layout: first 1024 values are the red plane in row-major order
    assert image[0, 0, 1] == data[7, 1] / 127.5 - 1 and image[1, 0, 0] == data[7, 1024] / 127.5 - 1


def test_str_keys_and_protocol_2_files_are_accepted(tmp_path):
    written = _fake_cifar10(tmp_path, bytes_keys=False, protocol=2)
    test = CIFARDataset(tmp_path / "cifar-10-batches-py", split="test")
    data, labels = written["test_batch"]
    assert torch.equal(test.data.reshape(len(test), -1), torch.from_numpy(data))
    assert test.labels.tolist() == labels


def test_batches_naming_numpy_core_like_the_official_files_load(tmp_path):
    data = np.arange(3072, dtype=np.int64).astype(np.uint8).reshape(1, 3072)
    raw = pickle.dumps({b"data": data, b"labels": [4]}, protocol=2)
    old_numpy = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in old_numpy
    (tmp_path / "test_batch").write_bytes(old_numpy)
    test = CIFARDataset(tmp_path, split="test")
    assert torch.equal(test.data.reshape(1, -1), torch.from_numpy(data)) and test.labels.tolist() == [4]


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    for name in ("train", "test"):
        _write_batch(folder / name, data, [97, 3], label_key="fine_labels")
    ds = build_dataset("cifar100", split="test", root=str(tmp_path))
    assert ds.labels.tolist() == [97, 3] and ds.num_classes == 100


def test_resize_and_grey_options(tmp_path):
    _fake_cifar10(tmp_path)
    native = CIFARDataset(tmp_path, "test")
    padded = build_dataset("cifar10", split="test", root=str(tmp_path), image_size=40, channels=1)
    image = padded[0][0]
    assert image.shape == (1, 40, 40) and padded.channels == 1 and padded.image_size == 40
    grey = (native[0][0] * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0)
    assert torch.allclose(image[0, 4:36, 4:36], grey, atol=1e-6)
    assert torch.all(image[0, :4] == -1)


class _Payload:
    """Unpickling this object would create a directory (stands in for os.system)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_pickle_with_a_forbidden_global_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "data_batch_1"
    evil.write_bytes(pickle.dumps({b"data": _Payload(str(marker)), b"labels": [0]}))
    with pytest.raises(pickle.UnpicklingError, match="posix.mkdir|os.mkdir|nt.mkdir"):
        safe_load_pickle(evil)
    assert not marker.exists()


def test_eval_builtin_is_refused(tmp_path):
    class Eval:
        def __reduce__(self):
            return eval, ("1 + 1",)

    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(Eval()))
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        safe_load_pickle(path)


def test_missing_batch_file_is_named(tmp_path):
    written_dir = tmp_path / "cifar-10-batches-py"
    _fake_cifar10(tmp_path)
    (written_dir / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        CIFARDataset(tmp_path, "train")


def test_bad_num_classes_and_split_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="num_classes=20"):
        CIFARDataset(tmp_path, num_classes=20)
    with pytest.raises(ValueError, match="split='val'"):
        CIFARDataset(tmp_path, split="val")
