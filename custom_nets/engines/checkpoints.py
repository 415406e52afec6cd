"""Checkpoints that survive a crash, and finding the one to resume from.

:class:`AtomicCheckpointSaver` is MONAI's ``CheckpointSaver`` with every file written to a temporary name, ``fsync``-ed
and renamed into place (:func:`atomic_torch_save`), and superseded files deleted only after their successor exists;
:func:`latest_checkpoint` picks the newest one in an output folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from custom_nets.weights import atomic_torch_save

__all__ = ["AtomicCheckpointSaver", "AtomicDiskSaver", "atomic_torch_save", "latest_checkpoint"]

_NUMBERED = re.compile(r"=(\d+)\.pt$")


def latest_checkpoint(output_dir: str | os.PathLike) -> str:
    """The newest training checkpoint in ``output_dir``: ``model_final.pt`` of a finished run, else the numbered
    ``*=<epoch or iteration>.pt`` file (CheckpointSaver's naming) with the highest number.

    Raises:
        FileNotFoundError: no checkpoint there; the message tells how to start instead.
    """
    folder = Path(output_dir)
    numbered = sorted(
        (int(match.group(1)), path)
        for path in folder.glob("*.pt")
        if (match := _NUMBERED.search(path.name)) is not None
    )
    candidates = [path for _, path in numbered]
    final = folder / "model_final.pt"
    if final.is_file():  # a finished run, or one resumed after finishing: the newest file wins
        candidates.append(final)
        candidates.sort(key=lambda path: path.stat().st_mtime_ns)
    if not candidates:
        raise FileNotFoundError(
            f"resume is true but {folder} holds no checkpoint (*=N.pt or model_final.pt). "
            "Start without --resume, or point output_dir at the folder of the run to continue."
        )
    return str(candidates[-1])


class AtomicDiskSaver(BaseSaveHandler):
    """ignite save handler that writes with :func:`atomic_torch_save` and deletes superseded files only afterwards.

    ignite's ``Checkpoint`` asks its handler to remove the oldest file *before* saving the new one, and MONAI's
    ``CheckpointSaver`` writes in place (``DiskSaver(atomic=False)``): a run killed in between would keep no valid
    checkpoint. Here ``remove`` only marks a file; it is deleted once the next save has been renamed into place.

    Args:
        dirname: folder of the checkpoints (created if missing, by the saving process only).
        filename: fixed file name that replaces ignite's (MONAI's ``final_filename`` / ``key_metric_filename``).
        save_on_rank: the only process that writes (the others ignore the calls, and create no folder: ignite's
            ``DiskSaver``, which MONAI builds first, creates it on that rank with a check-then-``mkdir`` that fails
            when another rank creates the folder in between: ``FileExistsError`` on rank 0 in one of 15 two-process
            runs of finetune_heart with another process busy on one of the 2 cores).
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None, save_on_rank: int = 0) -> None:
        self.dirname = Path(dirname)
        if idist.get_rank() == save_on_rank:
            self.dirname.mkdir(parents=True, exist_ok=True)
        self.filename = filename
        self.save_on_rank = save_on_rank
        self._superseded: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if idist.get_rank() != self.save_on_rank:
            return
        name = self.filename or filename
        atomic_torch_save(checkpoint, self.dirname / name)
        for old in self._superseded:
            if old != name:
                (self.dirname / old).unlink(missing_ok=True)
        self._superseded = []

    def remove(self, filename: str) -> None:
        if idist.get_rank() == self.save_on_rank:
            self._superseded.append(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's :class:`~monai.handlers.CheckpointSaver` (same arguments and file names) writing through
    :class:`AtomicDiskSaver`: every checkpoint is replaced atomically and a superseded one is deleted only after its
    successor is complete, so a killed run always leaves loadable checkpoints."""

    def __init__(self, save_dir: str, save_dict: dict, **kwargs: Any) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        fixed_names = {
            "_final_checkpoint": kwargs.get("final_filename"),
            "_key_metric_checkpoint": kwargs.get("key_metric_filename"),
            "_interval_checkpoint": None,
        }
        for attribute, filename in fixed_names.items():  # the three ignite Checkpoint objects MONAI builds
            checkpoint = getattr(self, attribute)
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(save_dir, filename=filename)
