"""Checks of image files that read headers only: absurd dimensions before any voxel is allocated, and DICOM series
whose slices do not form one regular volume (a missing or duplicated slice, mixed series or sizes).

Used by :class:`~custom_nets.data.loading.LoadMedicalImaged` (header sizes, on every read) and by
:func:`~custom_nets.data.datalist.validate_datalist` (DICOM series), so that a bad file is reported by name with its
fix instead of a reader crash, an out-of-memory kill or a silently distorted volume.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from custom_nets.data.datalist import DatalistError, file_suffix, is_dicom_file

__all__ = ["MAX_VOXELS", "check_header_size", "dicom_series_problems", "header_shape", "text_header_shape"]

MAX_VOXELS = 2**30
"""Largest accepted image (voxels x channels); 2**30 float32 voxels are 4 GiB."""


def text_header_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """Dimensions from a MetaImage (``DimSize``) or NRRD (``sizes``) text header.

    Raises:
        DatalistError: no dimension line, or one that is not integers.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        header = handle.read(4096).decode("latin-1")
    separator = "=" if file_suffix(path) in (".mhd", ".mha") else ":"
    for line in header.splitlines():
        name, _, value = line.partition(separator)
        if name.strip().lower() in ("dimsize", "sizes"):
            try:
                return tuple(int(v) for v in value.split())
            except ValueError as error:
                raise DatalistError(f"{path}: header dimensions {value.strip()!r} are not integers") from error
    raise DatalistError(f"{path}: no DimSize/sizes in the header; the file is corrupt or not MetaImage/NRRD")


def header_shape(path: str | os.PathLike) -> tuple[int, ...] | None:
    """The array shape a NIfTI, MetaImage or NRRD header announces (None for other files and folders).

    Raises:
        ValueError: naming the file when the header cannot be read.
    """
    path = Path(path)
    if path.is_dir():
        return None
    suffix = file_suffix(path)
    if suffix in (".nii", ".nii.gz"):
        import nibabel as nib

        try:
            return tuple(int(n) for n in nib.load(path).shape)
        except Exception as error:  # nibabel raises several types for broken headers
            raise ValueError(
                f"{path}: unreadable NIfTI header ({type(error).__name__}: {error}); the file is empty, truncated or "
                "not NIfTI: re-export it or remove it from the datalist"
            ) from error
    if suffix in (".mhd", ".mha", ".nrrd"):
        return text_header_shape(path)
    return None


def check_header_size(path: str | os.PathLike, max_voxels: int = MAX_VOXELS) -> None:
    """Raise a ``ValueError`` naming ``path`` when its header announces a non-positive or absurd size."""
    shape = header_shape(path)
    if shape is None:
        return
    if not shape or any(n <= 0 for n in shape):
        raise ValueError(f"{path}: header dimensions {shape} include zero or negative sizes; the header is corrupt")
    if math.prod(shape) > max_voxels:
        raise ValueError(
            f"{path}: header dimensions {shape} ({math.prod(shape):.3g} voxels) exceed the {max_voxels:.3g} accepted; "
            "the header is corrupt or the image must be cropped / downsampled first"
        )


def dicom_series_problems(folder: str | os.PathLike, tolerance: float = 0.01) -> list[str]:
    """Problems of a DICOM series folder as one volume, from the headers only (empty list when it is usable).

    Checks that the folder holds one series (one ``SeriesInstanceUID``), one image size, pixel data in every file, one
    slice orientation (``ImageOrientationPatient``: two perpendicular unit vectors, the same in every slice), a
    positive ``PixelSpacing`` where given (without it ITK reads 1 mm), and slices evenly spaced along the slice normal
    (relative ``tolerance``): a gap means a missing slice, a zero step a duplicate.
    """
    import pydicom

    folder = Path(folder)
    headers = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and is_dicom_file(p)):
        try:
            headers.append((path, pydicom.dcmread(path, stop_before_pixels=False, defer_size=64)))
        except Exception as error:  # pydicom raises several types for broken files
            return [f"{path}: unreadable DICOM file ({type(error).__name__}: {error}); repair or remove it"]
    if not headers:
        return [f"{folder}: no DICOM file in the folder"]
    problems = []
    no_pixels = [path.name for path, header in headers if "PixelData" not in header]
    if no_pixels:
        problems.append(f"{folder}: {len(no_pixels)} file(s) without pixel data (e.g. {no_pixels[0]}); remove them")
    for tag, what in (("SeriesInstanceUID", "series"), ("Rows", "row counts"), ("Columns", "column counts")):
        values = {str(header.get(tag, "")) for _, header in headers}
        if len(values) > 1:
            problems.append(f"{folder}: {len(values)} different {what} in one folder; keep one series per folder")
    if len(headers) < 2 or problems:
        return problems
    try:
        orientations = [np.array([float(v) for v in h.ImageOrientationPatient]).reshape(2, 3) for _, h in headers]
        spacings = [np.array([float(v) for v in h.PixelSpacing]).reshape(2) for _, h in headers if "PixelSpacing" in h]
    except (AttributeError, ValueError) as error:
        return [f"{folder}: slices without a usable ImageOrientationPatient / PixelSpacing ({error})"]
    tilted = [
        path.name
        for (path, _), o in zip(headers, orientations, strict=True)
        if np.abs(o - orientations[0]).max() > 1e-3
    ]
    if tilted:
        return [
            f"{folder}: slices with different orientations (ImageOrientationPatient of {tilted[0]} differs from "
            f"{headers[0][0].name}, {len(tilted)} slice(s) in all): two stacks or a localizer in one folder; keep "
            "the slices of one orientation per folder"
        ]
    rows, columns = orientations[0]
    if abs(np.linalg.norm(rows) - 1) > 1e-3 or abs(np.linalg.norm(columns) - 1) > 1e-3 or abs(rows @ columns) > 1e-2:
        return [
            f"{folder}: ImageOrientationPatient {orientations[0].ravel().tolist()} is not two perpendicular unit "
            "vectors (a broken orientation); re-export the series"
        ]
    wrong = [s.tolist() for s in spacings if not np.isfinite(s).all() or np.any(s <= 0)]
    if wrong:
        return [f"{folder}: PixelSpacing {wrong[0]} must be positive numbers (mm); re-export the series"]
    try:
        orientation = orientations[0]
        normal = np.cross(orientation[0], orientation[1])
        positions = sorted(float(np.dot(normal, [float(v) for v in h.ImagePositionPatient])) for _, h in headers)
    except (AttributeError, ValueError) as error:
        return [f"{folder}: slices without a usable ImagePositionPatient / ImageOrientationPatient ({error})"]
    steps = np.diff(positions)
    typical = float(np.median(steps))
    if typical <= 0 or np.any(np.abs(steps - typical) > tolerance * typical):
        gaps = [f"{s:.3g}" for s in steps[np.abs(steps - typical) > tolerance * max(typical, 1e-6)]][:5]
        problems.append(
            f"{folder}: uneven slice spacing (usual step {typical:.3g} mm, also {', '.join(gaps)} mm): a missing or "
            "duplicated slice; complete the series or remove the folder from the datalist"
        )
    return problems
