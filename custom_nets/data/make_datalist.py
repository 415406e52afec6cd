"""Build a mixed 2D/3D datalist by scanning folders (fire CLI).

    python -m custom_nets.data.make_datalist --root DIR --out datalist.json [--modality CT] [--class_from_folder]

Found under ``root`` (recursively):

- PNG/JPG/BMP/TIFF files -> 2D images;
- DICOM files (``.dcm`` or any file with the DICOM preamble): the files of one folder are grouped by
  SeriesInstanceUID; a series of several single-frame files is one volume (the entry is the folder), a lone
  single-frame file a 2D image, a multi-frame file a volume;
- NIfTI, MetaImage (``.mhd``/``.mha``) and NRRD files -> volumes, or 2D images when their header says so
  (fewer than 3 dimensions or one slice).

Each entry records ``image``, ``kind``, ``modality`` (``--modality``, else the DICOM
``Modality`` tag when it is a known one) and, with ``class_from_folder``, ``class_label``: the index of the item's
top-level folder under ``root`` in sorted order (the names are stored in the datalist's ``classes``). Used to prepare
data for joint image-volume pretraining (arXiv 2212.01893).

Image paths resolve wherever the datalist is written: relative (portable) when the datalist is written directly in
``root``, where a relative path means the same from the datalist's folder (the readers' default ``base_dir``) and from
``root`` (a bundle's ``dataset_dir``); absolute otherwise, since no relative path can be right for both then.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import pydicom

from custom_nets.atomic_files import atomic_write_json
from custom_nets.data.datalist import (
    DICOM_EXTENSIONS,
    IMAGE_EXTENSIONS,
    VOLUME_EXTENSIONS,
    DatalistError,
    file_suffix,
    is_dicom_file,
)
from custom_nets.data.file_checks import text_header_shape
from custom_nets.data.intensity import MODALITY_ALIASES, canonical_modality

__all__ = ["scan_folder", "make_datalist"]

logger = logging.getLogger(__name__)


def _header_kind(path: Path) -> str:
    """``image`` or ``volume`` from the header of a NIfTI / MetaImage / NRRD file."""
    suffix = file_suffix(path)
    if suffix in (".nii", ".nii.gz"):
        shape = nib.load(path).shape
    else:
        shape = text_header_shape(path)
    return "volume" if len(shape) >= 3 and shape[2] > 1 else "image"


def _dicom_groups(files: list[Path]) -> list[tuple[list[Path], pydicom.Dataset]]:
    """Group DICOM files by SeriesInstanceUID, reading headers only."""
    groups: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as error:  # pydicom raises several types for broken files
            raise DatalistError(f"{path}: not a readable DICOM file ({error}); repair or remove it") from error
        groups[str(header.get("SeriesInstanceUID", path))].append((path, header))
    return [([p for p, _ in members], members[0][1]) for members in groups.values()]


def _dicom_modality(header: pydicom.Dataset, modality: str | None) -> str | None:
    if modality is not None:
        return modality
    value = str(header.get("Modality", "")).upper()
    return canonical_modality(value) if value in MODALITY_ALIASES else None


def scan_folder(root: str | os.PathLike, modality: str | None = None) -> list[dict]:
    """Entries (``image`` absolute path, ``kind``, ``modality``) for every usable file under ``root``, sorted by path.

    Raises:
        DatalistError: ``root`` is not a folder, or a DICOM/MetaImage header is unreadable.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatalistError(f"{root}: not a folder; pass --root the folder holding the images")
    modality = canonical_modality(modality)
    entries = []
    for folder, _, names in os.walk(root):
        folder_path = Path(folder)
        dicom_files = []
        for name in sorted(names):
            path = folder_path / name
            suffix = file_suffix(path)
            if suffix in IMAGE_EXTENSIONS:
                entries.append({"image": path, "kind": "image", "modality": modality})
            elif suffix in VOLUME_EXTENSIONS:
                entries.append({"image": path, "kind": _header_kind(path), "modality": modality})
            elif suffix in DICOM_EXTENSIONS or (suffix == "" and is_dicom_file(path)):
                dicom_files.append(path)
        groups = _dicom_groups(dicom_files)
        series = [(files, header) for files, header in groups if len(files) > 1]
        if len(series) > 1:
            logger.warning(
                "%s holds %d DICOM series; only the first one is read from a folder entry", folder, len(series)
            )
        if series:
            files, header = series[0]
            entries.append({"image": folder_path, "kind": "volume", "modality": _dicom_modality(header, modality)})
        for files, header in groups:
            if len(files) == 1:
                frames = int(header.get("NumberOfFrames", 1) or 1)
                kind = "volume" if frames > 1 else "image"
                entries.append({"image": files[0], "kind": kind, "modality": _dicom_modality(header, modality)})
    return sorted(entries, key=lambda entry: str(entry["image"]))


def make_datalist(
    root: str,
    out: str,
    modality: str | None = None,
    class_from_folder: bool = False,
    key: str = "training",
) -> str:
    """Scan ``root`` and write a decathlon-style datalist JSON to ``out``; return the path written.

    Args:
        root: folder to scan recursively (use it as the bundle's ``dataset_dir``).
        out: output JSON path. Directly in ``root``: image paths are written relative to it; anywhere else: absolute,
            so that they resolve from the datalist's folder and from ``root`` alike.
        modality: modality of every item (CT, MR, XR or an alias); default: the DICOM tag, else unspecified.
        class_from_folder: add ``class_label`` from each item's top-level folder under ``root``.
        key: name of the list in the JSON.

    Raises:
        DatalistError: nothing usable found, unreadable headers, or items directly in ``root`` with
            ``class_from_folder``.
    """
    root_path = Path(root).resolve()
    entries = scan_folder(root_path, modality)
    if not entries:
        raise DatalistError(f"{root_path}: no PNG/JPG, DICOM, NIfTI, MetaImage or NRRD file found; check --root")
    out_path = Path(out)
    relative_paths = out_path.resolve().parent == root_path
    items = []
    for entry in entries:
        image = Path(entry["image"]).resolve()
        written = image.relative_to(root_path).as_posix() if relative_paths else str(image)
        item = {"image": written, "kind": entry["kind"]}
        if entry["modality"] is not None:
            item["modality"] = entry["modality"]
        items.append(item)
    paths = "relative to the datalist's folder" if relative_paths else "absolute"
    content: dict = {"name": root_path.name, "description": f"scanned from {root_path}; image paths {paths}"}
    if class_from_folder:
        tops = [Path(entry["image"]).resolve().relative_to(root_path).parts for entry in entries]
        flat = ["/".join(parts) for parts in tops if len(parts) < 2]
        if flat:
            raise DatalistError(
                f"{root_path}: {len(flat)} item(s) lie directly in root (e.g. {flat[0]}); with --class_from_folder "
                "every item must be inside a class folder"
            )
        classes = sorted({parts[0] for parts in tops})
        for item, parts in zip(items, tops, strict=True):
            item["class_label"] = classes.index(parts[0])
        content["classes"] = classes
    content[key] = items
    atomic_write_json(out_path, content)
    logger.info("wrote %d items to %s", len(items), out_path)
    return str(out_path)


if __name__ == "__main__":
    from custom_nets.command_line import fire_command

    fire_command(make_datalist)
