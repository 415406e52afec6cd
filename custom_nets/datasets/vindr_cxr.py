"""VinDr-CXR preparation, radiograph reading and box handling for the chest X-ray detection bundle (``finetune_cxr``).

VinDr-CXR (Nguyen et al., Scientific Data 2022) gives one DICOM per image (``<image_id>.dicom``) and a CSV with one row
per finding per radiologist: ``image_id, class_name, class_id, rad_id, x_min, y_min, x_max, y_max``. Classes 0-13 are
findings with a box in pixel coordinates of the DICOM (x = column, y = row); class 14 "No finding" has no box.

Box fusion: the boxes of the radiologists for one finding of one image are clustered greedily by IoU (a box joins the
first cluster of the same class whose mean box it overlaps by at least ``iou_threshold``, boxes taken in reading
order) and each cluster becomes the mean of its boxes. This is weighted box fusion (Solovyev et al., 2021) with equal
weights: radiologists' boxes carry no confidence, so WBF's score weighting has nothing to weigh, and the mean keeps a
box that two readers drew slightly apart where NMS would keep one reader's box and drop the other. A finding marked
by a single radiologist is kept (its cluster has one vote); ``min_votes`` drops clusters with fewer readers.

Coordinates: images become tensors ``(1, W, H)`` (x first), the layout MONAI's PNG reader gives 2D images, so a box
``(x_min, y_min, x_max, y_max)`` of the CSV is a MONAI ``xyxy`` box of the tensor without reordering.

Privacy: only pixel data, the tags that decode it (photometric interpretation, rescale, VOI LUT / window, bit
depth) and the pixel size (``PixelSpacing``, ``ImagerPixelSpacing``: checked by :func:`prepare` and at start-up,
its value quoted in the checks' messages and kept in the datalist :func:`prepare` writes; it identifies no one) are
read; no other DICOM tag is ever logged or written, and every output file is named by ``image_id``.

CLI (fire)::

    python -m custom_nets.cli prepare_vindr_cxr --src_dir /data/vindr/train --csv_path /data/vindr/train.csv \
        --out_dir /data/vindr_prepared --image_size 1024
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.apps.detection.transforms.box_ops import zoom_boxes
from monai.config import KeysCollection
from monai.data import MetaTensor, load_decathlon_datalist
from monai.data.box_utils import box_iou
from monai.transforms import MapTransform
from PIL import Image

from custom_nets.atomic_files import atomic_path
from custom_nets.data.datalist import DatalistError
from custom_nets.data.expectations import (
    DataExpectations,
    dicom_pixel_spacing,
    radiograph_spacing_problems,
    raster_mode_problem,
)
from custom_nets.data.segmentation import split_cases, write_datalist

__all__ = [
    "NO_FINDING_CLASS_ID",
    "VINDR_CLASS_NAMES",
    "BoxAnnotation",
    "LoadChestXrayd",
    "check_boxes_inside",
    "detection_item_problems",
    "fuse_boxes",
    "inference_items",
    "load_detection_datalist",
    "prepare",
    "radiograph_problems",
    "read_annotations",
    "read_chest_xray",
    "read_dicom_radiograph",
    "resize_radiograph",
    "scale_boxes",
]

logger = logging.getLogger(__name__)

VINDR_CLASS_NAMES: tuple[str, ...] = (
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Consolidation",
    "ILD",
    "Infiltration",
    "Lung Opacity",
    "Nodule/Mass",
    "Other lesion",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Pulmonary fibrosis",
)
NO_FINDING_CLASS_ID = 14
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = (".png", *DICOM_SUFFIXES)


def read_dicom_radiograph(path: str | os.PathLike) -> np.ndarray:
    """A radiograph DICOM as a float32 ``(rows, cols)`` array in [0, 1], bright = dense (bone white).

    Order (DICOM PS3.4 grayscale pipeline): stored values of any bit depth -> modality LUT or rescale slope /
    intercept -> VOI LUT or window centre / width when present -> MONOCHROME1 inverted, exactly once -> min-max to
    [0, 1]. A Presentation LUT is not applied, so nothing can invert a second time.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    path = Path(path)
    try:
        dataset = pydicom.dcmread(path)
        stored = dataset.pixel_array
    except Exception as error:  # pydicom raises several types for unreadable files; the message names the file only
        raise ValueError(f"{path.name}: not a readable DICOM image ({type(error).__name__}).") from error
    if stored.ndim != 2:
        raise ValueError(f"{path.name}: expected one grayscale frame, got pixel data of shape {stored.shape}.")
    values = apply_voi_lut(apply_modality_lut(stored, dataset), dataset).astype(np.float64)
    values = _unit_range(values)
    if str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        values = 1.0 - values
    return values.astype(np.float32)


def _unit_range(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as handle:
        return handle.read(132)[128:132] == b"DICM"


def read_chest_xray(path: str | os.PathLike) -> np.ndarray:
    """A DICOM (``.dcm`` / ``.dicom`` or a DICOM preamble) or PNG radiograph as float32 ``(rows, cols)`` in [0, 1].

    PNGs are taken as displayed (8 or 16 bit, grayscale or RGB averaged); DICOMs go through
    :func:`read_dicom_radiograph`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    if _is_dicom(path):
        return read_dicom_radiograph(path)
    with Image.open(path) as image:
        pixels = np.asarray(image)
    if pixels.ndim == 3:
        pixels = pixels[..., :3].mean(axis=-1)
    maximum = 255.0 if pixels.dtype == np.uint8 else 65535.0 if pixels.dtype == np.uint16 else float(pixels.max() or 1)
    return (pixels.astype(np.float64) / maximum).astype(np.float32)


def resize_radiograph(pixels: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize ``(rows, cols)`` to ``size = (width, height)`` (bilinear, antialiased), float32."""
    tensor = torch.as_tensor(np.ascontiguousarray(pixels), dtype=torch.float32)[None, None]
    resized = F.interpolate(tensor, size=(int(size[1]), int(size[0])), mode="bilinear", antialias=True)
    return resized[0, 0].clamp(0.0, 1.0).numpy()


def scale_boxes(boxes: np.ndarray | torch.Tensor, from_size: Sequence[int], to_size: Sequence[int]):
    """Scale ``xyxy`` boxes ``(N, 4)`` from an image of ``from_size = (width, height)`` to ``to_size`` (MONAI's
    ``zoom_boxes``); the inverse call with the sizes swapped gives the boxes back."""
    zoom = [float(t) / float(f) for t, f in zip(to_size, from_size, strict=True)]
    return zoom_boxes(boxes, zoom)


def check_boxes_inside(boxes: np.ndarray, size: Sequence[int], image_id: str) -> None:
    """Raise a ``ValueError`` naming ``image_id`` unless every ``xyxy`` box is non-empty and inside ``size``
    ``(width, height)``."""
    for box in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        x_min, y_min, x_max, y_max = box.tolist()
        if not (0 <= x_min < x_max <= size[0] and 0 <= y_min < y_max <= size[1]):
            raise ValueError(
                f"image {image_id}: box (x_min, y_min, x_max, y_max) = {tuple(box.tolist())} is empty or outside the "
                f"image of width {size[0]} and height {size[1]}. Fix or drop this row of the annotation CSV."
            )


def fuse_boxes(
    boxes: np.ndarray, labels: np.ndarray, iou_threshold: float = 0.5, min_votes: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fuse several readers' boxes per class by IoU clustering with mean coordinates (equal-weight WBF).

    Args:
        boxes: ``(N, 4)`` ``xyxy`` boxes in reading order.
        labels: ``(N,)`` class ids.
        iou_threshold: a box joins a cluster of its class when its IoU with the cluster's mean box is at least this.
        min_votes: clusters built from fewer boxes are dropped.

    Returns:
        fused boxes ``(M, 4)`` float32, their labels ``(M,)`` int64 and votes (boxes per cluster) ``(M,)`` int64,
        sorted by class then by order of the cluster's first box.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    fused, fused_labels, votes = [], [], []
    for label in np.unique(labels):
        clusters: list[list[np.ndarray]] = []
        for box in boxes[labels == label]:
            means = np.array([np.mean(c, axis=0) for c in clusters]).reshape(-1, 4)
            overlaps = box_iou(box[None], means)[0] if len(means) else np.zeros(0)
            best = int(np.argmax(overlaps)) if len(overlaps) else -1
            if best >= 0 and overlaps[best] >= iou_threshold:
                clusters[best].append(box)
            else:
                clusters.append([box])
        for cluster in clusters:
            if len(cluster) >= min_votes:
                fused.append(np.mean(cluster, axis=0))
                fused_labels.append(int(label))
                votes.append(len(cluster))
    return (
        np.array(fused, dtype=np.float32).reshape(-1, 4),
        np.array(fused_labels, dtype=np.int64),
        np.array(votes, dtype=np.int64),
    )


@dataclass(frozen=True)
class BoxAnnotation:
    """One finding of one reader: class id 0-13 and its ``xyxy`` box in original pixels."""

    class_id: int
    box: tuple[float, float, float, float]


def read_annotations(csv_path: str | os.PathLike) -> dict[str, list[BoxAnnotation]]:
    """Read a VinDr-CXR annotation CSV into ``{image_id: [BoxAnnotation, ...]}`` (empty list = "No finding" only).

    Raises:
        ValueError: naming the image and the CSV line for an unknown class id or a finding without a box.
    """
    csv_path = Path(csv_path)
    required = {"image_id", "class_id", "x_min", "y_min", "x_max", "y_max"}
    annotations: dict[str, list[BoxAnnotation]] = {}
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = required - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{csv_path}: missing columns {sorted(missing)} (VinDr-CXR annotation CSV expected).")
        for line, row in enumerate(reader, start=2):
            image_id = row["image_id"].strip()
            class_id = int(float(row["class_id"]))
            findings = annotations.setdefault(image_id, [])
            if class_id == NO_FINDING_CLASS_ID:
                continue
            if not 0 <= class_id < len(VINDR_CLASS_NAMES):
                raise ValueError(f"{csv_path}, line {line}, image {image_id}: unknown class_id {class_id} (0-14).")
            coordinates = [row[k].strip() for k in ("x_min", "y_min", "x_max", "y_max")]
            if any(not c or math.isnan(float(c)) for c in coordinates):
                raise ValueError(f"{csv_path}, line {line}, image {image_id}: finding {class_id} has no box.")
            findings.append(BoxAnnotation(class_id, tuple(float(c) for c in coordinates)))
    if not annotations:
        raise ValueError(f"{csv_path}: no annotation rows.")
    return annotations


class LoadChestXrayd(MapTransform):
    """Read DICOM or PNG radiographs (:func:`read_chest_xray`) into ``(1, W, H)`` float32 MetaTensors in [0, 1],
    resized to ``image_size = (width, height)`` when given, with the boxes under ``box_keys`` (``xyxy`` in the pixels of
    the file read) scaled the same way.

    The meta dict keeps ``filename_or_obj``, ``original_size`` ``(W, H)`` and ``spatial_shape`` so that predicted boxes
    can be scaled back to original pixels (:func:`scale_boxes`).
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_size: Sequence[int] | None = None,
        box_keys: KeysCollection = (),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_size = None if image_size is None else tuple(int(s) for s in image_size)
        self.box_keys = [box_keys] if isinstance(box_keys, str) else list(box_keys)
        if self.box_keys and len(self.keys) != 1:
            raise ValueError(f"box_keys need exactly one image key to scale with, got keys {list(self.keys)}.")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = str(d[key])
            pixels = read_chest_xray(path)
            original = (pixels.shape[1], pixels.shape[0])
            if self.image_size is not None and self.image_size != original:
                pixels = resize_radiograph(pixels, self.image_size)
            image = torch.as_tensor(np.ascontiguousarray(pixels.T))[None]
            meta = {"filename_or_obj": path, "original_size": list(original), "spatial_shape": list(image.shape[1:])}
            d[key] = MetaTensor(image, meta=meta)
            for box_key in self.box_keys:
                boxes = np.asarray(d[box_key], dtype=np.float64).reshape(-1, 4)
                d[box_key] = scale_boxes(boxes, original, image.shape[1:]).astype(np.float32)
        return d


def load_detection_datalist(datalist: str | os.PathLike, split: str, dataset_dir: str | os.PathLike) -> list[dict]:
    """The ``split`` section of a detection datalist, ``image`` paths joined to ``dataset_dir`` (boxes untouched)."""
    items = load_decathlon_datalist(datalist, is_segmentation=False, data_list_key=split, base_dir=dataset_dir)
    if not items:
        raise ValueError(f"section '{split}' of {datalist} is empty.")
    return items


def _radiograph(
    path: Path, position: int, expectations: DataExpectations | None
) -> tuple[np.ndarray | None, list[str], list[str]]:
    """Read one radiograph as the bundle does and check it: ``(pixels, [], warnings)``, or ``(None, [the problem],
    [])`` for a missing file, a palette or grey + alpha PNG, an unreadable file, NaN / infinite or constant pixels, or
    a DICOM whose pixel spacing is broken or absurd (:func:`~custom_nets.data.expectations.radiograph_spacing_problems`;
    a DICOM without one, or with non-square pixels, gets a warning)."""
    expectations = DataExpectations(averages_rgba=False) if expectations is None else expectations
    pixels, problem = _readable_radiograph(path, position, expectations)
    if problem is not None:
        return None, [problem], []
    if not _is_dicom(path):
        return pixels, [], []
    spacing = radiograph_spacing_problems(dicom_pixel_spacing(path), str(path), expectations)
    return (None if spacing.errors else pixels), spacing.errors, spacing.warnings


def _readable_radiograph(
    path: Path, position: int, expectations: DataExpectations
) -> tuple[np.ndarray | None, str | None]:
    """``(pixels, None)``, or ``(None, the problem)`` when the file is missing, a palette or grey + alpha PNG,
    unreadable, or holds NaN / infinite or constant pixels."""
    if not path.is_file():
        return None, f"{path}: file not found (item {position}); fix the path or the dataset_dir"
    if not _is_dicom(path):
        mode = raster_mode_problem(path, expectations)
        if mode is not None:
            return None, mode
    try:
        pixels = read_chest_xray(path)
    except Exception as error:  # PIL and pydicom raise many types for unreadable files
        detail = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
        return None, (
            f"{path}: cannot read it as a radiograph ({detail}); it must be one grayscale PNG or DICOM frame: "
            "re-export it or remove it from the datalist"
        )
    if not np.isfinite(pixels).all():
        return None, f"{path}: NaN or infinite pixel values; re-export the image or remove it from the datalist"
    if float(pixels.min()) == float(pixels.max()):
        return None, f"{path}: constant image (every pixel is {float(pixels.min()):g}); remove it from the datalist"
    return pixels, None


def radiograph_problems(
    item: Any, position: int, base_dir: str | os.PathLike, expectations: DataExpectations | None = None
) -> tuple[list[str], list[str]]:
    """Check one inference input (``{"image": path}``, as :func:`inference_items` gives them) with the bundle's
    reader, as :func:`detection_item_problems` checks the image of a training entry; never raises. Returns
    ``(problems, warnings)``."""
    if not isinstance(item, dict) or not isinstance(item.get("image"), str):
        return [f"item {position}: {item!r} is not a dict with an 'image' path"], []
    return _radiograph(Path(base_dir) / item["image"], position, expectations)[1:]


def detection_item_problems(
    item: Any,
    position: int,
    base_dir: str | os.PathLike,
    num_classes: int | None = None,
    expectations: DataExpectations | None = None,
) -> tuple[list[str], list[str], list[str]]:
    """Check one entry of a detection datalist with the bundle's reader; never raises.

    ``item`` is ``{"image": path, "box": [[x_min, y_min, x_max, y_max], ...], "label": [class id per box]}`` (boxes in
    pixels of the file, as :func:`prepare` writes them), ``image`` relative to ``base_dir``. Checks that the image
    exists, is not a palette or grey + alpha PNG (:func:`~custom_nets.data.expectations.raster_mode_problem`; RGB and
    RGBA are fine: :func:`read_chest_xray` averages the colour channels), reads as one grayscale frame
    (:func:`read_chest_xray`), holds finite, not constant values, has a sane pixel spacing when it is a DICOM
    (:func:`~custom_nets.data.expectations.radiograph_spacing_problems`), that every box is non-empty and inside the
    image, and that there is one label per box, each in ``0..num_classes - 1`` (without ``num_classes``: a
    non-negative integer).

    Returns:
        ``(files, problems, warnings)``: the resolved image path (for duplicate detection), one line per problem, each
        naming the file and the fix, and the doubts that do not stop a run (a DICOM without pixel spacing, non-square
        pixels).
    """
    if not isinstance(item, dict) or not {"image", "box", "label"} <= set(item):
        return [], [f"item {position}: {item!r} is not a dict with 'image', 'box' and 'label' (a detection entry)"], []
    path = Path(base_dir) / str(item["image"])
    files = [str(path.resolve())]
    pixels, problems, warnings = _radiograph(path, position, expectations)
    if pixels is None:
        return files, problems, warnings
    return files, _box_problems(item, path, position, (pixels.shape[1], pixels.shape[0]), num_classes), warnings


def _box_problems(
    item: Mapping[str, Any], path: Path, position: int, size: tuple[int, int], num_classes: int | None
) -> list[str]:
    """The problem (at most one) of a detection entry's boxes and labels, for an image of ``size`` (width, height)."""
    try:
        boxes = np.asarray(item["box"], dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(item["label"], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return [
            f"{path}: 'box' (item {position}) must be a list of [x_min, y_min, x_max, y_max] and 'label' a list of "
            f"class ids, got {item['box']!r} and {item['label']!r}"
        ]
    if len(labels) != len(boxes):
        return [f"{path}: {len(boxes)} boxes but {len(labels)} labels (item {position}); one label per box"]
    allowed = f"0..{num_classes - 1}" if num_classes is not None else "integers >= 0"
    wrong = [v for v in labels.tolist() if v != int(v) or v < 0 or (num_classes is not None and v >= num_classes)]
    if wrong:
        shown = [int(v) if v == int(v) else v for v in wrong[:10]]
        return [
            f"{path}: label values {shown} (item {position}) outside {allowed}; a label is the index of its finding "
            "in class_names: fix the label or class_names"
        ]
    try:
        check_boxes_inside(boxes, size, str(item.get("image_id", position)))
    except ValueError as error:
        return [f"{path}: {error}"]
    return []


def inference_items(
    dataset_dir: str | os.PathLike, datalist: str | os.PathLike | None = None, split: str = "testing"
) -> list[dict]:
    """Inputs for inference: the images of ``split`` in ``datalist`` (with their ``image_id``) when given, else every
    ``.png`` / ``.dcm`` / ``.dicom`` file directly in ``dataset_dir`` (items ``{"image": path}``)."""
    if datalist is not None:
        return [
            {k: item[k] for k in ("image", "image_id") if k in item}
            for item in load_detection_datalist(datalist, split, dataset_dir)
        ]
    items = [
        {"image": str(p)}
        for p in sorted(Path(dataset_dir).iterdir())
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not items:
        raise FileNotFoundError(f"no .png / .dcm / .dicom images in {dataset_dir}.")
    return items


def _find_images(src_dir: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(src_dir.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem in found:
                raise ValueError(f"image id {path.stem} appears twice under {src_dir}: {found[path.stem]} and {path}.")
            found[path.stem] = path
    return found


def _write_png(pixels: np.ndarray, target: Path) -> None:
    with atomic_path(target) as temporary:
        Image.fromarray(np.round(pixels * 255.0).astype(np.uint8)).save(temporary)


def _checked_pixel_spacing(images: Mapping[str, Path], expectations: DataExpectations) -> dict[str, dict]:
    """Check the pixel size of every DICOM of ``images`` (``{image_id: file}``) from its header, before any image is
    converted, as the bundle's start-up check would (:func:`~custom_nets.data.expectations.radiograph_spacing_problems`
    with ``expectations``).

    Returns:
        ``{image_id: {tag: [row spacing, column spacing] (mm)}}`` for each DICOM, with the tags of
        :data:`~custom_nets.data.expectations.RADIOGRAPH_SPACING_TAGS` it holds (``{}``: none). The doubts (no tag,
        non-square pixels) are logged as one warning.

    Raises:
        DatalistError: one line per DICOM whose header does not read or whose spacing is broken or absurd, each naming
            the file and the fix.
    """
    fix = "fix the header (re-export the image) or remove the image from src_dir and its rows from the CSV"
    spacing, problems, warnings = {}, [], []
    for image_id, path in images.items():
        if not _is_dicom(path):
            continue
        try:
            values = dicom_pixel_spacing(path)
        except Exception as error:  # pydicom raises several types for unreadable files; the message names the file
            problems.append(f"{path}: not a readable DICOM header ({type(error).__name__}); {fix}")
            continue
        findings = radiograph_spacing_problems(values, str(path), expectations, fix=fix)
        problems.extend(findings.errors)
        warnings.extend(findings.warnings)
        spacing[image_id] = {tag: [float(v) for v in value] for tag, value in values.items()}
    if warnings:
        logger.warning("%d warning(s) about pixel spacing:\n  %s", len(warnings), "\n  ".join(warnings))
    if problems:
        raise DatalistError(f"{len(problems)} DICOM(s) with an unusable pixel spacing: {problems[0]}", problems)
    return spacing


def prepare(
    src_dir: str,
    csv_path: str,
    out_dir: str,
    image_size: int | Sequence[int] = 1024,
    iou_threshold: float = 0.5,
    min_votes: int = 1,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    bundle: str = "finetune_cxr",
) -> str:
    """Read VinDr-CXR DICOMs (or PNGs) and their CSV, write resized 8-bit PNGs and a MONAI detection datalist.

    Writes ``<out_dir>/images/<image_id>.png`` at ``image_size`` (an int for square, or ``(width, height)``) and
    ``<out_dir>/datalist.json`` with ``training`` / ``validation`` / ``testing`` entries ``{"image", "box", "label",
    "image_id", "original_size", "original_pixel_spacing", "votes"}``: ``box`` holds the fused ``xyxy`` boxes scaled to
    ``image_size``, ``label`` their class ids 0-13 (empty for "No finding"), ``original_size`` the DICOM's ``(width,
    height)`` and ``original_pixel_spacing`` its ``PixelSpacing`` / ``ImagerPixelSpacing`` (``{tag: [row, column]}``
    in mm, the tags it holds; ``{}`` for a PNG source). A PNG pixel of the entry spans ``original_size / image_size``
    of those pixels along each axis. Every image of the CSV must be under ``src_dir`` as ``<image_id>.dicom`` /
    ``.dcm`` / ``.png``; a box outside its image is an error naming the image.

    The pixel spacing of every DICOM is checked first, with the ``data_expectations`` of ``bundle``'s ``train.json``
    (``pixel_spacing_range_mm``), as the bundle's start-up check would check the DICOM: a broken or absurd value stops
    the run before any image is converted, listing every such file.

    Returns:
        The datalist path.
    """
    from custom_nets.data.validate_data import bundle_expectations

    src, out = Path(src_dir), Path(out_dir)
    size = (int(image_size), int(image_size)) if isinstance(image_size, (int, float)) else tuple(map(int, image_size))
    annotations = read_annotations(csv_path)
    images = _find_images(src)
    missing = sorted(set(annotations) - set(images))
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of {csv_path} are not under {src}, e.g. {missing[:5]}.")
    spacing = _checked_pixel_spacing({i: images[i] for i in sorted(annotations)}, bundle_expectations(bundle))
    (out / "images").mkdir(parents=True, exist_ok=True)
    entries = {}
    for image_id in sorted(annotations):
        pixels = read_chest_xray(images[image_id])
        original = (pixels.shape[1], pixels.shape[0])
        findings = annotations[image_id]
        boxes = np.array([f.box for f in findings], dtype=np.float64).reshape(-1, 4)
        check_boxes_inside(boxes, original, image_id)
        fused, labels, votes = fuse_boxes(boxes, [f.class_id for f in findings], iou_threshold, min_votes)
        _write_png(resize_radiograph(pixels, size), out / "images" / f"{image_id}.png")
        entries[image_id] = {
            "image": f"images/{image_id}.png",
            "box": np.round(scale_boxes(fused.astype(np.float64), original, size), 3).tolist(),
            "label": labels.tolist(),
            "image_id": image_id,
            "original_size": list(original),
            "original_pixel_spacing": spacing.get(image_id, {}),
            "votes": votes.tolist(),
        }
    splits = split_cases(list(entries), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    datalist = write_datalist(
        out / "datalist.json",
        {name: [entries[i] for i in ids] for name, ids in splits.items()},
        name="VinDr-CXR",
        labels={str(i): n for i, n in enumerate(VINDR_CLASS_NAMES)},
        image_size=list(size),
        box_mode="xyxy",
        fusion={"method": "IoU clustering, mean box (equal-weight WBF)", "iou_threshold": iou_threshold},
    )
    return str(datalist)


if __name__ == "__main__":
    import fire

    fire.Fire({"prepare": prepare})
