"""Check a datalist before training (fire CLI): every file opened with the training readers, all problems at once.

    python -m custom_nets.data.validate_data --path datalist.json [--base_dir DIR] [--keys "['training']"] \
        [--report report.json] [--num_classes K] [--bundle bundles/finetune_heart] [--expected_channels C] \
        [--max_spacing_mm MM] [--max_inplane_anisotropy R] [--max_slice_anisotropy R]

Prints a summary (items per kind and modality, and the warnings), or the list of problems (each missing, corrupt,
NaN-holding or wrongly-dimensioned file with its fix) and exits with status 1, without a traceback. ``--report`` also
writes the outcome as JSON.

What a bundle expects of each image (channel count, spacing, orientation; see :mod:`custom_nets.data.expectations`):
``--bundle`` takes the ``data_expectations`` of a bundle's ``configs/train.json`` (a bundle folder, or the name of one
under this repository's ``bundles/``), exactly as its start-up check does; ``--expected_channels``,
``--max_spacing_mm``, ``--max_inplane_anisotropy`` and ``--max_slice_anisotropy`` set or override single values.
Without either, only what no bundle can use is refused (zero / negative / NaN spacing, a singular or sheared affine, a
voxel side above 20 mm, palette or alpha PNGs).

Pretraining datalists (``image``), segmentation datalists (``image`` + ``label``), detection datalists of
``finetune_cxr`` (``image`` + ``box`` + ``label``; ``--num_classes`` bounds the labels) and the candidate-cube
datalists of ``finetune_nodule`` (folds ``subset<N>``) are all checked. See
:func:`custom_nets.data.datalist.validate_datalist`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from custom_nets.atomic_files import atomic_write_json
from custom_nets.data.datalist import DatalistError, validate_datalist
from custom_nets.data.expectations import DataExpectations

__all__ = ["bundle_expectations", "validate_data", "write_report"]

BUNDLES_DIR = Path(__file__).resolve().parents[2] / "bundles"
"""This repository's bundles, where ``--bundle NAME`` is looked up."""


def bundle_expectations(bundle: str | os.PathLike) -> DataExpectations:
    """The ``data_expectations`` of a bundle's ``configs/train.json`` (``bundle``: its folder, or a folder name under
    :data:`BUNDLES_DIR`), parsed with MONAI's ``ConfigParser`` as the bundle's own start-up check does.

    Raises:
        ValueError: naming the folder when it holds no ``configs/train.json`` with ``data_expectations``.
    """
    from monai.bundle import ConfigParser

    folder = Path(bundle)
    if not folder.is_dir() and (BUNDLES_DIR / str(bundle)).is_dir():
        folder = BUNDLES_DIR / str(bundle)
    config = folder / "configs" / "train.json"
    if not config.is_file():
        known = sorted(p.name for p in BUNDLES_DIR.iterdir() if (p / "configs" / "train.json").is_file())
        raise ValueError(f"{bundle}: not a bundle folder with configs/train.json; give a path or one of {known}")
    parser = ConfigParser()
    parser.read_config(str(config))
    if "data_expectations" not in parser:
        raise ValueError(f"{config}: no data_expectations entry; state the bundle's expectations there")
    return parser.get_parsed_content("data_expectations")


def write_report(report: str | os.PathLike, content: dict[str, Any]) -> Path:
    """Write ``content`` as JSON to ``report`` atomically."""
    return atomic_write_json(report, content)


def validate_data(
    path: str,
    base_dir: str | None = None,
    keys: Sequence[str] | None = None,
    report: str | None = None,
    num_classes: int | None = None,
    bundle: str | None = None,
    expected_channels: int | None = None,
    max_spacing_mm: float | None = None,
    max_inplane_anisotropy: float | None = None,
    max_slice_anisotropy: float | None = None,
) -> dict[str, Any]:
    """:func:`validate_datalist` (``num_classes``: allowed label values of a segmentation or detection datalist)
    against the expectations of ``bundle`` (:func:`bundle_expectations`) and the single values given, with the
    outcome also written to the JSON file ``report`` when given.

    The report holds ``{"datalist", "ok", "summary"}`` for a usable datalist (the summary lists the warnings),
    ``{"datalist", "ok": false, "problems": [one line per problem]}`` otherwise, plus ``"warnings"`` when there are
    any.

    Raises:
        DatalistError: listing every problem, after the report is written.
        ValueError: for a ``bundle`` that is not a bundle folder.
    """
    expectations = bundle_expectations(bundle) if bundle is not None else DataExpectations()
    given = {
        "channels": expected_channels,
        "max_spacing_mm": max_spacing_mm,
        "max_inplane_anisotropy": max_inplane_anisotropy,
        "max_slice_anisotropy": max_slice_anisotropy,
    }
    expectations = dataclasses.replace(expectations, **{k: v for k, v in given.items() if v is not None})
    try:
        summary = validate_datalist(path, base_dir, keys, num_classes, expectations)
    except DatalistError as error:
        if report is not None:
            warnings = {"warnings": error.warnings} if error.warnings else {}
            write_report(report, {"datalist": str(path), "ok": False, "problems": error.problems, **warnings})
        raise
    if report is not None:
        write_report(report, {"datalist": str(path), "ok": True, "summary": summary})
    return summary


if __name__ == "__main__":
    from custom_nets.command_line import fire_command

    fire_command(validate_data)
