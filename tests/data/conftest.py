"""Fixtures of the data tests: a small demo corpus and helpers that write tiny medical files."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from custom_nets.data.demo import make_demo_corpus


@pytest.fixture(scope="session")
def demo_datalist(tmp_path_factory) -> Path:
    """Datalist of a 2-per-class demo corpus (8 volumes, 8 PNG images), generated once per session."""
    return make_demo_corpus(tmp_path_factory.mktemp("demo"), num_per_class=2, seed=3)


def write_nifti(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    """Write ``array`` (X, Y, Z) as NIfTI with a diagonal affine of ``spacing``."""
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), path)
    return path


@pytest.fixture
def nifti_writer():
    return write_nifti
