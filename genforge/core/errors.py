"""One line from an exception, for the one-line errors genforge reports on bad input.

Library errors often span many lines; torch's `weights_only` refusal starts with advice to
re-run with `weights_only=False`, the one thing genforge never does. `one_line` keeps the
line that says what is wrong with the file; `report_error` is how a command prints it.
"""

from __future__ import annotations

import sys

__all__ = ["one_line", "report_error"]

_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation",
                "WeightsUnpickler error:")


def _informative_line(err: BaseException) -> str:
    """The first line of `err`'s message that is not library boilerplate ('' for an empty message)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    informative = [line for line in lines if not line.startswith(_BOILERPLATE)]
    return (informative or lines or [""])[0]


def one_line(err: BaseException) -> str:
    """`"<ExceptionType>: <the informative line>"` of `err`'s message."""
    text = _informative_line(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def report_error(err: BaseException) -> int:
    """Print `error: <the informative line>` of `err` on stderr, a command's report of bad input; returns
    2, the exit status every genforge command gives it."""
    print(f"error: {_informative_line(err) or type(err).__name__}", file=sys.stderr)
    return 2
