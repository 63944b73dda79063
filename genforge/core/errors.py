"""One line from an exception, for the one-line errors genforge reports on bad input.

Library errors often span many lines; torch's `weights_only` refusal starts with advice to
re-run with `weights_only=False`, the one thing genforge never does. `one_line` keeps the
line that says what is wrong with the file.
"""

from __future__ import annotations

__all__ = ["one_line"]

_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation",
                "WeightsUnpickler error:")


def one_line(err: BaseException) -> str:
    """`"<ExceptionType>: <the informative line>"` of `err`'s message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    informative = [line for line in lines if not line.startswith(_BOILERPLATE)]
    text = (informative or lines or [""])[0]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
