"""LUNA16 preparation for the nodule false-positive-reduction bundle (arXiv 2212.01893, METHOD.md section 4).

LUNA16 ships 888 CT scans as MetaImage ``<seriesuid>.mhd`` + ``.raw`` in folders ``subset0`` ... ``subset9`` (a DICOM
series folder in a subset folder is read too, its seriesuid taken from its SeriesInstanceUID) and CSV
files of world coordinates in mm: ``candidates_V2.csv`` (seriesuid, coordX, coordY, coordZ, class), ``annotations.csv``
(seriesuid, coordX, coordY, coordZ, diameter_mm) and ``annotations_excluded.csv`` (findings that neither count as a
nodule nor as a false positive). The coordinates are the physical space of the .mhd header, which is ITK's: LPS, with
``index = D^-1 (p - origin) / spacing`` (``D`` the direction matrix, its columns the voxel axes). MONAI's ITKReader
converts the same header to a RAS affine (x and y negated); this module never goes through RAS, so LUNA16's numbers
are used as they are.

Preparation cuts one cube per candidate, ``cube_size`` = (slices, rows, columns) voxels (default 32 x 64 x 64) at
``spacing_mm`` (same order, default 1 mm), centred on the candidate and aligned with the scan's own voxel axes (the
slices of the cube are axial slices of the scan), by trilinear interpolation; outside the scan it reads air (-1024 HU).
Cubes are stored as int16 Hounsfield units in ``<out_dir>/cubes/<seriesuid>/<row>.npy`` (``row``: the candidate's row in
the candidates file) and reused on later runs, so they are cut once. The datalist keeps one key per subset
(``subset0`` ... ``subset9``): the ten subsets are the cross-validation folds, chosen by key in the bundle.

CLI (fire)::

    python -m custom_nets.cli prepare_luna16 --src_dir /data/LUNA16 --out_dir /data/luna16_prepared
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from custom_nets.atomic_files import atomic_path, atomic_write_json
from custom_nets.data.datalist import INFERENCE_KEY, DatalistProblem, usable_inference_items
from custom_nets.data.expectations import DataExpectations, GeometryFindings, affine_problems
from custom_nets.data.segmentation import select_label_fraction

__all__ = [
    "AIR_HU",
    "annotation_file",
    "ScanGeometry",
    "candidate_cube",
    "candidate_datalist_problems",
    "check_inside",
    "check_prepared",
    "checked_scan_candidates",
    "class_balanced_weights",
    "cube_index_grid",
    "fold_keys",
    "load_folds",
    "prepare",
    "read_candidates_csv",
    "read_scan",
    "scan_candidates",
    "scan_geometry",
    "scan_inference_problems",
    "scan_ids",
    "scan_seriesuid",
    "select_fraction_per_class",
    "voxel_to_world",
    "world_to_voxel",
]

logger = logging.getLogger(__name__)

AIR_HU = -1024.0
CANDIDATE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ")
_SCAN_SUFFIXES = (".mhd", ".mha", ".nii.gz", ".nii", ".nrrd")  # seriesuids hold dots: strip only these
_SUBSET_PATTERN = re.compile(r"^subset(\d+)$")


@dataclass(frozen=True)
class ScanGeometry:
    """The MetaImage header of a scan, in ITK's (LPS) convention.

    Attributes:
        origin: world position (mm) of voxel index (0, 0, 0), ``(3,)`` x, y, z.
        spacing: voxel size (mm) along the index axes i, j, k, ``(3,)``.
        direction: ``(3, 3)``; column ``a`` is the world direction of index axis ``a``.
        size: voxels along i, j, k (the numpy array of the scan is ``(k, j, i)``).
    """

    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray
    size: tuple[int, int, int]


def world_to_voxel(world: np.ndarray, geometry: ScanGeometry) -> np.ndarray:
    """World points ``(..., 3)`` (x, y, z mm, LPS as in LUNA16's CSV files) -> continuous voxel indices ``(..., 3)``
    in (i, j, k) order (index into the numpy array as ``[k, j, i]``)."""
    offset = np.asarray(world, dtype=np.float64) - geometry.origin
    return (offset @ np.linalg.inv(geometry.direction).T) / geometry.spacing


def voxel_to_world(index: np.ndarray, geometry: ScanGeometry) -> np.ndarray:
    """Continuous voxel indices ``(..., 3)`` (i, j, k) -> world points ``(..., 3)`` (x, y, z mm, LPS)."""
    return (np.asarray(index, dtype=np.float64) * geometry.spacing) @ geometry.direction.T + geometry.origin


def scan_seriesuid(path: str | os.PathLike) -> str:
    """The seriesuid of a scan: the SeriesInstanceUID of a DICOM series folder, else the file name without its suffix
    (LUNA16 names ``<seriesuid>.mhd``; seriesuids hold dots, so only known image suffixes are stripped).

    Raises:
        ValueError: naming the folder when it holds no ``.dcm`` file or more than one series.
    """
    path = Path(path)
    if not path.is_dir():
        return next((path.name[: -len(x)] for x in _SCAN_SUFFIXES if path.name.endswith(x)), path.name)
    import pydicom

    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for f in sorted(path.glob("*.dcm"))}
    if len(uids) != 1:
        raise ValueError(f"{path}: a DICOM scan folder needs the .dcm files of exactly one series, found {len(uids)}.")
    return uids.pop()


def read_scan(path: str | os.PathLike) -> tuple[np.ndarray, ScanGeometry]:
    """Read a CT scan, a MetaImage (or any ITK-readable file) or a DICOM series folder (one series, rescaled to HU by
    ITK): array ``(k, j, i)`` in HU and its header geometry.

    Raises:
        RuntimeError: naming the file when ITK cannot read it (e.g. a missing or truncated ``.raw``), or when it is
            not a 3D single-channel image.
    """
    import itk

    try:
        image = itk.imread(str(path))
    except Exception as error:  # ITK raises plain RuntimeErrors with C++ text: name the file
        raise RuntimeError(
            f"could not read the scan {path}: {error}. Is its .raw file next to it and complete?"
        ) from None
    if image.GetImageDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise RuntimeError(f"{path}: expected a 3D single-channel CT scan, got {image.GetImageDimension()}D.")
    array = itk.array_from_image(image)  # a copy: a view would dangle once the ITK image is freed
    geometry = ScanGeometry(
        origin=np.array(image.GetOrigin(), dtype=np.float64),
        spacing=np.array(image.GetSpacing(), dtype=np.float64),
        direction=np.array(itk.array_from_matrix(image.GetDirection()), dtype=np.float64),
        size=tuple(int(s) for s in reversed(array.shape)),
    )
    return array, geometry


def scan_geometry(path: str | os.PathLike) -> ScanGeometry:
    """The geometry of a scan from its header only (ITK's ImageIO, no voxel read); a DICOM series folder is read
    whole with :func:`read_scan` (ITK gives its geometry only after sorting the slices).

    Raises:
        RuntimeError: naming the file when ITK cannot read its header, or when it is not a 3D single-channel image.
    """
    import itk

    path = Path(path)
    if path.is_dir():
        return read_scan(path)[1]
    io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise RuntimeError(f"could not read the scan header of {path}: not an image format ITK knows.")
    io.SetFileName(str(path))
    try:
        io.ReadImageInformation()
    except Exception as error:  # ITK raises plain RuntimeErrors with C++ text: name the file
        raise RuntimeError(f"could not read the scan header of {path}: {error}") from None
    if io.GetNumberOfDimensions() != 3 or io.GetNumberOfComponents() != 1:
        raise RuntimeError(f"{path}: expected a 3D single-channel CT scan, got {io.GetNumberOfDimensions()}D.")
    return ScanGeometry(
        origin=np.array([io.GetOrigin(a) for a in range(3)], dtype=np.float64),
        spacing=np.array([io.GetSpacing(a) for a in range(3)], dtype=np.float64),
        direction=np.array([io.GetDirection(a) for a in range(3)], dtype=np.float64).T,
        size=tuple(int(io.GetDimensions(a)) for a in range(3)),
    )


def check_inside(index: np.ndarray, geometry: ScanGeometry, where: str) -> None:
    """Raise a ``ValueError`` (naming ``where``) unless the continuous voxel index ``(3,)`` lies inside the scan."""
    size = np.asarray(geometry.size)
    if np.any(index < -0.5) or np.any(index > size - 0.5):
        raise ValueError(
            f"{where} lies outside its scan: voxel index (i, j, k) = {np.round(index, 1).tolist()} for a scan of "
            f"{size.tolist()} voxels. Are the coordinates world mm (LUNA16's convention), and is it the right scan?"
        )


def cube_index_grid(
    center_index: np.ndarray, geometry: ScanGeometry, cube_size: Sequence[int], spacing_mm: Sequence[float]
) -> np.ndarray:
    """Continuous scan indices ``(3, S, R, C)`` in array order (k, j, i) of a cube of ``cube_size`` = (S, R, C) voxels
    at ``spacing_mm`` (same order) centred on ``center_index`` (i, j, k) and aligned with the scan's voxel axes."""
    axes = []
    for count, step, scan_step, center in zip(
        cube_size, spacing_mm, geometry.spacing[::-1], center_index[::-1], strict=True
    ):
        axes.append(center + (np.arange(count) - (count - 1) / 2.0) * (step / scan_step))
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def candidate_cube(
    array: np.ndarray,
    geometry: ScanGeometry,
    world: Sequence[float],
    cube_size: Sequence[int] = (32, 64, 64),
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """Resample the cube around a world point (x, y, z mm) of a scan: ``(S, R, C)`` float32 HU (trilinear, air outside).

    The caller checks that the point is inside the scan (:func:`check_inside`)."""
    from scipy.ndimage import map_coordinates

    grid = cube_index_grid(world_to_voxel(np.asarray(world), geometry), geometry, cube_size, spacing_mm)
    return map_coordinates(array, grid, output=np.float32, order=1, mode="constant", cval=AIR_HU)


def read_candidates_csv(path: str | os.PathLike, extra_columns: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rows of a LUNA16 CSV (candidates, annotations or excluded findings) with float coordinates and their row number.

    Returns dicts with ``seriesuid``, ``coordX``, ``coordY``, ``coordZ`` (floats), the ``extra_columns`` (floats, e.g.
    ``class`` or ``diameter_mm``) and ``row`` (0-based data row).

    Raises:
        FileNotFoundError / ValueError: naming the file, the row and the column that is missing or not a number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LUNA16 CSV file not found: {path}.")
    rows = []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        wanted = (*CANDIDATE_COLUMNS, *extra_columns)
        missing = [c for c in wanted if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing} (found {reader.fieldnames}).")
        for number, record in enumerate(reader):
            try:
                row = {"seriesuid": record["seriesuid"].strip(), "row": number}
                row.update({c: float(record[c]) for c in wanted[1:]})
            except (TypeError, ValueError):
                raise ValueError(f"{path}, data row {number}: non-numeric coordinate or value in {record}.") from None
            rows.append(row)
    return rows


def _find_scans(src_dir: Path, subsets: Sequence[int]) -> dict[str, tuple[Path, int]]:
    """``seriesuid -> (scan, subset)`` for the ``.mhd`` files and DICOM series folders under ``subset<N>`` folders."""
    scans: dict[str, tuple[Path, int]] = {}
    candidates = sorted(src_dir.rglob("*.mhd")) + sorted({f.parent for f in src_dir.rglob("*.dcm")})
    for path in candidates:
        subset = next((int(m.group(1)) for p in path.parts if (m := _SUBSET_PATTERN.match(p))), None)
        if subset is None:
            raise ValueError(f"{path} is not inside a 'subset<N>' folder: keep LUNA16's subset0 ... subset9 layout.")
        if subset not in subsets:
            continue
        uid = scan_seriesuid(path)
        if uid in scans:
            raise ValueError(f"seriesuid {uid} has two scans: {scans[uid][0]} and {path}.")
        scans[uid] = (path, subset)
    if not scans:
        raise FileNotFoundError(f"no '.mhd' scans or DICOM series of subsets {list(subsets)} under {src_dir}.")
    return scans


def _resolve(src_dir: Path, name: str | None) -> Path | None:
    if not name:
        return None
    path = Path(name)
    return path if path.is_absolute() else src_dir / path


def _save_cube(path: Path, cube: np.ndarray) -> None:
    with atomic_path(path) as temporary:
        np.save(temporary, np.clip(np.rint(cube), -32768, 32767).astype(np.int16))


def _claim_cube_folder(folder: Path, cube_size: tuple[int, ...], spacing_mm: tuple[float, ...]) -> None:
    """Record the cube geometry in ``<folder>/geometry.json``, or check it against the cubes already there: cubes of
    another size or spacing must never be reused."""
    record = folder / "geometry.json"
    wanted = {"cube_size": list(cube_size), "spacing_mm": list(spacing_mm)}
    if record.is_file():
        found = json.loads(record.read_text())
        if found != wanted:
            raise ValueError(
                f"{folder} holds cubes of {found}, not {wanted}: prepare into another out_dir or delete {folder}."
            )
        return
    atomic_write_json(record, wanted, indent=None)


def _select_negatives(rows: list[dict[str, Any]], limit: int | None, rng: np.random.Generator) -> list[dict[str, Any]]:
    if limit is None:
        return rows
    positives = [r for r in rows if r["class"] > 0]
    negatives = [r for r in rows if r["class"] <= 0]
    if len(negatives) > limit:
        keep = np.sort(rng.choice(len(negatives), size=limit, replace=False))
        negatives = [negatives[i] for i in keep]
    return sorted(positives + negatives, key=lambda r: r["row"])


def prepare(
    src_dir: str,
    out_dir: str,
    candidates: str = "candidates_V2.csv",
    annotations: str = "annotations.csv",
    annotations_excluded: str | None = "annotations_excluded.csv",
    cube_size: Sequence[int] = (32, 64, 64),
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    subsets: Sequence[int] = tuple(range(10)),
    allow_missing_scans: bool = False,
    max_negatives_per_scan: int | None = None,
    seed: int = 0,
) -> str:
    """Cut the candidate cubes of LUNA16 once and write ``<out_dir>/datalist.json``.

    Args:
        src_dir: LUNA16 folder with ``subset0`` ... ``subset9`` (searched recursively for ``*.mhd`` files and folders of
            ``*.dcm`` files, one series each) and the CSV files.
        out_dir: output folder (the bundle's ``dataset_dir``): ``cubes/`` and ``datalist.json``.
        candidates, annotations, annotations_excluded: CSV paths, relative to ``src_dir`` or absolute;
            ``annotations_excluded`` is optional (``None`` or a missing default file: no excluded findings).
        cube_size: (slices, rows, columns) voxels of each cube.
        spacing_mm: (slice, row, column) spacing of the cubes in mm.
        subsets: which subsets to prepare (a part of LUNA16 for a quick start).
        allow_missing_scans: skip candidates whose seriesuid has no scan in ``subsets`` (otherwise an error): needed
            when only some subsets are prepared.
        max_negatives_per_scan: keep every nodule candidate and at most this many random non-nodules per scan (seeded).
            The FROC then counts fewer false positives than LUNA16 would: use it for training folds or quick runs only.
        seed: seed of that selection.

    Returns:
        The datalist path. Entries: ``image`` (cube ``.npy``, relative to ``out_dir``), ``label`` (1 nodule, 0 not),
        ``seriesuid``, ``coordX``, ``coordY``, ``coordZ`` (world mm), ``candidate`` (row), ``subset``. The datalist
        also lists every prepared scan (``scans``, needed to count false positives per scan, scans without
        candidates included) and the annotation files (``annotations``, ``annotations_excluded``, relative to
        ``out_dir``) for the FROC.

    Raises:
        FileNotFoundError: a CSV file is missing, or (unless ``allow_missing_scans``) a seriesuid has no scan.
        ValueError: a candidate lies outside its scan (the message names the scan and the CSV row), or ``out_dir``
            holds cubes of another size or spacing.
        RuntimeError: a scan cannot be read (naming the file).
    """
    src, out = Path(src_dir), Path(out_dir)
    cube_size, spacing_mm = tuple(int(c) for c in cube_size), tuple(float(s) for s in spacing_mm)
    if len(cube_size) != 3 or len(spacing_mm) != 3 or min(cube_size) < 1 or min(spacing_mm) <= 0:
        raise ValueError(f"cube_size and spacing_mm need three positive values, got {cube_size} and {spacing_mm}.")
    subsets = [int(s) for s in ([subsets] if isinstance(subsets, int) else subsets)]
    candidates_path = _resolve(src, candidates)
    annotations_path = _resolve(src, annotations)
    excluded_path = _resolve(src, annotations_excluded)
    if excluded_path is not None and not excluded_path.is_file():
        if annotations_excluded != "annotations_excluded.csv":
            raise FileNotFoundError(f"annotations_excluded file not found: {excluded_path}.")
        excluded_path = None
    rows = read_candidates_csv(candidates_path, extra_columns=("class",))
    read_candidates_csv(annotations_path, extra_columns=("diameter_mm",))  # fail now, not at evaluation time
    if excluded_path is not None:
        read_candidates_csv(excluded_path, extra_columns=("diameter_mm",))
    scans = _find_scans(src, subsets)

    by_scan: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_scan.setdefault(row["seriesuid"], []).append(row)
    unknown = sorted(uid for uid in by_scan if uid not in scans)
    if unknown and not allow_missing_scans:
        raise FileNotFoundError(
            f"{candidates_path}: seriesuid {unknown[0]} (row {by_scan[unknown[0]][0]['row']}) has no scan "
            f"('{unknown[0]}.mhd' or a DICOM series) in subsets {subsets} under {src} "
            f"({len(unknown)} such seriesuids). "
            "Pass --allow_missing_scans to prepare only the scans present."
        )

    _claim_cube_folder(out / "cubes", cube_size, spacing_mm)
    rng = np.random.default_rng(seed)
    folds: dict[str, list[dict[str, Any]]] = {f"subset{s}": [] for s in range(10)}
    cut = reused = 0
    for uid, (scan_path, subset) in sorted(scans.items()):
        selected = _select_negatives(by_scan.get(uid, []), max_negatives_per_scan, rng)
        targets = [out / "cubes" / uid / f"{row['row']}.npy" for row in selected]
        array = geometry = None
        for row, target in zip(selected, targets, strict=True):
            if array is None:
                array, geometry = read_scan(scan_path)
            world = np.array([row["coordX"], row["coordY"], row["coordZ"]])
            where = f"candidate row {row['row']} of {candidates_path} (seriesuid {uid}, world {world.tolist()} mm)"
            check_inside(world_to_voxel(world, geometry), geometry, f"{where} in scan {scan_path}")
            if target.is_file():
                reused += 1
            else:
                _save_cube(target, candidate_cube(array, geometry, world, cube_size, spacing_mm))
                cut += 1
            folds[f"subset{subset}"].append(
                {
                    "image": str(target.relative_to(out)),
                    "label": int(row["class"] > 0),
                    "seriesuid": uid,
                    "coordX": row["coordX"],
                    "coordY": row["coordY"],
                    "coordZ": row["coordZ"],
                    "candidate": row["row"],
                    "subset": subset,
                }
            )
    logger.info("LUNA16: %d scans, %d cubes cut, %d reused from %s", len(scans), cut, reused, out / "cubes")

    def relative(path: Path | None) -> str | None:
        return None if path is None else os.path.relpath(path.resolve(), out.resolve())

    content = {
        "name": "LUNA16",
        "cube_size": list(cube_size),
        "spacing_mm": list(spacing_mm),
        "max_negatives_per_scan": max_negatives_per_scan,
        "annotations": relative(annotations_path),
        "annotations_excluded": relative(excluded_path),
        "scans": {uid: {"image": relative(path), "subset": subset} for uid, (path, subset) in sorted(scans.items())},
        **folds,
    }
    datalist = atomic_write_json(out / "datalist.json", content, indent=1)
    return str(datalist)


def _subset_list(subsets: int | Iterable[int]) -> list[int]:
    return [int(subsets)] if isinstance(subsets, int) else [int(s) for s in subsets]


def load_folds(datalist: str | os.PathLike, subsets: int | Iterable[int], base_dir: str | os.PathLike) -> list[dict]:
    """The candidate entries of the given subsets (folds), cube paths joined to ``base_dir`` by MONAI's reader."""
    from monai.data import load_decathlon_datalist

    items: list[dict] = []
    for subset in _subset_list(subsets):
        items += load_decathlon_datalist(
            str(datalist), is_segmentation=False, data_list_key=f"subset{subset}", base_dir=str(base_dir)
        )
    return items


def fold_keys(*subsets: int | Iterable[int]) -> list[str]:
    """Datalist keys (``subset<N>``) of the given folds, in order, each once: ``fold_keys([0, 1], [8])``."""
    keys = [f"subset{s}" for group in subsets for s in _subset_list(group)]
    return list(dict.fromkeys(keys))


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype of the ``.npy`` file ``path``, from its header (``numpy.lib.format``); its values are
    neither read nor mapped.

    Raises:
        ValueError: not a ``.npy`` file of format 1.0 or 2.0 (what ``np.save`` writes for arrays of numbers), or
            fewer bytes of values than the header announces (a truncated file, which ``np.load`` refuses too).
    """
    from numpy.lib import format as npy_format

    with open(path, "rb") as handle:
        version = npy_format.read_magic(handle)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, _, dtype = npy_format.read_array_header_2_0(handle)
        else:
            raise ValueError(f".npy format version {version}, not 1.0 or 2.0 (np.save of an array of numbers)")
        values = os.fstat(handle.fileno()).st_size - handle.tell()
    announced = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if values < announced:
        raise ValueError(f"truncated: {values} bytes of values, its header announces {announced}")
    return tuple(shape), dtype


def _cube_problems(item: Any, path: Path | None, where: str, cube_size: Sequence[int]) -> list[str]:
    """Problems of one candidate entry of a prepared datalist: its cube file ``path`` (``None`` when the entry has no
    ``image``) and its label.

    The cube's shape and type come from its ``.npy`` header (:func:`_npy_header`): the int16 cubes of
    :func:`prepare` are checked without reading their values. Only a float cube is read, for NaN / inf values.
    """
    if path is None or "label" not in item:
        return [f"{where}: {item!r} is not a dict with 'image' and 'label' (a candidate cube and its class)"]
    refresh = "delete it and run prepare_luna16 again (it cuts the missing cubes anew)"
    problems = []
    if item["label"] not in (0, 1) or isinstance(item["label"], bool):
        problems.append(f"{path}: label {item['label']!r} ({where}) is not 0 (not a nodule) or 1 (nodule)")
    if not path.is_file():
        return [
            *problems,
            f"{path}: file not found ({where}); fix dataset_dir or prepare the subset (python -m custom_nets.cli "
            "prepare_luna16)",
        ]
    try:
        shape, dtype = _npy_header(path)
    except Exception as error:  # numpy raises several types for broken headers
        return [*problems, f"{path}: not a readable .npy cube ({type(error).__name__}: {error}); {refresh}"]
    if shape != tuple(cube_size):
        problems.append(
            f"{path}: cube of shape {shape}, the datalist's cube_size is {tuple(cube_size)} (slices, rows, columns); "
            f"{refresh}"
        )
    elif not np.issubdtype(dtype, np.number):
        problems.append(f"{path}: cube of type {dtype}, not numbers; {refresh}")
    elif np.issubdtype(dtype, np.floating) and not np.isfinite(np.load(path, mmap_mode="r", allow_pickle=False)).all():
        problems.append(f"{path}: NaN or infinite values in the cube; {refresh}")
    return problems


def _resolved(path: Path, folders: dict[Path, Path]) -> str:
    """``str(path.resolve())`` with each folder resolved once (``folders`` caches them; a LUNA16 datalist holds 755k
    cubes in about 900 folders): the file itself is resolved on its own only when it is a symbolic link."""
    if path.name in ("", "..") or path.is_symlink():
        return str(path.resolve())
    folder = folders.get(path.parent)
    if folder is None:
        folder = folders[path.parent] = path.parent.resolve()
    return str(folder / path.name)


def candidate_datalist_problems(
    content: Mapping[str, Any],
    keys: Sequence[str],
    base_dir: str | os.PathLike,
    source: str = "datalist",
    expectations: DataExpectations | None = None,
) -> tuple[list[tuple[str, str, int]], list[tuple[str, list[tuple[str, int]]]], int]:
    """Check the ``keys`` folds of a datalist written by :func:`prepare`; never raises.

    Per candidate: the cube exists, reads, has the datalist's ``cube_size`` and finite values, its label is 0 or 1,
    its ``seriesuid`` is one of the datalist's ``scans``, and its world position lies inside that scan when the scan
    is still at its recorded place (header only; training does not need the scans, so a moved scan is not checked).
    Such a scan's geometry must also be usable (:func:`~custom_nets.data.expectations.affine_problems` against
    ``expectations``: a zero / NaN spacing or a broken direction matrix means its cubes were cut on a wrong grid).
    Each fold must hold candidates.

    Returns:
        ``(files, problems, count)``: ``(resolved cube path, fold, position)`` of every candidate (for duplicate
        detection), one ``(line, [(fold, position), ...])`` per problem, the line naming the file and the fix, the
        list the candidates it makes unusable (empty for a problem of the datalist or a fold as a whole), and the
        number of candidates checked.
    """
    base = Path(base_dir)
    cube_size = content.get("cube_size")
    scans = content.get("scans")
    if not isinstance(cube_size, list) or len(cube_size) != 3 or not isinstance(scans, dict):
        return (
            [],
            [(f"{source}: no 'cube_size' / 'scans' entries; not written by prepare_luna16: prepare it again", [])],
            0,
        )
    files: list[tuple[str, str, int]] = []
    folders: dict[Path, Path] = {}
    problems: list[tuple[str, list[tuple[str, int]]]] = []
    by_scan: dict[str, list[tuple[str, int, dict, Path]]] = {}
    count = 0
    for key in keys:
        items = content.get(key)
        if not isinstance(items, list) or not items:
            problems.append(
                (
                    f"{source} [{key}]: no candidate in this fold; prepare its scans (prepare_luna16 --subsets) or "
                    "choose other train_subsets / val_subsets",
                    [],
                )
            )
            continue
        for position, item in enumerate(items):
            count += 1
            cube = base / str(item["image"]) if isinstance(item, dict) and "image" in item else None
            problems.extend(
                (f"[{key}] {problem}", [(key, position)])
                for problem in _cube_problems(item, cube, f"item {position}", cube_size)
            )
            if cube is not None:
                files.append((_resolved(cube, folders), key, position))
                by_scan.setdefault(str(item.get("seriesuid")), []).append((key, position, item, cube))
    for uid, entries in by_scan.items():
        if uid not in scans:
            key, position, _, cube = entries[0]
            problems.append(
                (
                    f"[{key}] {cube}: seriesuid {uid} (item {position}) is not among the datalist's scans; prepare "
                    "the datalist again",
                    [(key, position) for key, position, _, _ in entries],
                )
            )
            continue
        scan = base / str(scans[uid].get("image"))
        if not scan.exists():
            continue
        try:
            geometry = scan_geometry(scan)
        except RuntimeError as error:
            problems.append((str(error), [(key, position) for key, position, _, _ in entries]))
            continue
        broken = _geometry_findings(geometry, scan, expectations)
        if broken.errors:
            line = f"{broken.errors[0]} (the scan of {len(entries)} candidate(s): prepare them again once fixed)"
            problems.append((line, [(key, position) for key, position, _, _ in entries]))
            continue
        located, coordinates = [], []
        for key, position, item, cube in entries:
            try:
                coordinates.append([float(item[c]) for c in ("coordX", "coordY", "coordZ")])
            except (KeyError, TypeError, ValueError):
                problems.append(
                    (
                        f"[{key}] {cube}: item {position} needs numeric coordX, coordY, coordZ (world mm)",
                        [(key, position)],
                    )
                )
                continue
            located.append((key, position, cube))
        worlds = np.array(coordinates, dtype=np.float64).reshape(-1, 3)
        indices = world_to_voxel(worlds, geometry)  # all candidates of the scan at once
        for (key, position, cube), world, index in zip(located, worlds, indices, strict=True):
            try:
                check_inside(index, geometry, f"{cube}: the candidate (item {position})")
            except ValueError as error:
                problems.append(
                    (
                        f"[{key}] {error} Scan {scan}, world {world.tolist()} mm: fix or drop the row of the "
                        "candidates CSV and prepare again",
                        [(key, position)],
                    )
                )
    return files, problems, count


def _geometry_findings(geometry: ScanGeometry, scan: Path, expectations: DataExpectations | None) -> GeometryFindings:
    """:func:`~custom_nets.data.expectations.affine_problems` of a scan's header geometry."""
    affine = np.eye(4)
    affine[:3, :3] = geometry.direction * geometry.spacing
    return affine_problems(affine, str(scan), DataExpectations() if expectations is None else expectations)


def check_prepared(datalist: str | os.PathLike, cube_size: Sequence[int], spacing_mm: Sequence[float]) -> None:
    """Raise a ``ValueError`` naming ``datalist`` unless its cubes have this size and spacing (the bundle's
    ``num_slices``, ``image_size`` and ``spacing_mm`` must describe the prepared cubes; inference cuts with them)."""
    content = json.loads(Path(datalist).read_text())
    found = (list(content["cube_size"]), [float(v) for v in content["spacing_mm"]])
    wanted = ([int(v) for v in cube_size], [float(v) for v in spacing_mm])
    if found != wanted:
        raise ValueError(
            f"{datalist} holds cubes of size {found[0]} at {found[1]} mm, but the bundle is set to {wanted[0]} at "
            f"{wanted[1]} mm: set num_slices, image_size and spacing_mm to the prepared ones, or prepare again."
        )


def scan_ids(datalist: str | os.PathLike, subsets: int | Iterable[int]) -> list[str]:
    """The seriesuids of every prepared scan of the given subsets (those without candidates included)."""
    wanted = set(_subset_list(subsets))
    scans: Mapping[str, Mapping[str, Any]] = json.loads(Path(datalist).read_text())["scans"]
    return sorted(uid for uid, scan in scans.items() if scan["subset"] in wanted)


def annotation_file(datalist: str | os.PathLike, key: str = "annotations") -> str | None:
    """Absolute path of the datalist's ``annotations`` / ``annotations_excluded`` file (``None`` when absent)."""
    datalist = Path(datalist)
    name = json.loads(datalist.read_text()).get(key)
    return None if name is None else str((datalist.parent / name).resolve())


def select_fraction_per_class(
    items: Sequence[Mapping[str, Any]], fraction: float = 1.0, seed: int = 0, key: str = "label"
) -> list[Any]:
    """The labelled subset of a label-efficiency run: ``ceil(fraction * n_c)`` candidates of each class ``c``, seeded
    and nested across fractions (:func:`custom_nets.data.segmentation.select_label_fraction` per class), so the
    nodule / non-nodule ratio of the folds is kept and no fraction loses every nodule. Keeps the order of ``items``."""
    if fraction >= 1.0:
        return list(items)
    groups: dict[Any, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(item[key], []).append(index)
    chosen = [i for group in groups.values() for i in select_label_fraction(group, fraction, seed)]
    return [items[i] for i in sorted(chosen)]


def class_balanced_weights(items: Sequence[Mapping[str, Any]], key: str = "label") -> list[float]:
    """Per-item sampling weights ``1 / count(class)``: a ``WeightedRandomSampler`` with them draws nodules and
    non-nodules equally often (LUNA16 has some 500 non-nodule candidates per nodule).

    Raises:
        ValueError: when the items hold a single class (nothing to balance, and nothing to learn).
    """
    labels = [int(item[key]) for item in items]
    counts = {label: labels.count(label) for label in set(labels)}
    if len(counts) < 2:
        raise ValueError(
            f"the training candidates hold only class {sorted(counts)}: they need nodules and non-nodules."
        )
    return [1.0 / counts[label] for label in labels]


def scan_inference_problems(
    scan: str | os.PathLike, candidates_csv: str | os.PathLike, expectations: DataExpectations | None = None
) -> tuple[list[dict[str, Any]], list[DatalistProblem], list[str]]:
    """The start-up check of nodule inference on one scan and its candidates CSV; never raises.

    Checks that the scan exists and reads (a MetaImage with its ``.raw``, or a folder of one DICOM series), that its
    geometry is usable for ``expectations`` (:func:`~custom_nets.data.expectations.affine_problems`: no zero / NaN
    spacing, a voxel side within ``max_spacing_mm``, no singular or sheared direction), that its voxels are finite
    and not all equal, that the CSV reads and holds rows of the scan's seriesuid, and that each of those candidates
    lies inside the scan. The scan is read whole (its voxels are checked); :func:`scan_candidates` reads it again to
    cut the cubes, a second read that costs little next to cutting them.

    Returns:
        ``(rows, problems, warnings)``: the CSV rows of this scan (as :func:`read_candidates_csv` gives them), one
        :class:`~custom_nets.data.datalist.DatalistProblem` per problem, its line naming the file and the fix and its
        items ``(INFERENCE_KEY, position in rows)`` the candidates it makes unusable (none for a problem of the scan
        or the CSV: nothing can be inferred then), and the geometry warnings.
    """
    scan, table = Path(scan), Path(candidates_csv)
    if not scan.exists():
        fix = "fix scan: a .mhd / .mha file beside its .raw, or a folder holding one DICOM series"
        return [], [DatalistProblem(f"{scan}: scan not found; {fix}")], []
    if not table.is_file():
        return [], [DatalistProblem(f"{table}: candidates file not found; fix candidates_csv")], []
    try:
        uid = scan_seriesuid(scan)
        rows = [row for row in read_candidates_csv(table) if row["seriesuid"] == uid]
    except ValueError as error:  # a CSV row or column, or a folder of several series: the message names it
        return [], [DatalistProblem(str(error))], []
    except Exception as error:  # pydicom raises several types for a broken DICOM header
        return [], [DatalistProblem(f"{scan}: cannot read its DICOM series ({type(error).__name__}: {error})")], []
    if not rows:
        line = f"{table}: no row with seriesuid {uid}, the seriesuid of the scan {scan}; give the candidates of this "
        return [], [DatalistProblem(line + "scan, or the scan they were found on")], []
    try:
        array, geometry = read_scan(scan)
    except RuntimeError as error:
        return rows, [DatalistProblem(str(error))], []
    findings = _geometry_findings(geometry, scan, expectations)
    whole = [f"{line} (the scan of {len(rows)} candidate(s))" for line in findings.errors]
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        whole.append(f"{scan}: NaN or infinite voxel values; re-export the scan")
    elif float(array.min()) == float(array.max()):
        whole.append(f"{scan}: constant scan (every voxel is {float(array.min()):g} HU); is its .raw the scan's data?")
    if whole:
        return rows, [DatalistProblem(line) for line in whole], findings.warnings
    problems = []
    for position, row in enumerate(rows):
        world = np.array([row["coordX"], row["coordY"], row["coordZ"]])
        try:
            check_inside(world_to_voxel(world, geometry), geometry, f"{table}: row {row['row']}")
        except ValueError as error:
            line = f"{error} Scan {scan}, world {world.tolist()} mm: fix or drop the row"
            problems.append(DatalistProblem(line, ((INFERENCE_KEY, position),)))
    return rows, problems, findings.warnings


def checked_scan_candidates(
    scan: str | os.PathLike,
    candidates_csv: str | os.PathLike,
    expectations: DataExpectations | None = None,
    skip_bad: bool = False,
    output_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """The start-up check of nodule inference (:func:`scan_inference_problems`): the scan's candidate rows to infer,
    for :func:`scan_candidates`. With ``skip_bad`` a candidate outside the scan is left out and reported
    (:func:`~custom_nets.data.datalist.usable_inference_items`); a problem of the scan or the CSV always stops.

    Raises:
        DatalistError: every problem, one line each, naming the file and the fix.
    """
    rows, problems, warnings = scan_inference_problems(scan, candidates_csv, expectations)
    source = f"{candidates_csv} (candidates of the scan {scan})"
    return usable_inference_items(rows, problems, warnings, skip_bad, output_dir, source)


def scan_candidates(
    scan: str | os.PathLike,
    candidates: str | os.PathLike | Sequence[Mapping[str, Any]],
    cube_size: Sequence[int] = (32, 64, 64),
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
) -> list[dict[str, Any]]:
    """Inference input: the cubes ``(1, S, R, C)`` (float32 HU) of one scan's candidates (a ``.mhd`` file or a DICOM
    series folder), cut in memory as :func:`prepare` cuts them. ``candidates`` is a candidates CSV, whose rows of
    other seriesuids are ignored (a whole ``candidates_V2.csv`` works), or the scan's rows already read and checked
    (:func:`checked_scan_candidates`).

    Raises:
        ValueError: naming the scan and the row when no row belongs to the scan or a candidate lies outside it.
    """
    scan = Path(scan)
    uid = scan_seriesuid(scan)
    if isinstance(candidates, (str, os.PathLike)):
        rows = [r for r in read_candidates_csv(candidates) if r["seriesuid"] == uid]
        if not rows:
            raise ValueError(f"{candidates} has no row with seriesuid {uid} (the seriesuid of the scan {scan}).")
    else:
        rows = list(candidates)
    array, geometry = read_scan(scan)
    items = []
    for row in rows:
        world = np.array([row["coordX"], row["coordY"], row["coordZ"]])
        check_inside(world_to_voxel(world, geometry), geometry, f"row {row['row']} of the candidates in scan {scan}")
        cube = candidate_cube(array, geometry, world, cube_size, spacing_mm)
        items.append(
            {
                "image": cube[None],
                "seriesuid": uid,
                "coordX": row["coordX"],
                "coordY": row["coordY"],
                "coordZ": row["coordZ"],
                "candidate": row["row"],
            }
        )
    return items


if __name__ == "__main__":
    import fire

    fire.Fire({"prepare": prepare})
