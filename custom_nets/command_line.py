"""Start a fire command so that a user's mistake ends with the list of problems and a non-zero exit, not a traceback.

Input problems (a :class:`~custom_nets.data.datalist.DatalistError`, any other ``ValueError`` naming a file or a
setting, a missing or unreadable path) are printed to stderr, one problem a line, and the process exits with
:data:`USER_ERROR_EXIT`. Anything else is a bug and keeps its traceback. ``CUSTOM_NETS_TRACEBACK=1`` shows the
traceback of input problems too (for bug reports).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import fire

__all__ = ["USER_ERRORS", "USER_ERROR_EXIT", "fire_command", "problem_lines"]

USER_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)
"""Exception types that mean bad input or settings (``DatalistError`` is a ``ValueError``)."""

USER_ERROR_EXIT = 1
"""Exit status of a command stopped by bad input (fire itself exits with 2 for unknown flags)."""


def problem_lines(error: BaseException) -> list[str]:
    """One line per problem: ``error.problems`` of a ``DatalistError``, else the message's lines."""
    problems = getattr(error, "problems", None)
    if problems:
        return [str(problem) for problem in problems]
    return str(error).splitlines() or [type(error).__name__]


def fire_command(component: Any, argv: Sequence[str] | None = None, name: str | None = None) -> None:
    """``fire.Fire(component)``, turning :data:`USER_ERRORS` into the list of problems on stderr and exit status 1."""
    try:
        fire.Fire(component, command=None if argv is None else list(argv), name=name)
    except USER_ERRORS as error:
        if os.environ.get("CUSTOM_NETS_TRACEBACK", "") not in ("", "0"):
            raise
        lines = problem_lines(error)
        header = f"error: {len(lines)} problem(s):" if len(lines) > 1 else "error:"
        print(header, *(f"  {line}" for line in lines), sep="\n", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
