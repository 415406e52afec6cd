"""Files that are either written completely or not at all: every output of the package goes through here.

A writer gets a temporary path in the destination folder (:func:`atomic_path`); only when it has finished is the file
flushed to disk (``fsync``) and renamed over the destination with ``os.replace`` (atomic on POSIX), then the folder
is ``fsync``-ed so that the rename survives a power cut. A process killed at any point leaves the old file or the new
one, never a truncated one, plus at worst a hidden ``.<name>.*.tmp<suffix>`` file. Several processes may write the
same destination at once (each has its own temporary name); the last rename wins.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write_text", "atomic_write_json"]


def _format_suffix(path: Path) -> str:
    """The suffix that tells writers the format (``.png``, ``.npy``, ``.nii.gz``), kept on the temporary name."""
    return "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` through; on a clean exit it replaces ``path``, on an exception it is
    deleted and ``path`` is left as it was.

    The temporary file is created empty beside ``path`` (parent folders are made), with the same format suffix, so
    writers that choose the format from the name (``numpy.save``, ``nibabel.save``, PIL, matplotlib) work unchanged.

    Example::

        with atomic_path(output_dir / "overlay.png") as temporary:
            figure.savefig(temporary)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{_format_suffix(path)}", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        _fsync(temporary)
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; outputs are shared like any other file
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, content: Any, indent: int | None = 2) -> Path:
    """Write ``content`` as JSON to ``path`` atomically; returns the path."""
    return atomic_write_text(path, json.dumps(content, indent=indent))
