"""Atomic, code-free training checkpoints.

A checkpoint is a directory `<output_dir>/checkpoints/step_{N:07d}` holding

    model.safetensors   the unwrapped model's state dict (parameters and buffers)
    ema.safetensors     the EMA shadows
    optimizer.pt        optimizer state (torch.save; plain tensors and numbers)
    state.pt            step, data position, LR scheduler, EMA counters, process count
    rng_{rank}.pt       python / numpy / torch (CPU and CUDA) RNG states, one per process
    manifest.json       size and sha256 of every file above, written last

It is written into a temporary sibling `.tmp-step_{N:07d}`, every file and the directory
are fsynced, and only then is it renamed to its final name: a run killed at any moment
leaves either a complete checkpoint or a `.tmp-*` directory that resume never looks at
(and the next save deletes). Loading uses safetensors and `torch.load(weights_only=True)`
only, so a checkpoint can never execute code, and any damage (missing, truncated or
garbled file) surfaces as a `CheckpointError` naming the file, checked against the manifest
before anything is loaded. With several processes the output directory must be shared.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

__all__ = ["CheckpointError", "checkpoints_root", "list_checkpoints", "latest_checkpoint",
           "save_checkpoint", "load_checkpoint"]

_FORMAT = 1
_NAME = re.compile(r"^step_(\d{7})$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or damaged; the message names the path."""


def checkpoints_root(output_dir) -> Path:
    """The directory holding a run's checkpoints."""
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


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


def _rng_state() -> dict:
    """All RNG states of this process, as tensors and plain numbers (weights_only-loadable)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": (version, mt, gauss),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(accelerator, output_dir, step: int, *, model, ema, optimizer, scheduler,
                    data_position: int, keep: int) -> Path:
    """Atomically write the checkpoint of `step`; keep only the newest `keep`.

    Call on every process: each writes its RNG state, the main process writes the rest.
    `data_position` counts the micro-batches consumed so far; `model` may be wrapped.
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
    torch.save(_rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), str(tmp / "model.safetensors"),
                   force_contiguous=True)
        ema_state = ema.state_dict()
        save_file({k: v.contiguous() for k, v in ema_state.pop("shadow").items()},
                  str(tmp / "ema.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"format": _FORMAT, "step": step, "data_position": data_position,
                    "scheduler": scheduler.state_dict(), "ema": ema_state,
                    "num_processes": accelerator.num_processes}, tmp / "state.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {"format": _FORMAT, "step": step,
                    "files": {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                              for p in files}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        for p in [*files, tmp / "manifest.json", tmp]:
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
        raise CheckpointError(f"cannot load checkpoint file {file}: "
                              f"{type(err).__name__}: {err}") from None


def load_checkpoint(accelerator, path, *, model, ema, optimizer, scheduler) -> dict:
    """Restore everything `save_checkpoint` wrote; returns `{"step", "data_position"}`.

    Call on every process, after the model, optimizer and scheduler are built: the RNG
    states are restored last, so the next random number is the one the saved run drew next.
    """
    path = Path(path)
    rng_name = f"rng_{accelerator.process_index}.pt"
    names = ["model.safetensors", "ema.safetensors", "optimizer.pt", "state.pt", rng_name]
    _verify(path, names)

    def torch_load(file):
        return torch.load(file, map_location="cpu", weights_only=True)

    state = _load(path / "state.pt", torch_load)
    if state.get("format") != _FORMAT:
        raise CheckpointError(f"{path / 'state.pt'}: unknown checkpoint format "
                              f"{state.get('format')!r}")
    if state["num_processes"] != accelerator.num_processes:
        raise CheckpointError(f"{path} was saved by {state['num_processes']} processes; resume "
                              f"it with the same number (got {accelerator.num_processes})")

    def load_weights(file):
        missing, unexpected = load_model(accelerator.unwrap_model(model), str(file), strict=False)
        if missing or unexpected:
            raise CheckpointError(f"checkpoint file {file} does not match the model: missing "
                                  f"{sorted(missing)}, unexpected {sorted(unexpected)}")

    _load(path / "model.safetensors", load_weights)
    _load(path / "ema.safetensors", lambda f: ema.load_state_dict(
        {"shadow": load_file(str(f)), **state["ema"]}))
    _load(path / "optimizer.pt", lambda f: optimizer.load_state_dict(torch_load(f)))
    _load(path / "state.pt", lambda f: scheduler.load_state_dict(state["scheduler"]))
    _load(path / rng_name, lambda f: _set_rng_state(torch_load(f)))
    return {"step": int(state["step"]), "data_position": int(state["data_position"])}
