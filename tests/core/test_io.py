"""Atomic writes: the target holds the old file or the whole new one, and no temporary file stays."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from genforge.core.io import atomic_write


def test_a_finished_write_replaces_the_target_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "weights.safetensors"
    target.write_text("old")
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        save_file({"w": torch.arange(4.0)}, str(tmp))
        assert target.read_text() == "old"  # nothing reaches the target before the block ends
    assert torch.equal(load_file(str(target))["w"], torch.arange(4.0))
    assert sorted(os.listdir(tmp_path)) == ["weights.safetensors"]


@pytest.mark.parametrize("existing", [False, True])
def test_a_writer_that_raises_leaves_the_target_as_it_was_and_no_temporary_file(tmp_path, existing):
    target = tmp_path / "manifest.json"
    if existing:
        target.write_text('{"old": 1}')
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(target) as tmp:
            tmp.write_text('{"half')
            raise RuntimeError("disk full")
    assert sorted(os.listdir(tmp_path)) == (["manifest.json"] if existing else [])
    if existing:
        assert target.read_text() == '{"old": 1}'


def test_a_writer_that_writes_nothing_is_an_error_and_the_target_stays(tmp_path):
    target = tmp_path / "index.json"
    target.write_text("kept")
    with pytest.raises(FileNotFoundError):
        with atomic_write(target):
            pass
    assert target.read_text() == "kept" and sorted(os.listdir(tmp_path)) == ["index.json"]


def test_write_json_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    from genforge.core.io import write_json

    target = tmp_path / "metrics.json"
    target.write_text('{"old": true}')
    write_json(target, {"accuracy": 0.5}, indent=2)
    assert json.loads(target.read_text()) == {"accuracy": 0.5}
    with pytest.raises(TypeError):
        write_json(target, {"not json": object()})
    assert json.loads(target.read_text()) == {"accuracy": 0.5}  # the failed write left the file
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
