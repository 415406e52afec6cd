"""Check a datalist before training (fire CLI): every file opened with the training readers, all problems at once.

    python -m custom_nets.data.validate_data --path datalist.json [--base_dir DIR] [--keys "['training']"] \
        [--report report.json] [--num_classes K]

Prints a summary (items per kind and modality), or the list of problems (each missing, corrupt, NaN-holding or
wrongly-dimensioned file with its fix) and exits with status 1, without a traceback. ``--report`` also writes the
outcome as JSON. Pretraining datalists (``image``), segmentation datalists (``image`` + ``label``), detection datalists
of ``finetune_cxr`` (``image`` + ``box`` + ``label``; ``--num_classes`` bounds the labels) and the candidate-cube
datalists of ``finetune_nodule`` (folds ``subset<N>``) are all checked. See
:func:`custom_nets.data.datalist.validate_datalist`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from custom_nets.atomic_files import atomic_write_json
from custom_nets.data.datalist import DatalistError, validate_datalist

__all__ = ["validate_data", "write_report"]


def write_report(report: str | os.PathLike, content: dict[str, Any]) -> Path:
    """Write ``content`` as JSON to ``report`` atomically."""
    return atomic_write_json(report, content)


def validate_data(
    path: str,
    base_dir: str | None = None,
    keys: Sequence[str] | None = None,
    report: str | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """:func:`validate_datalist` (``num_classes``: allowed label values of a segmentation or detection datalist),
    with the outcome also written to the JSON file ``report`` when given.

    The report holds ``{"datalist", "ok", "summary"}`` for a usable datalist, ``{"datalist", "ok": false,
    "problems": [one line per problem]}`` otherwise.

    Raises:
        DatalistError: listing every problem, after the report is written.
    """
    try:
        summary = validate_datalist(path, base_dir, keys, num_classes)
    except DatalistError as error:
        if report is not None:
            write_report(report, {"datalist": str(path), "ok": False, "problems": error.problems})
        raise
    if report is not None:
        write_report(report, {"datalist": str(path), "ok": True, "summary": summary})
    return summary


if __name__ == "__main__":
    from custom_nets.command_line import fire_command

    fire_command(validate_data)
