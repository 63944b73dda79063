"""Atomic, code-free training checkpoints on `accelerator.save_state` / `load_state`.

A checkpoint is a directory `<output_dir>/checkpoints/step_{N:07d}` holding

    what accelerate's save_state writes   the model (model.safetensors, or FSDP / DeepSpeed
                                          shards), optimizer.bin, scheduler.bin, the grad
                                          scaler, random_states_{rank}.pkl (python, numpy,
                                          torch CPU/CUDA RNGs of every process)
    ema.safetensors                       the EMA model's tensors (ours)
    state.json                            step, data position, EMA counters, process count
    manifest.json                         size and sha256 of every file above, written last

accelerate knows how to gather and shard every distributed setup (DDP, FSDP, DeepSpeed), so
the model, optimizer, scheduler and RNG states are its files. What it lacks is ours:
- atomicity: everything is written into a temporary sibling `.tmp-step_{N:07d}`, every file
  and the directory are fsynced, and only then is it renamed to its final name, so a run
  killed at any moment leaves either a complete checkpoint or a `.tmp-*` directory that
  resume never looks at (and the next save deletes);
- the manifest, checked before anything is loaded, so any damage (missing, truncated or
  garbled file) is a `CheckpointError` naming the file;
- `keep`: only the newest checkpoints stay;
- no unpickling: accelerate 1.x loads its own files with `weights_only=True`, but objects
  given to `register_for_checkpointing` with `weights_only=False`; so nothing is registered
  there: the EMA is a safetensors file and the loop's counters are JSON.
With several processes the output directory must be shared.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from accelerate.utils import load as accelerate_load
from safetensors import safe_open

from genforge.core.errors import one_line

__all__ = ["CheckpointError", "checkpoints_root", "checkpoint_step", "list_checkpoints",
           "latest_checkpoint", "save_checkpoint", "load_checkpoint", "resume_latest"]

_FORMAT = 2
_NAME = re.compile(r"^step_(\d{7})$")
_TMP_PREFIX = ".tmp-"
_OURS = ("ema.safetensors", "state.json")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or damaged; the message names the path."""


def checkpoints_root(output_dir) -> Path:
    """The directory holding a run's checkpoints."""
    return Path(output_dir) / "checkpoints"


def checkpoint_step(path) -> int:
    """The training step a checkpoint directory `step_{N:07d}` was written at."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise CheckpointError(f"{path} is not a checkpoint directory (expected a name like step_0000042)")
    return int(match.group(1))


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(output_dir) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file (or, on POSIX, a directory entry list) to disk."""
    if path.is_dir() and os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(directory: Path) -> list[Path]:
    """Every file under `directory` (FSDP and DeepSpeed save sub-folders), sorted."""
    return sorted(p for p in directory.rglob("*") if p.is_file())


def save_checkpoint(accelerator, output_dir, step: int, *, ema, data_position: int,
                    keep: int) -> Path:
    """Atomically write the checkpoint of `step`; keep only the newest `keep`.

    Call on every process, after `accelerator.prepare` of the model, optimizer and LR
    scheduler: `accelerator.save_state` writes those and every process's RNG state, the main
    process adds the EMA and the counters. `data_position` counts the micro-batches consumed.
    """
    root = checkpoints_root(output_dir)
    final = root / f"step_{step:07d}"
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(stale)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        ema.save(tmp / "ema.safetensors")
        state = {"format": _FORMAT, "step": step, "data_position": data_position,
                 "ema": ema.counters(), "num_processes": accelerator.num_processes}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = _files(tmp)
        manifest = {"format": _FORMAT, "step": step,
                    "files": {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size,
                                                              "sha256": _sha256(p)}
                              for p in files}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        for p in [*files, tmp / "manifest.json", *sorted({f.parent for f in files}, reverse=True)]:
            _fsync(p)
        if final.exists():  # the same step saved again (e.g. a resume with nothing to do)
            old = root / f"{_TMP_PREFIX}old-{final.name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync(root)
        for stale in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def _verify(path: Path, required: list[str]) -> None:
    """Check the manifest and every file's presence, size and hash before loading."""
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint directory at {path}")
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint file missing: {manifest_path} (incomplete checkpoint)")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"corrupt checkpoint file {manifest_path}: {err}") from None
    for name in required:
        if name not in files:
            raise CheckpointError(f"checkpoint file {path / name} is not listed in {manifest_path}")
    for name, info in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file missing: {file}")
        size = file.stat().st_size
        if size != info.get("bytes"):
            raise CheckpointError(f"corrupt checkpoint file {file}: {size} bytes, expected "
                                  f"{info.get('bytes')} (truncated or overwritten)")
        if _sha256(file) != info.get("sha256"):
            raise CheckpointError(f"corrupt checkpoint file {file}: sha256 does not match "
                                  f"the manifest (garbled)")


def _load(file: Path, loader):
    """Run `loader(file)`; any failure becomes a CheckpointError naming the file."""
    try:
        return loader(file)
    except CheckpointError:
        raise
    except Exception as err:  # safetensors, unpickler and load_state_dict errors alike
        raise CheckpointError(f"cannot load checkpoint file {file}: {one_line(err)}") from None


def _culprit(path: Path, err: Exception) -> str:
    """Which of accelerate's files made `load_state` fail (it does not say): the first that
    does not even open, else the model file for a state-dict mismatch, else the folder."""
    def opens(file: Path) -> bool:
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), "pt") as f:
                    f.keys()
            else:
                accelerate_load(file, map_location="cpu")
        except Exception:  # noqa: BLE001 -- any failure names this file
            return False
        return True

    models = sorted(path.glob("model*.safetensors"))
    for file in [*models, *sorted(path.glob("optimizer*.bin")), *sorted(path.glob("scheduler*.bin")),
                 *sorted(path.glob("scaler.pt"))]:
        if not opens(file):
            return str(file)
    return str(models[0]) if models and "state_dict" in str(err) else str(path)


def load_checkpoint(accelerator, path, *, ema) -> dict:
    """Restore everything `save_checkpoint` wrote; returns `{"step", "data_position"}`.

    Call on every process, after `accelerator.prepare` of the model, optimizer and LR
    scheduler; the RNG states are restored too, so the next random number is the one the
    saved run drew next.
    """
    path = Path(path)
    rng_name = f"random_states_{accelerator.process_index}.pkl"
    _verify(path, [*_OURS, rng_name])
    state = _load(path / "state.json", lambda f: json.loads(f.read_text()))
    if state.get("format") != _FORMAT:
        raise CheckpointError(f"{path / 'state.json'}: unknown checkpoint format "
                              f"{state.get('format')!r} (expected {_FORMAT})")
    if state["num_processes"] != accelerator.num_processes:
        raise CheckpointError(f"{path} was saved by {state['num_processes']} processes; resume "
                              f"it with the same number (got {accelerator.num_processes})")
    # accelerate logs and skips an RNG file it cannot read; resume would then not be exact.
    _load(path / rng_name, lambda f: accelerate_load(f, map_location="cpu"))
    try:
        accelerator.load_state(str(path))
    except Exception as err:  # noqa: BLE001 -- reported with the file it came from
        raise CheckpointError(f"cannot load checkpoint file {_culprit(path, err)}: "
                              f"{one_line(err)}") from None
    _load(path / "ema.safetensors", lambda f: ema.load(f, state["ema"]))
    return {"step": int(state["step"]), "data_position": int(state["data_position"])}


def resume_latest(accelerator, output_dir, *, ema) -> tuple[Path, dict]:
    """Load the newest checkpoint that is intact, saying which damaged ones were skipped.

    Every newer checkpoint that fails to load is reported and passed over; loading an older
    one overwrites whatever a failed attempt had restored. Raises CheckpointError when none
    loads.
    """
    errors = []
    for path in reversed(list_checkpoints(output_dir)):
        try:
            restored = load_checkpoint(accelerator, path, ema=ema)
        except CheckpointError as err:
            errors.append(str(err))
            accelerator.print(f"warning: skipping damaged checkpoint {path.name}: {err}")
            continue
        if errors:
            accelerator.print(f"resuming from {path.name}, the newest intact checkpoint")
        return path, restored
    detail = "; ".join(errors) if errors else "none found"
    raise CheckpointError(f"no intact checkpoint in {checkpoints_root(output_dir)}: {detail}")
