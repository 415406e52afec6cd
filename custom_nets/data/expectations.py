"""What a bundle expects of its input images: channel count, voxel spacing and a usable orientation.

Each bundle states its expectations once, at the top of its ``train.json`` (``expected_channels``,
``max_spacing_mm``, ``max_inplane_anisotropy``, ``max_slice_anisotropy``), and passes them as a
:class:`DataExpectations` to the start-up check (:func:`custom_nets.data.datalist.usable_datalist`) and to the
``validate_data`` CLI (``--bundle``). The checks read headers where the file type allows (NIfTI ``pixdim`` / sform /
qform with nibabel, PIL's image mode for PNGs) and otherwise the affine of the array the check reads anyway, so no
volume is read twice.

Errors (the item cannot be used as the bundle would use it) and warnings (listed in the report, the run goes on):

* a spacing that is zero, negative or not a number, or an affine that is singular, not finite or whose voxel axes are
  not perpendicular (sheared): always an error - ``Orientationd`` / ``Spacingd`` and every resampling would compute
  with a broken grid;
* a NIfTI whose sform, qform and ``pixdim`` disagree so that MONAI's reader would silently use another affine than
  the header's best one (what viewers show): a warning;
* a voxel side above ``max_spacing_mm`` (default 20 mm): an error, a unit mistake (cm, m) or a broken header;
* axial pixels (after reorientation to RAS) whose two sides differ by more than ``max_inplane_anisotropy``: an error
  for the bundles that feed axial slices to a 2D network without resampling in-plane (heart, brainseg,
  pretrain_joint without ``spacing``): the network would see the anatomy stretched;
* a slice spacing more than ``max_slice_anisotropy`` times the in-plane spacing: a warning (slice-wise networks do not
  mix slices; 2.5D neighbours and slice positions become coarse);
* a channel count other than ``channels``: an error naming the found and the expected count;
* a 2D DICOM radiograph whose ``PixelSpacing`` / ``ImagerPixelSpacing`` is not two positive numbers, or has a side
  outside ``pixel_spacing_range_mm`` (a unit mistake: m, cm or um read as mm): an error; neither tag, or pixels that
  are not square (the readers resize them as if they were): a warning;
* a raster image in a palette or grey + alpha mode (``P``, ``PA``, ``LA``), or RGBA where the bundle averages every
  channel: an error - the readers would take palette indices for grey levels or average alpha into the intensities.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DataExpectations",
    "GeometryFindings",
    "affine_problems",
    "channel_problem",
    "dicom_pixel_spacing",
    "nifti_header_problems",
    "radiograph_spacing_problems",
    "raster_mode_problem",
    "RADIOGRAPH_SPACING_TAGS",
]

RADIOGRAPH_SPACING_TAGS = ("PixelSpacing", "ImagerPixelSpacing")
"""DICOM tags of a radiograph's pixel size (mm, row spacing then column spacing): in the patient, at the detector."""

SQUARE_PIXEL_TOLERANCE = 1.01
"""Largest ratio of a 2D pixel's two sides taken as square; more gets a warning."""

PERPENDICULAR_TOLERANCE = float(np.sin(np.deg2rad(1.0)))
"""Largest accepted ``|cos|`` between two voxel axes (1 degree from perpendicular): more is a sheared grid."""


@dataclass(frozen=True)
class DataExpectations:
    """What one bundle expects of each input image.

    Args:
        channels: channels of one image item as read (a list of channel files counts one per file); ``None`` skips.
        max_spacing_mm: largest accepted voxel side (mm); larger is an error.
        max_inplane_anisotropy: largest accepted ratio of the two sides of an axial pixel (after RAS reorientation);
            ``None`` when the bundle resamples in-plane (any ratio is then fine).
        max_slice_anisotropy: slice spacing / smallest in-plane spacing above which a warning is listed; ``None``
            skips.
        averages_rgba: the bundle averages every channel of a raster image, alpha included (so RGBA is an error);
            False when it keeps the three colour channels only.
        channels_fix: how to fix a wrong channel count, in the bundle's words.
        pixel_spacing_range_mm: ``(smallest, largest)`` accepted side (mm) of a 2D DICOM radiograph's pixels
            (``PixelSpacing``, ``ImagerPixelSpacing``); ``None``: any positive side up to ``max_spacing_mm``.
    """

    channels: int | None = None
    max_spacing_mm: float = 20.0
    max_inplane_anisotropy: float | None = None
    max_slice_anisotropy: float | None = None
    averages_rgba: bool = True
    channels_fix: str = "give images with that many channels or change the bundle's expected_channels"
    pixel_spacing_range_mm: Sequence[float] | None = None


@dataclass
class GeometryFindings:
    """Errors (the item is unusable) and warnings (listed, the run goes on) of one image."""

    errors: list[str]
    warnings: list[str]


def _spacing_text(spacing: Sequence[float]) -> str:
    return " x ".join(f"{float(s):.3g}" for s in spacing) + " mm"


def affine_problems(affine: np.ndarray, source: str, expectations: DataExpectations) -> GeometryFindings:
    """Check the homogeneous voxel-to-world ``affine`` (``(4, 4)`` for a volume, ``(3, 3)`` for a 2D image) of the
    image ``source`` against ``expectations``."""
    affine = np.asarray(affine, dtype=np.float64)
    dims = affine.shape[0] - 1
    matrix = affine[:dims, :dims]
    fix = "fix the header (re-export or re-convert the image, e.g. with dcm2niix) or remove it from the datalist"
    if not np.isfinite(matrix).all():
        return GeometryFindings([f"{source}: affine (voxel to world) is not finite {matrix.tolist()}; {fix}"], [])
    spacing = np.linalg.norm(matrix, axis=0)
    if np.any(spacing <= 1e-6) or abs(np.linalg.det(matrix / spacing)) < 1e-3:
        return GeometryFindings(
            [
                f"{source}: singular affine (spacing {_spacing_text(spacing)}, {np.round(matrix, 4).tolist()}): a "
                f"zero-size voxel or two voxel axes along the same direction; {fix}"
            ],
            [],
        )
    directions = matrix / spacing
    cosines = np.abs(directions.T @ directions - np.eye(dims))
    if cosines.max() > PERPENDICULAR_TOLERANCE:
        angle = float(np.degrees(np.arccos(min(cosines.max(), 1.0))))
        return GeometryFindings(
            [
                f"{source}: voxel axes are not perpendicular ({angle:.1f} degrees between two axes, a sheared "
                "grid): a broken orientation or a gantry tilt; resample it onto a regular grid (dcm2niix corrects "
                "gantry tilt) or remove it from the datalist"
            ],
            [],
        )
    errors, warnings = [], []
    if spacing.max() > expectations.max_spacing_mm:
        errors.append(
            f"{source}: voxel spacing {_spacing_text(spacing)} exceeds {expectations.max_spacing_mm:g} mm: a unit "
            "mistake (cm or m instead of mm) or a broken header; fix the header or remove the image"
        )
    if dims == 3:
        from nibabel.orientations import io_orientation

        ras = np.empty(3)
        ras[io_orientation(affine)[:, 0].astype(int)] = spacing  # the world axis (R, A, S) of each voxel axis
        inplane, slice_spacing = ras[:2], ras[2]
        ratio = inplane.max() / inplane.min()
        limit = expectations.max_inplane_anisotropy
        if limit is not None and ratio > limit:
            errors.append(
                f"{source}: axial pixels of {_spacing_text(inplane)} (ratio {ratio:.3g} > {limit:g}, spacing "
                f"{_spacing_text(spacing)}): the 2D network would see the anatomy stretched; resample to square "
                "axial pixels (e.g. MONAI Spacingd) or, for a volume acquired in another plane, reslice it axially"
            )
        slice_limit = expectations.max_slice_anisotropy
        if slice_limit is not None and slice_spacing / inplane.min() > slice_limit:
            warnings.append(
                f"{source}: slices {slice_spacing:.3g} mm apart for {inplane.min():.3g} mm pixels (ratio "
                f"{slice_spacing / inplane.min():.3g} > {slice_limit:g}): thick slices, neighbouring slices differ "
                "much; usable, but consider thinner slices"
            )
    return GeometryFindings(errors, warnings)


def _two_sides(value: Any) -> list[float] | None:
    """A DICOM pixel spacing value as ``[row spacing, column spacing]``, or ``None`` unless it is two numbers."""
    values = [value] if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") else list(value)
    try:
        sides = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return sides if len(sides) == 2 else None


def dicom_pixel_spacing(path: str | os.PathLike) -> dict[str, Any]:
    """The :data:`RADIOGRAPH_SPACING_TAGS` present in the header of the DICOM file ``path``, each with its value as
    stored (a tag that is absent or empty is left out). Reads the header only, and no other tag.

    Raises:
        pydicom's errors for a file that is not a readable DICOM.
    """
    import pydicom

    header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(RADIOGRAPH_SPACING_TAGS))
    return {tag: header.get(tag) for tag in RADIOGRAPH_SPACING_TAGS if header.get(tag) not in (None, "")}


def radiograph_spacing_problems(
    header: Mapping[str, Any],
    source: str,
    expectations: DataExpectations,
    fix: str = "fix the header (re-export the image) or remove it from the datalist",
) -> GeometryFindings:
    """Check the pixel size of a 2D DICOM radiograph: ``header`` maps each of :data:`RADIOGRAPH_SPACING_TAGS` to its
    value as read (absent or ``None`` when the file has no such tag; :func:`dicom_pixel_spacing` reads them).

    Errors: a tag present but not two finite positive numbers (a broken header), or a side outside
    ``expectations.pixel_spacing_range_mm`` (else above ``max_spacing_mm``): a unit mistake (m, cm or um read as
    mm) or a header that does not describe the image. Each error line ends with ``fix``. Warnings: neither tag (the
    pixel size is unknown, so it cannot be checked), and pixels whose sides differ by more than 1 % (the readers
    resize them as if they were square).
    """
    low, high = expectations.pixel_spacing_range_mm or (0.0, expectations.max_spacing_mm)
    present = {tag: header[tag] for tag in RADIOGRAPH_SPACING_TAGS if header.get(tag) not in (None, "")}
    if not present:
        return GeometryFindings(
            [],
            [
                f"{source}: no PixelSpacing or ImagerPixelSpacing in the header: the pixel size is unknown and cannot "
                "be checked; the image is used as if its pixels were square"
            ],
        )
    errors: list[str] = []
    square = None
    for tag, value in present.items():
        sides = _two_sides(value)
        if sides is None or not all(np.isfinite(sides)) or min(sides) <= 0:
            errors.append(f"{source}: {tag} {value!s} is not two positive numbers (row, column spacing in mm); {fix}")
        elif min(sides) < low or max(sides) > high:
            errors.append(
                f"{source}: {tag} {_spacing_text(sides)} is outside {low:g} - {high:g} mm per pixel "
                f"(pixel_spacing_range_mm): a unit mistake (m, cm or um instead of mm) or a header that does not "
                f"describe the image; {fix}"
            )
        elif square is None:
            square = (tag, sides)
    warnings = []
    if not errors and square is not None and max(square[1]) / min(square[1]) > SQUARE_PIXEL_TOLERANCE:
        tag, sides = square
        warnings.append(
            f"{source}: {tag} {_spacing_text(sides)}: pixels {max(sides) / min(sides):.3g} times longer one way "
            "than the other; the image is resized as if they were square, so the anatomy looks stretched: resample "
            "it to square pixels"
        )
    return GeometryFindings(errors, warnings)


def channel_problem(found: int, source: str, expectations: DataExpectations) -> str | None:
    """A line naming ``source`` when it has ``found`` channels and the bundle expects another count (else None)."""
    if expectations.channels is None or found == expectations.channels:
        return None
    return (
        f"{source}: {found} channel(s), the bundle expects {expectations.channels} (expected_channels); "
        f"{expectations.channels_fix}"
    )


def nifti_header_problems(path: str | os.PathLike, expectations: DataExpectations) -> GeometryFindings:
    """Check a NIfTI file's geometry from its header alone, as stored (nibabel's loader silently turns a zero or
    negative ``pixdim`` into a positive one; MONAI's reader replaces a broken sform by one built from ``pixdim``).

    The spatial ``pixdim`` must be finite and positive, then the best affine (sform, else qform, else ``pixdim``) is
    checked with :func:`affine_problems`. When MONAI's reader would use another affine than that one (sform, qform
    and ``pixdim`` disagree: ``monai.data.utils.correct_nifti_header_if_necessary`` then takes the qform, or the
    sform, whichever matches ``pixdim``), a warning says so: training works, on another geometry than viewers show.
    Unreadable headers are left to the readers' own checks (no finding).
    """
    import nibabel as nib
    from monai.data.utils import correct_nifti_header_if_necessary
    from nibabel.openers import ImageOpener

    path = Path(path)
    try:
        image = nib.load(path)  # header only: the voxels are read on demand
        header_class = type(image.header)
        with ImageOpener(path) as handle:
            header = header_class.from_fileobj(handle, check=False)
    except Exception:  # reported by check_header_size / the reader with the file's name
        return GeometryFindings([], [])
    spatial = max(1, min(3, int(header["dim"][0])))
    pixdim = np.asarray(header["pixdim"][1 : spatial + 1], dtype=np.float64)
    if not np.isfinite(pixdim).all() or np.any(pixdim <= 0):
        return GeometryFindings(
            [
                f"{path}: header spacing (pixdim) {pixdim.tolist()} must be finite and positive; fix the header "
                "(re-export or re-convert the image) or remove it from the datalist"
            ],
            [],
        )
    try:
        affine = header.get_best_affine()
    except Exception as error:  # nibabel's HeaderDataError for an undecomposable qform
        return GeometryFindings([f"{path}: unusable orientation in the header ({error}); fix the header"], [])
    if spatial < 3:
        return GeometryFindings([], [])
    findings = affine_problems(affine, str(path), expectations)
    used = correct_nifti_header_if_necessary(image).affine
    if not findings.errors and not np.allclose(used, affine, atol=1e-3):
        findings.warnings.append(
            f"{path}: the header's sform, qform and pixdim disagree; MONAI's reader uses the affine "
            f"{np.round(used[:3], 3).tolist()} instead of {np.round(affine[:3], 3).tolist()} (what viewers show): "
            "re-save the file with one consistent geometry"
        )
    return findings


_PALETTE_OR_ALPHA = {"P": "palette", "PA": "palette + alpha", "LA": "grey + alpha", "La": "grey + alpha"}


def raster_mode_problem(path: str | os.PathLike, expectations: DataExpectations) -> str | None:
    """A line naming a PNG / JPEG / ... whose PIL mode the readers would turn into wrong intensities (header only):
    palette images (indices, not grey levels), grey + alpha (alpha averaged in) and, where the bundle averages all
    channels, RGBA. Grey and RGB modes pass (RGB is averaged to one channel by the bundles). None when fine."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            mode = image.mode
    except Exception:  # unreadable files are reported by the readers with their own message
        return None
    what = _PALETTE_OR_ALPHA.get(mode) or ("RGB + alpha" if mode == "RGBA" and expectations.averages_rgba else None)
    if what is None:
        return None
    return (
        f"{path}: {what} image (PIL mode {mode}); the reader would "
        f"{'take palette indices for' if mode.startswith('P') else 'average the alpha channel into the'} "
        "intensities: convert it to grayscale first (e.g. PIL Image.convert('L'))"
    )
