"""Checkpoints: exact round trip, atomic writes, pruning, and clear errors for damage."""

import json

import pytest
import torch
from accelerate import Accelerator

from genforge.train import EMA, CheckpointError, latest_checkpoint, list_checkpoints
from genforge.train import checkpoint as ckpt


def parts(seed=0):
    """A small trained-ish state: model, EMA, optimizer with moments, scheduler."""
    torch.manual_seed(seed)
    accelerator = Accelerator()
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5),
                                torch.nn.Linear(5, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMA(model, decay=0.9)
    for _ in range(3):
        model(torch.randn(8, 3)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        ema.update(model)
    return accelerator, model, ema, optimizer, scheduler


def save(output_dir, step, state, keep=5):
    accelerator, model, ema, optimizer, scheduler = state
    return ckpt.save_checkpoint(accelerator, output_dir, step, model=model, ema=ema,
                                optimizer=optimizer, scheduler=scheduler,
                                data_position=10 * step, keep=keep)


def load(path, state):
    accelerator, model, ema, optimizer, scheduler = state
    return ckpt.load_checkpoint(accelerator, path, model=model, ema=ema,
                                optimizer=optimizer, scheduler=scheduler)


def test_round_trip_restores_weights_ema_optimizer_schedule_and_rng(tmp_path):
    saved = parts(seed=0)
    path = save(tmp_path, 3, saved)
    next_noise = torch.rand(4)
    fresh = parts(seed=1)
    assert load(path, fresh) == {"step": 3, "data_position": 30}
    assert torch.equal(torch.rand(4), next_noise)
    for a, b in zip(saved[1].state_dict().values(), fresh[1].state_dict().values()):
        assert torch.equal(a, b)  # parameters and BatchNorm buffers
    assert all(torch.equal(saved[2].shadow[n], fresh[2].shadow[n]) for n in saved[2].shadow)
    assert fresh[2].num_updates == 3
    moments = [s["exp_avg"] for s in saved[3].state_dict()["state"].values()]
    restored = [s["exp_avg"] for s in fresh[3].state_dict()["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(moments, restored))
    assert fresh[4].state_dict()["last_epoch"] == 3


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    state = parts()
    for step in (1, 2, 3, 4):
        save(tmp_path, step, state, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000003", "step_0000004"]


def test_a_write_that_dies_midway_leaves_no_checkpoint_under_the_final_name(tmp_path, monkeypatch):
    state = parts()
    save(tmp_path, 1, state)
    real_save = torch.save

    def dying_save(obj, file, *args, **kwargs):
        if str(file).endswith("optimizer.pt"):
            raise OSError("disk full")
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2, state)
    root = ckpt.checkpoints_root(tmp_path)
    assert not (root / "step_0000002").exists()
    assert (root / ".tmp-step_0000002").is_dir()  # what a killed writer leaves behind
    assert latest_checkpoint(tmp_path) == root / "step_0000001"
    monkeypatch.undo()
    save(tmp_path, 2, state)  # the next save clears the leftover
    assert sorted(p.name for p in root.iterdir()) == ["step_0000001", "step_0000002"]


def test_resume_ignores_leftover_temporary_directories(tmp_path):
    path = save(tmp_path, 2, parts())
    junk = ckpt.checkpoints_root(tmp_path) / ".tmp-step_0000009"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"half a file")
    assert latest_checkpoint(tmp_path) == path


def _truncate(file):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _garble(file):
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(255 - b for b in data[middle:middle + 16])
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("name, damage", [
    ("model.safetensors", _truncate),
    ("optimizer.pt", _garble),
    ("ema.safetensors", lambda f: f.unlink()),
    ("rng_0.pt", _truncate),
    ("manifest.json", lambda f: f.unlink()),
    ("manifest.json", lambda f: f.write_text("{not json")),
])
def test_damaged_checkpoint_raises_checkpoint_error_naming_the_file(tmp_path, name, damage):
    path = save(tmp_path, 1, parts())
    damage(path / name)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load(path, parts())


@pytest.mark.parametrize("name", ["model.safetensors", "state.pt", "optimizer.pt"])
def test_garbage_that_passes_the_manifest_still_gives_checkpoint_error(tmp_path, name):
    # Second line of defence: a file the manifest vouches for but that does not load.
    path = save(tmp_path, 1, parts())
    (path / name).write_bytes(b"\x80\x02garbage" * 10)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": (path / name).stat().st_size,
                               "sha256": ckpt._sha256(path / name)}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load(path, parts())


def test_checkpoint_of_another_architecture_is_rejected_by_name(tmp_path):
    path = save(tmp_path, 1, parts())
    accelerator, _, _, _, _ = other = parts()
    other = (accelerator, torch.nn.Linear(3, 1), *other[2:])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load(path, other)
