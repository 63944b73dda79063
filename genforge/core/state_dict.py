"""Reading weight files without running code, and strict loading that says what differs.

Every converter of an official checkpoint (DiMR, the timm-registered backbones) needs the
same two things: read a file that may be a safetensors file or a pickled torch checkpoint
(opened with ``weights_only=True``, so no code in it runs), possibly nested under a
``"model"`` / ``"state_dict"`` key; and load it strictly, failing with the names of the
missing, unexpected and wrongly shaped keys rather than torch's wall of text.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from genforge.core.errors import one_line

__all__ = ["StateDictError", "load_state_dict_strict", "read_state_dict", "state_dict_mismatch"]

_NESTING_KEYS = ("state_dict", "model", "module")


class StateDictError(ValueError):
    """A weight file that cannot be read as, or does not match, the expected state dict."""


def _is_flat(state) -> bool:
    return isinstance(state, Mapping) and all(isinstance(v, torch.Tensor) for v in state.values())


def read_state_dict(path: str | Path, *, nesting_keys: Iterable[str] = _NESTING_KEYS,
                    strip_prefixes: Iterable[str] = ("module.",)) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` dict from a ``.safetensors`` file or a torch checkpoint.

    Torch files are opened with ``weights_only=True``. If the file holds a dict of dicts,
    the first of ``nesting_keys`` present is taken (training scripts save
    ``{"model": ..., "optimizer": ...}``); a DDP ``module.`` prefix is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors' own error type: one line naming the file
            raise StateDictError(f"{path} is not a readable safetensors file ({one_line(err)})") from None
    else:
        try:
            with warnings.catch_warnings():  # torch's note on foreign pickle protocols: not ours to show
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 -- one line naming the file
            raise StateDictError(f"{path} cannot be opened with torch.load(weights_only=True), as "
                                 f"genforge opens every weight file (it may hold pickled code, which "
                                 f"genforge never runs): {one_line(err)}") from None
    if not _is_flat(state) and isinstance(state, Mapping):
        for key in nesting_keys:
            if key in state and _is_flat(state[key]):
                state = state[key]
                break
    if not _is_flat(state):
        found = sorted(state)[:8] if isinstance(state, Mapping) else type(state).__name__
        raise StateDictError(f"{path} does not hold a state dict of tensors (top level: {found}; "
                             f"looked under {list(nesting_keys)})")
    prefixes = tuple(strip_prefixes)
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
    """'' when ``given`` has exactly ``expected``'s keys and shapes, else a report of the differences."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(k for k in set(expected) & set(given) if tuple(expected[k].shape) != tuple(given[k].shape))
    parts = []
    if missing:
        parts.append(f"missing ({len(missing)}): {missing[:8]}")
    if unexpected:
        parts.append(f"unexpected ({len(unexpected)}): {unexpected[:8]}")
    if wrong:
        parts.append("shape mismatch: " + ", ".join(
            f"{k} expected {tuple(expected[k].shape)} got {tuple(given[k].shape)}" for k in wrong[:8]))
    return "; ".join(parts)


def load_state_dict_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *,
                           what: str = "checkpoint", error: type[Exception] = StateDictError) -> None:
    """Load ``state`` into ``model`` strictly, raising ``error`` that names every difference."""
    report = state_dict_mismatch(model.state_dict(), state)
    if report:
        raise error(f"{what} does not fit {type(model).__name__}: {report}")
    model.load_state_dict(state, strict=True)
