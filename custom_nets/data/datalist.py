"""Decathlon-style datalists that mix 2D images and 3D volumes (arXiv 2212.01893, joint image-volume pretraining).

A datalist is a JSON file in the Medical Segmentation Decathlon layout::

    {
        "name": "...",
        "training": [
            {"image": "images/cxr_000.png", "modality": "XR", "kind": "image", "class_label": 2},
            {"image": "volumes/ct_000.nii.gz", "modality": "CT", "kind": "volume"},
            {"image": "volumes/mr_001_dicom", "modality": "MR"}
        ],
        "validation": [...]
    }

Every item needs ``image`` (a file, or a folder holding one DICOM series), relative to ``base_dir`` (by default the
datalist's folder). ``modality`` (CT, MR, XR and their DICOM aliases) selects the intensity normalisation, ``kind`` is
``"image"`` (2D) or ``"volume"`` (3D) and is inferred from the path when absent, ``class_label`` (int) is an optional
hidden class used only by reports. :func:`load_datalist` checks the structure and the paths without opening any image;
:func:`validate_datalist` opens every file with the same readers as training and reports all problems at once.

Paths are joined here instead of with ``monai.data.load_decathlon_datalist`` because the latter also rewrites any
other string value that happens to name an existing path under ``base_dir`` (a folder called ``CT`` would turn the
modality into a path).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from custom_nets.atomic_files import atomic_write_json
from custom_nets.data.expectations import (
    DataExpectations,
    affine_problems,
    dicom_pixel_spacing,
    nifti_header_problems,
    radiograph_spacing_problems,
    raster_mode_problem,
)
from custom_nets.data.intensity import canonical_modality

__all__ = [
    "DatalistError",
    "DatalistProblem",
    "IMAGE_EXTENSIONS",
    "VOLUME_EXTENSIONS",
    "DICOM_EXTENSIONS",
    "KINDS",
    "INFERENCE_KEY",
    "checked_inference_items",
    "file_suffix",
    "infer_kind",
    "is_dicom_file",
    "load_datalist",
    "log_skipped_items",
    "prepare_items",
    "usable_datalist",
    "usable_inference_items",
    "validate_datalist",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""Suffixes of 2D raster images (read with MONAI's ``PILReader``)."""

VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".mhd", ".mha", ".nrrd")
"""Suffixes of volume files (NIfTI with ``NibabelReader``, MetaImage/NRRD with ``ITKReader``)."""

DICOM_EXTENSIONS = (".dcm", ".dicom")
"""Suffixes of single DICOM files (2D images, read with ``ITKReader``)."""

KINDS = ("image", "volume")

logger = logging.getLogger(__name__)


class DatalistError(ValueError):
    """A datalist or one of its files is unusable; the message names every offending file and the fix.

    ``problems`` holds one line per problem (file: what is wrong; fix), ``warnings`` the lines found alongside that
    would not have stopped the run on their own.
    """

    def __init__(self, message: str, problems: Sequence[str] | None = None, warnings: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems) if problems is not None else [message]
        self.warnings = list(warnings)


def file_suffix(path: str | os.PathLike) -> str:
    """Lower-case suffix of ``path``, keeping the double suffix ``.nii.gz``."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a file with the DICOM Part 10 preamble (``DICM`` at byte 128), whatever its name."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def infer_kind(path: str | os.PathLike) -> str:
    """``"image"`` (2D) or ``"volume"`` (3D) from the path alone.

    Folders are DICOM series (volumes); single DICOM files, PNG/JPG and friends are 2D images; NIfTI, MetaImage and
    NRRD files are volumes (give ``kind`` explicitly in the datalist for a 2D NIfTI).

    Raises:
        DatalistError: for a suffix that none of the readers handles.
    """
    path = Path(path)
    if path.is_dir():
        return "volume"
    suffix = file_suffix(path)
    if suffix in IMAGE_EXTENSIONS or suffix in DICOM_EXTENSIONS:
        return "image"
    if suffix in VOLUME_EXTENSIONS:
        return "volume"
    if suffix == "" and is_dicom_file(path):
        return "image"
    known = ", ".join(IMAGE_EXTENSIONS + DICOM_EXTENSIONS + VOLUME_EXTENSIONS)
    raise DatalistError(
        f"{path}: unknown file type {suffix!r}. Supported: {known}, or a folder holding one DICOM series. "
        "Convert the file or remove it from the datalist."
    )


def _item_problems(item: Any, position: int, base_dir: Path) -> tuple[dict | None, list[str]]:
    """Normalise one datalist entry; return it (or None) with the list of problems found."""
    if isinstance(item, str):
        item = {"image": item}
    if not isinstance(item, dict) or "image" not in item:
        return None, [f"item {position}: {item!r} is not a dict with an 'image' key; write {{'image': 'path'}}"]
    if not isinstance(item["image"], (str, os.PathLike)):
        return None, [
            f"item {position}: 'image' must be one path (a file or a DICOM series folder), got {item['image']!r}"
        ]
    out = dict(item)
    path = Path(os.path.expanduser(os.fspath(item["image"])))
    path = path if path.is_absolute() else base_dir / path
    out["image"] = os.fspath(path)
    if not path.exists():
        return None, [f"{path}: file not found (item {position}); fix the path or the base_dir ({base_dir})"]
    problems = []
    if path.is_dir() and not any(is_dicom_file(p) for p in path.iterdir() if p.is_file()):
        problems.append(f"{path}: folder holds no DICOM file; a folder entry must be one DICOM series")
    try:
        kind = infer_kind(path)
    except DatalistError as error:
        return None, [str(error)]
    given_kind = out.get("kind", kind)
    if given_kind not in KINDS:
        problems.append(f"{path}: kind {given_kind!r} is not one of {KINDS}")
    out["kind"] = given_kind
    if out.get("modality") is not None:
        try:
            out["modality"] = canonical_modality(out["modality"])
        except ValueError as error:
            problems.append(f"{path}: {error}")
    label = out.get("class_label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
        problems.append(f"{path}: class_label must be an integer, got {label!r}")
    out["class_label"] = label if isinstance(label, int) and not isinstance(label, bool) else -1
    out["modality"] = out.get("modality")
    return out, problems


def prepare_items(items: Sequence[Any], base_dir: str | os.PathLike, source: str = "datalist") -> list[dict]:
    """Check datalist entries and return them ready for the MONAI transforms.

    Each returned dict holds ``image`` (absolute path), ``kind``, ``modality`` (canonical name or None),
    ``class_label`` (int, -1 when unknown) and ``global_index`` (the position in ``items``). No image is opened.

    Args:
        items: entries as in a decathlon datalist (dicts with ``image``; bare path strings are accepted).
        base_dir: folder that relative paths are joined to.
        source: name used in error messages (the datalist file).

    Raises:
        DatalistError: naming every missing file, unknown suffix, bad kind/modality/class_label, or an empty list.
    """
    if len(items) == 0:
        raise DatalistError(
            f"{source}: the datalist is empty; add items or run `python -m custom_nets.data.make_datalist`"
        )
    base = Path(os.path.expanduser(os.fspath(base_dir)))
    prepared, problems = [], []
    for position, item in enumerate(items):
        out, item_problems = _item_problems(item, position, base)
        problems.extend(item_problems)
        if out is not None:
            out["global_index"] = position
            prepared.append(out)
    if problems:
        raise DatalistError(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems), problems)
    return prepared


def load_datalist(
    path: str | os.PathLike, base_dir: str | os.PathLike | None = None, key: str = "training"
) -> list[dict]:
    """Read the ``key`` list of a decathlon-style datalist JSON and check it with :func:`prepare_items`.

    Args:
        path: the datalist JSON file.
        base_dir: folder that relative image paths are joined to; default: the datalist's folder.
        key: the list to read (``training``, ``validation``, ``testing``...).

    Returns:
        list of dicts with ``image``, ``kind``, ``modality``, ``class_label`` and ``global_index``.

    Raises:
        DatalistError: missing or unreadable JSON, missing key, empty list, or any problem of
            :func:`prepare_items`.
    """
    path = Path(path)
    items = _section(_read_datalist_json(path), path, key)
    return prepare_items(items, path.parent if base_dir is None else base_dir, source=f"{path} [{key}]")


def _read_datalist_json(path: Path) -> Any:
    if not path.is_file():
        raise DatalistError(
            f"{path}: datalist file not found; create one with `python -m custom_nets.data.make_datalist`"
        )
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatalistError(f"{path}: not a readable JSON datalist ({error}); fix or regenerate it") from error


def _section(content: Any, path: Path, key: str) -> list:
    """The ``key`` list of a datalist's content; a :class:`DatalistError` when it is missing or not a list."""
    if not isinstance(content, dict) or key not in content:
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise DatalistError(f"{path}: no {key!r} list (found {keys}); pass the right key or regenerate the datalist")
    if not isinstance(content[key], list):
        raise DatalistError(f"{path}: {key!r} must be a list of items, got {type(content[key]).__name__}")
    return content[key]


def _is_segmentation_list(items: Any) -> bool:
    return isinstance(items, list) and bool(items) and isinstance(items[0], dict) and "label" in items[0]


def _is_detection_list(items: Any) -> bool:
    return isinstance(items, list) and bool(items) and isinstance(items[0], dict) and "box" in items[0]


def _is_candidate_datalist(content: Any) -> bool:
    """A datalist of candidate cubes written by ``custom_nets.datasets.luna16.prepare`` (folds ``subset<N>``)."""
    return isinstance(content, dict) and "cube_size" in content and "scans" in content


def _default_keys(content: Any) -> list[str]:
    lists = content if isinstance(content, dict) else {}
    if _is_candidate_datalist(content):
        folds = [k for k in lists if k.startswith("subset") and k[6:].isdigit() and isinstance(lists[k], list)]
        return sorted(folds, key=lambda k: int(k[6:]))
    return [k for k in ("training", "validation", "testing", "test") if isinstance(lists.get(k), list)]


class DatalistProblem(NamedTuple):
    """One line of a datalist check and the items it makes unusable, as ``(list key, position)`` pairs; no item
    (an empty fold, a missing list) means the datalist as a whole is at fault and no item can be left out instead."""

    line: str
    items: tuple[tuple[str, int], ...] = ()


@dataclass
class _Findings:
    """What :func:`_check_datalist` found: items per kind and modality, problems, warnings (listed, not stopping the
    run), and where each file is listed."""

    kinds: Counter = field(default_factory=Counter)
    modalities: Counter = field(default_factory=Counter)
    problems: list[DatalistProblem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    listed: dict[str, list[tuple[str, int]]] = field(default_factory=dict)

    def add(
        self, key: str, position: int, files: Sequence[str], lines: Sequence[str], warnings: Sequence[str] = ()
    ) -> None:
        self.problems.extend(DatalistProblem(f"[{key}] {line}", ((key, position),)) for line in lines)
        self.warnings.extend(f"[{key}] {line}" for line in warnings)
        for file in files:
            self.listed.setdefault(file, []).append((key, position))


def _pretraining_item_findings(item: dict, expectations: DataExpectations) -> tuple[list[str], list[str]]:
    """Read one pretraining item as in training and check it against ``expectations``: ``(problems, warnings)``.

    NIfTI geometry comes from the header as stored, raster images are checked for palette / alpha modes before the
    read, a 2D DICOM's pixel size from its ``PixelSpacing`` / ``ImagerPixelSpacing`` after it reads
    (:func:`~custom_nets.data.expectations.radiograph_spacing_problems`); other volumes (DICOM series, MetaImage) are
    checked on the affine of the array read here."""
    from custom_nets.data.loading import load_item_array

    image = item["image"]
    suffix = "" if Path(image).is_dir() else file_suffix(image)
    if suffix in IMAGE_EXTENSIONS:
        mode = raster_mode_problem(image, expectations)
        if mode is not None:
            return [mode], []
    header = nifti_header_problems(image, expectations) if suffix in (".nii", ".nii.gz") else None
    if header is not None and header.errors:
        return header.errors, header.warnings
    try:
        array = load_item_array(item, reject_constant=True)
    except Exception as error:  # every reader failure becomes one line of the report
        return [str(error) if image in str(error) else f"{image}: {error}"], []
    if item["kind"] == "image" and (suffix in DICOM_EXTENSIONS or is_dicom_file(image)):
        spacing = radiograph_spacing_problems(dicom_pixel_spacing(image), image, expectations)
        return spacing.errors, spacing.warnings
    if header is not None or item["kind"] != "volume" or not hasattr(array, "affine"):
        return [], header.warnings if header is not None else []
    geometry = affine_problems(array.affine.numpy(), image, expectations)
    return geometry.errors, geometry.warnings


def _check_pretraining_list(
    findings: _Findings,
    content: Any,
    path: Path,
    base_dir: str | os.PathLike | None,
    key: str,
    read_all: bool,
    expectations: DataExpectations,
) -> None:
    """Items of a pretraining list: paths, kind, modality (:func:`_item_problems`), then each file read as in training
    and checked against ``expectations``.

    Without ``read_all`` no file is read once an item has a path problem (a wrong ``base_dir`` fails every item fast).
    """
    try:
        items = _section(content, path, key)
    except DatalistError as error:
        findings.problems.append(DatalistProblem(f"[{key}] {error}"))
        return
    if not items:
        findings.problems.append(
            DatalistProblem(
                f"[{key}] {path} [{key}]: the datalist is empty; add items or run "
                "`python -m custom_nets.data.make_datalist`"
            )
        )
        return
    base = Path(os.path.expanduser(os.fspath(path.parent if base_dir is None else base_dir)))
    problems_before = len(findings.problems)
    readable = []
    for position, raw in enumerate(items):
        item, lines = _item_problems(raw, position, base)
        findings.add(key, position, [], lines)
        if item is None:
            continue
        findings.kinds[item["kind"]] += 1
        findings.modalities[item["modality"] or "unspecified"] += 1
        findings.listed.setdefault(str(Path(item["image"]).resolve()), []).append((key, position))
        if not lines:
            readable.append((position, item))
    if len(findings.problems) > problems_before and not read_all:
        return
    for position, item in readable:
        findings.add(key, position, [], *_pretraining_item_findings(item, expectations))


def _check_datalist(
    path: Path,
    content: Any,
    base_dir: str | os.PathLike | None,
    keys: Sequence[str],
    num_classes: int | None,
    read_all: bool = False,
    expectations: DataExpectations | None = None,
) -> _Findings:
    """Every problem of the ``keys`` lists, each with the items it concerns (see :func:`validate_datalist`)."""
    from custom_nets.data.segmentation import segmentation_item_problems
    from custom_nets.datasets.luna16 import candidate_datalist_problems
    from custom_nets.datasets.vindr_cxr import detection_item_problems

    expectations = DataExpectations() if expectations is None else expectations

    base = Path(path.parent if base_dir is None else base_dir)
    findings = _Findings()
    for key in keys:
        if _is_candidate_datalist(content):
            files, problems, count = candidate_datalist_problems(
                content, [key], base, source=str(path), expectations=expectations
            )
            findings.kinds["candidate cube"] += count
            findings.problems.extend(DatalistProblem(line, tuple(items)) for line, items in problems)
            for file, *where in files:
                findings.listed.setdefault(file, []).append(tuple(where))
        elif isinstance(content, dict) and _is_detection_list(content.get(key)):
            for position, item in enumerate(content[key]):
                findings.kinds["image+boxes"] += 1
                findings.add(key, position, *detection_item_problems(item, position, base, num_classes, expectations))
        elif isinstance(content, dict) and _is_segmentation_list(content.get(key)):
            for position, item in enumerate(content[key]):
                findings.kinds["image+label"] += 1
                findings.add(
                    key, position, *segmentation_item_problems(item, position, base, num_classes, expectations)
                )
        else:
            _check_pretraining_list(findings, content, path, base_dir, key, read_all, expectations)
    for file, where in findings.listed.items():
        if len(where) > 1:
            findings.problems.append(
                DatalistProblem(
                    f"{file}: listed {len(where)} times (in {', '.join(sorted({key for key, _ in where}))}); a "
                    "duplicate weighs twice in training and leaks between splits: keep one entry",
                    tuple(where[1:]),
                )
            )
    return findings


def validate_datalist(
    path: str | os.PathLike,
    base_dir: str | os.PathLike | None = None,
    keys: Sequence[str] | None = None,
    num_classes: int | None = None,
    expectations: DataExpectations | None = None,
) -> dict[str, Any]:
    """Open every file of a datalist with the training readers and report all problems in one error.

    Checks, per item of a pretraining datalist: the file exists and has a known type, its header announces a sane
    size, the reader can open it (corrupt files), a DICOM series folder has no gap, duplicate or mixed series, the
    image has the dimensionality of its ``kind`` (2D image or 3D volume; a 4D file is refused), it is not empty or
    constant, it holds no NaN/inf value, and a 2D DICOM has a sane pixel spacing. The fine-tuning datalists are
    recognised by their content and checked item by item with their bundle's reader:

    * segmentation (items with a ``label`` file):
      :func:`custom_nets.data.segmentation.segmentation_item_problems` (same grid, finite image, label values in
      ``0..num_classes - 1``);
    * detection (items with ``box``, ``finetune_cxr``): :func:`custom_nets.datasets.vindr_cxr.detection_item_problems`
      (one grayscale frame, finite, boxes inside the image, labels in ``0..num_classes - 1``);
    * candidate cubes (``cube_size`` and ``scans`` entries, folds ``subset<N>``, ``finetune_nodule``):
      :func:`custom_nets.datasets.luna16.candidate_datalist_problems` (cube shape and values, labels 0 / 1, the
      candidate inside its scan, no empty fold).

    A file listed more than once (in one list or across lists) is reported too. Every image is also checked against
    the bundle's ``expectations`` (channel count, spacing, a usable orientation; see
    :mod:`custom_nets.data.expectations`): without them, only what no bundle can use (a zero, negative or NaN
    spacing, a singular or sheared affine, a voxel side above 20 mm, palette / alpha PNGs) is refused.

    Args:
        path: the datalist JSON file.
        base_dir: folder that relative image paths are joined to; default: the datalist's folder.
        keys: lists to check; default: every list-valued key among ``training``, ``validation``, ``testing``, ``test``
            (for a candidate datalist: every ``subset<N>`` fold).
        num_classes: for segmentation and detection datalists, the number of classes allowed (label values
            ``0..num_classes - 1``); ``None`` only requires non-negative integers.
        expectations: what the bundle expects of each image (:class:`~custom_nets.data.expectations.DataExpectations`).

    Returns:
        a summary ``{"items": n, "kinds": {...}, "modalities": {...}, "keys": [...], "warnings": [...]}`` when
        everything is usable; the warnings (e.g. thick slices) are also logged.

    Raises:
        DatalistError: listing every problem (one line per file) with its fix, and the warnings.
    """
    path = Path(path)
    content = _read_datalist_json(path)
    if keys is None:
        keys = _default_keys(content)
        if not keys:
            raise DatalistError(f"{path}: no 'training', 'validation' or 'testing' list; regenerate the datalist")
    findings = _check_datalist(path, content, base_dir, keys, num_classes, expectations=expectations)
    _log_warnings(path, findings.warnings)
    if findings.problems:
        problems = [problem.line for problem in findings.problems]
        raise DatalistError(
            f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems), problems, findings.warnings
        )
    return {
        "items": sum(findings.kinds.values()),
        "kinds": dict(findings.kinds),
        "modalities": dict(findings.modalities),
        "keys": list(keys),
        "warnings": findings.warnings,
    }


def _log_warnings(path: Path, warnings: Sequence[str]) -> None:
    if warnings:
        logger.warning("%s: %d warning(s):\n  %s", path, len(warnings), "\n  ".join(warnings))


def _with_absolute_paths(item: Any, base: Path) -> Any:
    """``item`` with its files (``image``: a path or a list of channel paths; a ``label`` file) joined to ``base``; a
    bare path (a pretraining item) becomes ``{"image": path}``."""
    if isinstance(item, str):
        item = {"image": item}
    if not isinstance(item, dict):
        return item
    out = dict(item)
    for name in ("image", "label"):
        value = out.get(name)
        if isinstance(value, str):
            out[name] = os.path.abspath(base / os.path.expanduser(value))
        elif name == "image" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            out[name] = [os.path.abspath(base / os.path.expanduser(v)) for v in value]
    return out


def usable_datalist(
    path: str | os.PathLike,
    base_dir: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    skip_bad: bool = False,
    keys: Sequence[str] | None = ("training",),
    num_classes: int | None = None,
    expectations: DataExpectations | None = None,
    doing: str = "training on",
) -> str:
    """The start-up check of a run over a datalist (training; pretrain_joint's embedding inference too): the datalist
    to use.

    Without ``skip_bad``: :func:`validate_datalist` of the ``keys`` lists (``None``: its default lists) against the
    bundle's ``expectations``, then ``path`` itself. With ``skip_bad`` every item is checked the same way (all of
    them read) and the items that a problem makes unusable (an unreadable file, a label out of range, a wrong channel
    count, a broken affine, a box outside its image, the second entry of a duplicate...) are left out:
    the rest is written to ``<output_dir>/datalist_usable.json`` (files as absolute paths, other fields and keys
    kept), whose path is returned, the skipped items with their problems to
    ``<output_dir>/skipped_items.json``, and a warning lists them (``path`` itself when nothing is skipped; see
    :func:`log_skipped_items` to list them again when the run ends). ``doing`` names the run in that warning
    (``"training on"``, ``"embedding"``).

    Raises:
        DatalistError: an unreadable datalist, a bad item without ``skip_bad``, a problem of the datalist as a whole
            (a missing list or an empty fold), or a list left without any usable item.
    """
    path = Path(path)
    if not skip_bad:
        validate_datalist(path, base_dir, keys=keys, num_classes=num_classes, expectations=expectations)
        return str(path)
    content = _read_datalist_json(path)
    keys = _default_keys(content) if keys is None else list(keys)
    findings = _check_datalist(path, content, base_dir, keys, num_classes, read_all=True, expectations=expectations)
    _log_warnings(path, findings.warnings)
    fatal = [problem.line for problem in findings.problems if not problem.items]
    bad: dict[tuple[str, int], list[str]] = {}
    for problem in findings.problems:
        for key, position in problem.items:
            bad.setdefault((key, position), []).append(problem.line.removeprefix(f"[{key}] "))
    if not fatal and not bad:
        (Path(output_dir) / "skipped_items.json").unlink(missing_ok=True)  # the report of an earlier run
        return str(path)
    base = Path(path.parent if base_dir is None else base_dir)
    usable = {}
    for key in [] if fatal else keys:
        usable[key] = [_with_absolute_paths(item, base) for i, item in enumerate(content[key]) if (key, i) not in bad]
        if not usable[key]:
            fatal.append(f"{path} [{key}]: no usable item left ({len(content[key])} bad)")
    if fatal:
        lines = fatal + [f"[{key}] {line}" for key, position in sorted(bad) for line in bad[(key, position)]]
        raise DatalistError(f"{path}: {len(lines)} problem(s):\n  " + "\n  ".join(lines), lines)
    skipped = [
        {"key": key, "position": position, "item": content[key][position], "problem": "; ".join(bad[(key, position)])}
        for key, position in sorted(bad, key=lambda where: (keys.index(where[0]), where[1]))
    ]
    output = Path(output_dir)
    usable_path = output / "datalist_usable.json"
    atomic_write_json(usable_path, {**content, **usable})
    total = sum(len(content[key]) for key in keys)
    _write_skipped_report(output, str(path), keys, skipped, total, doing)
    return str(usable_path)


def checked_inference_items(
    items: Sequence[Any],
    image_problems: Callable[[Any, int, str, DataExpectations], tuple[list[str], list[str]]],
    expectations: DataExpectations | None = None,
    skip_bad: bool = False,
    output_dir: str | os.PathLike | None = None,
    source: str = "the inference inputs",
) -> list[Any]:
    """The start-up check of an inference or evaluation run on images without labels: every item of ``items`` (as
    the bundle's inference config lists them, paths resolved) is checked with ``image_problems(item, position,
    base_dir, expectations)``, the bundle's image-only check (e.g.
    :func:`custom_nets.data.segmentation.segmentation_image_problems`), against the same ``expectations`` as its
    training; warnings are logged. Returns the items to infer: all of them, or with ``skip_bad`` those without a
    problem (see :func:`usable_inference_items`; ``source`` names where they came from in its report).

    Raises:
        DatalistError: listing every problem, one line per file, each with its fix (with ``skip_bad``: only when no
            item is left).
    """
    expectations = DataExpectations() if expectations is None else expectations
    problems: list[DatalistProblem] = []
    warnings: list[str] = []
    for position, item in enumerate(items):
        lines, notes = image_problems(item, position, "", expectations)
        problems += [DatalistProblem(line, ((INFERENCE_KEY, position),)) for line in lines]
        warnings += notes
    return usable_inference_items(items, problems, warnings, skip_bad, output_dir, source)


INFERENCE_KEY = "inference"
"""The list name under which :func:`usable_inference_items` reports (and :func:`log_skipped_items` lists) skipped
inference inputs."""


def usable_inference_items(
    items: Sequence[Any],
    problems: Sequence[DatalistProblem],
    warnings: Sequence[str] = (),
    skip_bad: bool = False,
    output_dir: str | os.PathLike | None = None,
    source: str = "the inference inputs",
) -> list[Any]:
    """What an inference run goes on with once its inputs are checked: ``items`` when there is no problem.

    ``problems`` name the items they make unusable as ``(INFERENCE_KEY, position in items)``; a problem without
    items (an unreadable scan, a missing candidates file) concerns the input as a whole. Without ``skip_bad`` any
    problem stops the run. With ``skip_bad`` the unusable items are left out: they are listed in a warning and, with
    their problems, in ``<output_dir>/skipped_items.json`` (the same report as :func:`usable_datalist`'s, so
    :func:`log_skipped_items` lists them again when the run ends), and the others are returned.

    Raises:
        DatalistError: every problem, one line each, without ``skip_bad``; with it, a problem of the input as a whole
            or no item left.
    """
    if warnings:
        logger.warning("%s: %d warning(s):\n  %s", source, len(warnings), "\n  ".join(warnings))
    fatal = [problem.line for problem in problems if not problem.items]
    bad: dict[int, list[str]] = {}
    for problem in problems:
        for _, position in problem.items:
            bad.setdefault(position, []).append(problem.line)
    if output_dir is not None:
        (Path(output_dir) / "skipped_items.json").unlink(missing_ok=True)  # the report of an earlier run
    if not problems:
        return list(items)
    if skip_bad and not fatal and len(bad) == len(items):
        fatal.append(f"{source}: no usable item left ({len(items)} bad)")
    if not skip_bad or fatal:
        lines = fatal + [line for position in sorted(bad) for line in bad[position]]
        raise DatalistError(f"{len(lines)} problem(s) with {source}:\n  " + "\n  ".join(lines), lines, warnings)
    if output_dir is None:
        raise ValueError("skip_bad needs an output_dir to write skipped_items.json to")
    skipped = [
        {"key": INFERENCE_KEY, "position": position, "item": _jsonable(items[position]), "problem": "; ".join(lines)}
        for position, lines in sorted(bad.items())
    ]
    _write_skipped_report(Path(output_dir), source, [INFERENCE_KEY], skipped, len(items), "inferring")
    return [item for position, item in enumerate(items) if position not in bad]


def _jsonable(item: Any) -> Any:
    """``item`` for a JSON report: paths as strings, arrays (e.g. a cut cube) left out."""
    if isinstance(item, Mapping):
        return {str(k): _jsonable(v) for k, v in item.items() if not hasattr(v, "shape")}
    if isinstance(item, (list, tuple)):
        return [_jsonable(v) for v in item]
    return str(item) if isinstance(item, os.PathLike) else item


def _write_skipped_report(
    output: Path, source: str, keys: Sequence[str], skipped: Sequence[Mapping[str, Any]], total: int, doing: str
) -> Path:
    """Write ``skipped_items.json`` under ``output`` and warn with its lines; returns the report's path."""
    report = output / "skipped_items.json"
    atomic_write_json(report, {"datalist": source, "keys": list(keys), "skipped": list(skipped)})
    logger.warning(
        "skip_bad: %s %d of %d items of %s; skipped (also in %s):\n  %s",
        doing,
        total - len(skipped),
        total,
        source,
        report,
        "\n  ".join(_skipped_lines(skipped)),
    )
    return report


def _skipped_lines(skipped: Sequence[Mapping[str, Any]]) -> list[str]:
    return [f"[{entry['key']}] item {entry['position']}: {entry['problem']}" for entry in skipped]


def log_skipped_items(output_dir: str | os.PathLike) -> list[str]:
    """List again, when the run ends, the items :func:`usable_datalist` left out (``skipped_items.json`` under
    ``output_dir``; nothing when no item was skipped). Returns the lines logged."""
    report = Path(output_dir) / "skipped_items.json"
    if not report.is_file():
        return []
    content = json.loads(report.read_text())
    lines = _skipped_lines(content["skipped"])
    logger.warning(
        "skip_bad: %d item(s) of %s were left out of this run (listed in %s):\n  %s",
        len(lines),
        content["datalist"],
        report,
        "\n  ".join(lines),
    )
    return lines
