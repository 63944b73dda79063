"""Checkpoints: exact round trip, atomic writes, pruning, clear errors for damage, and a
resume that falls back past a damaged newest checkpoint."""

import json

import pytest
import torch
from accelerate import Accelerator

from genforge.train import EMA, CheckpointError, latest_checkpoint, list_checkpoints
from genforge.train import checkpoint as ckpt


def parts(seed=0, width=5):
    """A small trained-ish state: model, EMA, optimizer with moments, scheduler."""
    torch.manual_seed(seed)
    accelerator = Accelerator(step_scheduler_with_optimizer=False)
    model = torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.BatchNorm1d(width),
                                torch.nn.Linear(width, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
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
    return ckpt.save_checkpoint(accelerator, output_dir, step, ema=ema, data_position=10 * step,
                                keep=keep)


def load(path, state):
    return ckpt.load_checkpoint(state[0], path, ema=state[2])


def test_round_trip_restores_weights_ema_optimizer_schedule_and_rng(tmp_path):
    saved = parts(seed=0)
    path = save(tmp_path, 3, saved)
    next_noise = torch.rand(4)
    fresh = parts(seed=1)
    assert load(path, fresh) == {"step": 3, "data_position": 30}
    assert torch.equal(torch.rand(4), next_noise)
    for a, b in zip(saved[1].state_dict().values(), fresh[1].state_dict().values()):
        assert torch.equal(a, b)  # parameters and BatchNorm buffers
    ema_saved, ema_fresh = saved[2].module.state_dict(), fresh[2].module.state_dict()
    assert all(torch.equal(ema_saved[n], ema_fresh[n]) for n in ema_saved)  # BatchNorm's too
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
    assert [ckpt.checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [3, 4]


def test_checkpoints_sort_by_step_and_other_names_are_not_steps(tmp_path):
    root = ckpt.checkpoints_root(tmp_path)
    for name in ("step_0000100", "step_0000020", "step_20", "notes"):
        (root / name).mkdir(parents=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000020", "step_0000100"]
    with pytest.raises(CheckpointError, match="step_20 is not a checkpoint directory"):
        ckpt.checkpoint_step(root / "step_20")


def test_a_write_that_dies_midway_leaves_no_checkpoint_under_the_final_name(tmp_path, monkeypatch):
    state = parts()
    save(tmp_path, 1, state)
    real_save = torch.save

    def dying_save(obj, file, *args, **kwargs):
        if str(file).endswith("optimizer.bin"):
            raise OSError("disk full")
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
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
    ("optimizer.bin", _garble),
    ("ema.safetensors", lambda f: f.unlink()),
    ("random_states_0.pkl", _truncate),
    ("state.json", _garble),
    ("manifest.json", lambda f: f.unlink()),
    ("manifest.json", lambda f: f.write_text("{not json")),
])
def test_damaged_checkpoint_raises_checkpoint_error_naming_the_file(tmp_path, name, damage):
    path = save(tmp_path, 1, parts())
    damage(path / name)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load(path, parts())


@pytest.mark.parametrize("name", ["model.safetensors", "state.json", "optimizer.bin",
                                  "scheduler.bin", "random_states_0.pkl", "ema.safetensors"])
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
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load(path, parts(width=6))


def test_files_are_loaded_without_unpickling_code(tmp_path):
    # A pickle that would run code must be refused (weights_only), not executed.
    path = save(tmp_path, 1, parts())

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('code ran')",))

    for name in ("optimizer.bin", "random_states_0.pkl"):
        target = path / name
        torch.save({"x": Boom()}, target)
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["files"][name] = {"bytes": target.stat().st_size, "sha256": ckpt._sha256(target)}
        (path / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            load(path, parts())
        save(tmp_path, 1, parts())  # a clean copy for the next file


def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path, capsys):
    state = parts()
    save(tmp_path, 1, state)
    expected = {n: t.clone() for n, t in state[1].state_dict().items()}
    newest = save(tmp_path, 2, state)
    _garble(newest / "model.safetensors")
    fresh = parts(seed=3)
    path, restored = ckpt.resume_latest(fresh[0], tmp_path, ema=fresh[2])
    assert path.name == "step_0000001" and restored["step"] == 1
    assert all(torch.equal(fresh[1].state_dict()[n], t) for n, t in expected.items())
    out = capsys.readouterr().out
    assert "skipping damaged checkpoint step_0000002" in out and "model.safetensors" in out


def test_resume_with_every_checkpoint_damaged_names_each(tmp_path):
    state = parts()
    for step in (1, 2):
        (save(tmp_path, step, state) / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint.*step_0000002.*step_0000001"):
        ckpt.resume_latest(state[0], tmp_path, ema=state[2])
