"""Atomic file writes: a reader (or a rerun after a crash) sees the old file or the new one, never a part.

Every file genforge writes for a later run to read (weights, shards, manifests, a distillation
state) goes through :func:`atomic_write`: the writer fills a temporary file beside the target,
the file is flushed to disk (fsync), then renamed over the target in one step (``os.replace``).
A writer that raises, or a process killed mid-write, leaves the target as it was; only the
temporary name (``<name>.<pid>.tmp``, one per process, so two processes writing the same target
never share one) can remain after a kill. Whole folders are made atomic the same way by
:mod:`genforge.train.checkpoint`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write", "write_json"]


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the caller to write; on success it becomes ``path``.

    ``with atomic_write(out / "model.safetensors") as tmp: save_file(tensors, str(tmp))``.
    On a clean exit the file is fsynced and renamed to ``path`` (and the rename made durable); if
    the block raises, the temporary file is removed and the exception propagates.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: persist the rename itself
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def write_json(path: str | os.PathLike, obj, **dumps_kwargs) -> None:
    """``json.dumps(obj, **dumps_kwargs)`` written to ``path`` through :func:`atomic_write`."""
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, **dumps_kwargs))
