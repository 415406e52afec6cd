"""Start a fire command so that a user's mistake ends with the list of problems and a non-zero exit, not a traceback.

Input problems (a :class:`~custom_nets.data.datalist.DatalistError`, any other ``ValueError`` naming a file or a
setting, a missing or unreadable path) are printed to stderr, one problem a line, and the process exits with
:data:`USER_ERROR_EXIT`. Anything else is a bug and keeps its traceback. ``CUSTOM_NETS_TRACEBACK=1`` shows the
traceback of input problems too (for bug reports).

Bundles run by MONAI's own ``python -m monai.bundle run`` get the same treatment from
:func:`report_input_errors_without_traceback`, the first ``initialize`` step of every bundle config: MONAI wraps what a
config expression raises in ``RuntimeError: Failed to evaluate ...``, so the hook it installs looks for the input
problem along the exception's causes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import fire

__all__ = [
    "USER_ERRORS",
    "USER_ERROR_EXIT",
    "fire_command",
    "input_error_in",
    "print_problems",
    "problem_lines",
    "report_input_errors_without_traceback",
]

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


def print_problems(error: BaseException) -> None:
    """Print the problems of ``error`` to stderr: ``error:`` and its line, or ``error: N problem(s):``, one a line."""
    lines = problem_lines(error)
    header = f"error: {len(lines)} problem(s):" if len(lines) > 1 else "error:"
    print(header, *(f"  {line}" for line in lines), sep="\n", file=sys.stderr)


def _traceback_wanted() -> bool:
    return os.environ.get("CUSTOM_NETS_TRACEBACK", "") not in ("", "0")


def fire_command(component: Any, argv: Sequence[str] | None = None, name: str | None = None) -> None:
    """``fire.Fire(component)``, turning :data:`USER_ERRORS` into the list of problems on stderr and exit status 1."""
    try:
        fire.Fire(component, command=None if argv is None else list(argv), name=name)
    except USER_ERRORS as error:
        if _traceback_wanted():
            raise
        print_problems(error)
        sys.exit(USER_ERROR_EXIT)


def _raised_by_custom_nets(error: BaseException) -> bool:
    """True when the innermost frame of ``error``'s traceback is code of this package."""
    innermost = error.__traceback__
    if innermost is None:
        return False
    while innermost.tb_next is not None:
        innermost = innermost.tb_next
    module = innermost.tb_frame.f_globals.get("__name__", "")
    return module == "custom_nets" or module.startswith("custom_nets.")


def input_error_in(error: BaseException) -> BaseException | None:
    """The input problem behind ``error``: the first of ``error`` and its causes that is a
    :class:`~custom_nets.data.datalist.DatalistError` or one of :data:`USER_ERRORS` raised by this package (its checks
    name the file and the fix), or ``None``.

    A ``ValueError`` raised inside MONAI, torch or another library is not one: it may be a bug and keeps its traceback.
    """
    from custom_nets.data.datalist import DatalistError

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DatalistError) or (isinstance(current, USER_ERRORS) and _raised_by_custom_nets(current)):
            return current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return None


def report_input_errors_without_traceback() -> None:
    """Make an uncaught input problem end the process with its list of problems on stderr, no traceback.

    Installs a ``sys.excepthook`` (once; it only acts on exceptions nobody caught, so a program or test that runs a
    bundle in-process still gets the exception). The hook prints :func:`print_problems` of :func:`input_error_in`
    when there is one; Python then exits with status 1 (:data:`USER_ERROR_EXIT`). Anything else, or any error with
    ``CUSTOM_NETS_TRACEBACK=1``, goes to the previous hook (the full traceback).
    """
    if getattr(sys.excepthook, "_custom_nets_input_errors", False):
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        problem = None if _traceback_wanted() else input_error_in(error)
        if problem is None:
            previous(kind, error, traceback)
            return
        print_problems(problem)

    hook._custom_nets_input_errors = True  # type: ignore[attr-defined]
    sys.excepthook = hook
