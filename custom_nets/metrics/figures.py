"""PNG figures of the reports: a headless pyplot and an atomic save.

Every plot of the project (embedding PCA, label-efficiency curve, effective-rank curve, segmentation overlays) goes
through :func:`save_figure`, so a crash or a kill while writing never leaves a half-written PNG in place of an earlier
one.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from custom_nets.atomic_files import atomic_path

__all__ = ["pyplot", "save_figure"]


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str | Path, dpi: int = 110) -> Path:
    """Write ``figure`` to ``path`` (PNG; parent folders created) through a temporary file renamed into place, then
    close it; returns the path."""
    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, dpi=dpi)
    finally:
        pyplot().close(figure)
    return Path(path)
