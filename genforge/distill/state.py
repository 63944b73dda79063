"""What a distillation run keeps in its output directory, and the checks that stop a rerun
from losing it or mixing it with another run's.

- :func:`prepare_output_dir`: before any work, a rerun without ``resume`` over a directory
  that holds an earlier run's saved state is refused (``overwrite=True`` removes that state
  and starts again; ``resume="auto"`` continues when there is state and starts otherwise).
- :func:`save_safetensors` / :func:`read_safetensors`: atomic writes (a temporary name, then
  a rename) and reads that turn a damaged file into a one-line ``ValueError`` naming it.
- :func:`check_settings`: a saved file's recorded settings against this run's, naming every
  key that differs.
- :func:`tensors_digest`: the sha256 of named tensors (data, a teacher's weights), the
  fingerprint recorded in those settings.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from genforge.config import setting_differences
from genforge.core.io import atomic_write

__all__ = ["OUTPUTS", "STATE", "check_settings", "prepare_output_dir", "read_safetensors", "save_safetensors",
           "saved_state", "settings_digest", "tensors_digest"]

STATE = ("distill_state.safetensors", "dwa_batches", "parts", "synthetic_set.safetensors", "metrics.json")
"""An earlier run's progress and results: the matching state, DWA's finished batches, the
processes' shares, the merged set and its evaluation (in the directory or its ``shard_*``)."""
OUTPUTS = ("synthetic_grid.png", "recipe.yaml")
"""Written at the end from the state; removed with it by ``overwrite`` so they never describe another run."""


def saved_state(output_dir: str | Path) -> list[Path]:
    """The paths of :data:`STATE` present in ``output_dir`` and its ``shard_*`` folders."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    folders = [out, *sorted(p for p in out.glob("shard_*") if p.is_dir())]
    return [folder / name for folder in folders for name in STATE if (folder / name).exists()]


def prepare_output_dir(output_dir: str | Path | None, resume: bool | str, overwrite: bool) -> bool:
    """Whether to resume; refuses, before any work, a fresh start over a saved state.

    ``resume`` is True (continue; error when nothing is saved), False (start; error when an
    earlier run's state is there, unless ``overwrite``, which deletes it and its outputs) or
    ``"auto"`` (continue when there is state). Teacher caches are kept: each is keyed on the
    settings that made it.
    """
    if resume not in (True, False, "auto"):
        raise ValueError(f"resume must be True, False or 'auto', got {resume!r}")
    if overwrite and resume:
        raise ValueError("resume and overwrite exclude each other: continue the saved run or start it again")
    if output_dir is None:
        return False
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {str(out)!r} is a file; a distillation run writes a directory")
    found = saved_state(out)
    if resume == "auto":
        return bool(found)
    if resume and not found:
        raise FileNotFoundError(f"resume=True but there is no distillation state in {out} (none of "
                                f"{', '.join(STATE)}); run without resume to start")
    if found and not resume:
        if not overwrite:
            names = ", ".join(str(p.relative_to(out)) for p in found)
            raise ValueError(f"{out} already holds a distillation run's saved state ({names}); continue it "
                             f"(--resume, resume=True), start it again (--overwrite, overwrite=True) or choose "
                             f"another output_dir")
        for path in found + [out / name for name in OUTPUTS if (out / name).exists()]:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return bool(resume)


def save_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write ``tensors`` (and string ``metadata``) atomically (:func:`genforge.core.io.atomic_write`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_safetensors(path: str | Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; a damaged one is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except SafetensorError as err:
        raise ValueError(f"{what} {path} is not a readable safetensors file ({err}); delete it or "
                         f"start again with --overwrite") from None


def check_settings(path: str | Path, saved, now: dict) -> None:
    """ValueError naming each key whose value ``path`` recorded (``saved``) differs from this run's."""
    now = json.loads(json.dumps(now, sort_keys=True))
    if saved == now:
        return
    listing = setting_differences(saved if isinstance(saved, dict) else {}, now)
    raise ValueError(f"{path} belongs to a different run; differing settings (saved -> now): {listing}")


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) of named tensors: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def settings_digest(settings: dict) -> str:
    """A short sha256 of JSON ``settings``, for file names keyed on them."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
