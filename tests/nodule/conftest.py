"""Tiny generated LUNA16 folders: MetaImage scans (non-identity direction, anisotropic spacing) with planted nodules
and the three CSV files, written with ITK as LUNA16 ships them (``subset<N>/<seriesuid>.mhd`` + ``.raw``)."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

SIZE = (28, 24, 12)  # voxels along i, j, k (numpy array (12, 24, 28))
SPACING = (1.2, 1.5, 2.5)  # mm along i, j, k
# Index axes i and j swapped and flipped (a rotation about z): world x runs along -j, world y along i.
DIRECTION = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
ORIGIN = (40.0, -30.0, -100.0)
NODULE_DIAMETER_MM = 8.0


def write_scan(path: Path, array: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=DIRECTION) -> Path:
    """Write ``array`` ``(k, j, i)`` as a MetaImage ``.mhd`` + ``.raw`` with the given header."""
    import itk

    path.parent.mkdir(parents=True, exist_ok=True)
    image = itk.image_from_array(np.ascontiguousarray(array))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction, dtype=np.float64)))
    itk.imwrite(image, str(path))
    return path


def write_dicom_series(folder: Path, array: np.ndarray, uid: str, spacing=SPACING, origin=ORIGIN) -> Path:
    """Write ``array`` ``(k, j, i)`` HU as a CT DICOM series (one file per slice, stored value = HU + 1024 with
    RescaleIntercept -1024), axial orientation (identity direction), SeriesInstanceUID ``uid``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    for k, plane in enumerate(array):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", "test", study, uid
        ds.Rows, ds.Columns = plane.shape
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing (j), column spacing (i)
        ds.SliceThickness = float(spacing[2])
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [float(origin[0]), float(origin[1]), float(origin[2]) + k * float(spacing[2])]
        ds.InstanceNumber = k + 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (plane.astype(np.int32) + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)
    return folder


def index_to_world(index) -> np.ndarray:
    return np.asarray(ORIGIN) + DIRECTION @ (np.asarray(index, dtype=np.float64) * np.asarray(SPACING))


def planted_scan(nodule_indices, rng: np.random.Generator) -> np.ndarray:
    """Lung-like air with noise and one bright sphere (soft tissue, ~40 HU) per nodule (index i, j, k)."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in SIZE[::-1]), indexing="ij")
    array = -850.0 + rng.normal(0.0, 30.0, SIZE[::-1])
    for ci, cj, ck in nodule_indices:
        distance = np.sqrt(((i - ci) * SPACING[0]) ** 2 + ((j - cj) * SPACING[1]) ** 2 + ((k - ck) * SPACING[2]) ** 2)
        array[distance <= NODULE_DIAMETER_MM / 2] = 40.0
    return array.astype(np.int16)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def make_luna_folder(root: Path, num_scans: int = 4, seed: int = 0) -> SimpleNamespace:
    """``num_scans`` scans, scan ``s`` in ``subset<s>``; each holds one nodule, two candidates on it, three
    non-nodule candidates; scan 0 also has an excluded finding with a candidate on it."""
    rng = np.random.default_rng(seed)
    candidates, annotations, excluded, uids = [], [], [], []
    for scan in range(num_scans):
        uid = f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{100 + scan}"
        uids.append(uid)
        nodule = (8 + scan, 14, 6)
        write_scan(root / f"subset{scan}" / f"{uid}.mhd", planted_scan([nodule], rng))
        world = index_to_world(nodule)
        annotations.append([uid, *world, NODULE_DIAMETER_MM])
        candidates.append([uid, *world, 1])
        candidates.append([uid, *(world + [1.0, -1.0, 0.5]), 1])  # a second hit on the same nodule
        for background in ((20, 5, 3), (22, 18, 9), (4, 4, 2)):
            candidates.append([uid, *index_to_world(background), 0])
        if scan == 0:
            finding = index_to_world((20, 5, 3))  # an excluded finding on the first non-nodule candidate
            excluded.append([uid, *finding, -1])
    header = ["seriesuid", "coordX", "coordY", "coordZ"]
    _write_csv(root / "candidates_V2.csv", [*header, "class"], candidates)
    _write_csv(root / "annotations.csv", [*header, "diameter_mm"], annotations)
    _write_csv(root / "annotations_excluded.csv", [*header, "diameter_mm"], excluded)
    return SimpleNamespace(root=root, uids=uids)


@pytest.fixture
def luna_data() -> SimpleNamespace:
    """The generators above (conftest is not importable as a module)."""
    return SimpleNamespace(
        SIZE=SIZE,
        SPACING=SPACING,
        DIRECTION=DIRECTION,
        ORIGIN=ORIGIN,
        write_scan=write_scan,
        write_dicom_series=write_dicom_series,
        index_to_world=index_to_world,
        planted_scan=planted_scan,
        make_luna_folder=make_luna_folder,
    )
