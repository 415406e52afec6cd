"""Generated radiograph DICOMs (any photometry, bit depth, LUT) and a tiny VinDr-CXR-like folder with its CSV."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

# Values that must never reach an output (file names, JSON, logs, figures).
PATIENT_IDENTIFIERS = {
    "PatientName": "Doe^Jane^Secretname",
    "PatientID": "PID-778899-SECRET",
    "PatientBirthDate": "19450102",
    "InstitutionName": "Hospital Secretplace",
    "AccessionNumber": "ACC5566778",
    "ReferringPhysicianName": "Who^Doctor^Secretdoc",
}
ROWS, COLS = 80, 96  # non-square, so x (columns) and y (rows) cannot be swapped unnoticed


def write_dicom(
    path: Path,
    stored: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    identifiers: dict[str, str] | None = None,
    **tags,
) -> Path:
    """Write ``stored`` (rows, cols) unsigned values as an uncompressed DICOM with the given tags."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "DX"
    for key, value in (identifiers or {}).items():
        setattr(dataset, key, value)
    dataset.Rows, dataset.Columns = stored.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated = 16
    dataset.BitsStored = bits_stored
    dataset.HighBit = bits_stored - 1
    dataset.PixelRepresentation = 0
    for key, value in tags.items():
        setattr(dataset, key, value)
    dataset.PixelData = stored.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


def chest_phantom(rng: np.random.Generator, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Display values in [0, 1] (bright = dense): dark lungs, bright lesions inside ``boxes`` (x_min, y_min, x_max,
    y_max), a little noise."""
    image = 0.2 + 0.05 * rng.standard_normal((ROWS, COLS))
    for x_min, y_min, x_max, y_max in boxes:
        image[y_min:y_max, x_min:x_max] = 0.9
    return np.clip(image, 0.0, 1.0)


def make_vindr_folder(
    root: Path,
    num_images: int = 8,
    identifiers: dict[str, str] | None = None,
    spacing_tags: dict[str, object] | None = None,
) -> SimpleNamespace:
    """``root/train/<image_id>.dicom`` (12-bit MONOCHROME1 with an INVERSE presentation LUT shape, as DX images are
    stored, with ``spacing_tags``: by default ``ImagerPixelSpacing`` 0.139 mm, a common detector pixel) and
    ``root/train.csv`` with three readers per image: lesions read by two or three of them with jittered boxes, and
    "No finding" images."""
    spacing_tags = {"ImagerPixelSpacing": [0.139, 0.139]} if spacing_tags is None else spacing_tags
    rng = np.random.default_rng(0)
    rows = []
    truth = {}
    for index in range(num_images):
        image_id = f"{index:04d}a1b2c3d4e5f6"
        boxes = [] if index % 4 == 3 else [(10 + 4 * (index % 8), 12, 40 + 4 * (index % 8), 38)]
        if index % 2 == 0 and boxes:
            boxes.append((60, 44, 84, 70))
        display = chest_phantom(rng, boxes)
        stored = np.round((1.0 - display) * 4095)  # MONOCHROME1: dense = low stored values
        write_dicom(
            root / "train" / f"{image_id}.dicom",
            stored,
            photometric="MONOCHROME1",
            identifiers=identifiers,
            PresentationLUTShape="INVERSE",
            **spacing_tags,
        )
        truth[image_id] = boxes
        for reader in ("R8", "R9", "R10"):
            if not boxes:
                rows.append([image_id, "No finding", 14, reader, "", "", "", ""])
                continue
            for number, box in enumerate(boxes):
                if reader == "R10" and number == 1:
                    continue  # the second lesion is read by two radiologists only
                jitter = rng.integers(-1, 2, size=4)
                class_id = 3 if number == 0 else 8
                name = "Cardiomegaly" if class_id == 3 else "Nodule/Mass"
                rows.append([image_id, name, class_id, reader, *(np.array(box) + jitter).tolist()])
    with open(root / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"])
        writer.writerows(rows)
    return SimpleNamespace(root=root, images=root / "train", csv=root / "train.csv", truth=truth)


@pytest.fixture
def cxr() -> SimpleNamespace:
    """The generators above (conftest is not importable as a module)."""
    return SimpleNamespace(
        ROWS=ROWS,
        COLS=COLS,
        PATIENT_IDENTIFIERS=PATIENT_IDENTIFIERS,
        write_dicom=write_dicom,
        chest_phantom=chest_phantom,
        make_vindr_folder=make_vindr_folder,
    )
