"""Tiny generated MM-WHS and BraTS folders for the segmentation tests (raw label codes, non-RAS affines)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from custom_nets.datasets.mmwhs import MMWHS_RAW_LABELS

SHAPE = (24, 20, 6)
# LPS-like axes with swapped in-plane axes and anisotropic spacing: Orientationd must reorient and Invertd undo it.
AFFINE = np.array([[0.0, -1.5, 0.0, 30.0], [-1.2, 0.0, 0.0, 20.0], [0.0, 0.0, 2.5, -7.0], [0.0, 0.0, 0.0, 1.0]])


def heart_label() -> np.ndarray:
    """Raw MM-WHS codes: seven 2-voxel-wide bars in slices 1-4, slices 0 and 5 empty."""
    label = np.zeros(SHAPE, dtype=np.int16)
    for index, value in enumerate(MMWHS_RAW_LABELS):
        label[2 + 3 * index : 4 + 3 * index, 4:16, 1:5] = value
    return label


def brats_label() -> np.ndarray:
    """BraTS codes: oedema 2 around a core 1 around enhancing 4 in slices 2-4."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[6:18, 5:15, 2:5] = 2
    label[8:16, 7:13, 2:5] = 1
    label[10:14, 9:11, 2:5] = 4
    return label


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def make_heart_folder(root: Path, case_ids: tuple[int, ...] = (1001, 1002, 1003, 1004)) -> Path:
    rng = np.random.default_rng(0)
    for case_id in case_ids:
        label = heart_label()
        image = (label > 0) * 300.0 - 100.0 + rng.normal(0.0, 20.0, SHAPE)
        write_nifti(root / f"ct_train_{case_id}_image.nii.gz", image.astype(np.float32))
        write_nifti(root / f"ct_train_{case_id}_label.nii.gz", label)
    return root


def make_brats_folder(root: Path, num_cases: int = 4) -> Path:
    rng = np.random.default_rng(1)
    for index in range(num_cases):
        case = f"BraTS20_Training_{index + 1:03d}"
        label = brats_label()
        for modality in ("flair", "t1", "t1ce", "t2"):
            image = 100.0 + (label > 0) * 200.0 + rng.normal(0.0, 10.0, SHAPE)
            image[:2] = 0.0  # background outside the head
            write_nifti(root / case / f"{case}_{modality}.nii.gz", image.astype(np.float32))
        write_nifti(root / case / f"{case}_seg.nii.gz", label)
    return root


@pytest.fixture
def heart_raw(tmp_path: Path) -> Path:
    return make_heart_folder(tmp_path / "mmwhs_raw")


@pytest.fixture
def brats_raw(tmp_path: Path) -> Path:
    return make_brats_folder(tmp_path / "brats_raw")


@pytest.fixture
def seg_data() -> SimpleNamespace:
    """The generators above, for tests that build their own variants (conftest is not importable as a module)."""
    return SimpleNamespace(
        AFFINE=AFFINE,
        SHAPE=SHAPE,
        heart_label=heart_label,
        brats_label=brats_label,
        write_nifti=write_nifti,
        make_heart_folder=make_heart_folder,
        make_brats_folder=make_brats_folder,
    )
