"""Find the checkpoint to resume from in a training output folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["latest_checkpoint"]

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
