"""Atomic writes: the destination holds the old content or the new one, never a partial file or a stray temporary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from custom_nets.atomic_files import atomic_path, atomic_write_json, atomic_write_text


def test_text_and_json_replace_the_old_file_and_leave_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "report.json"
    atomic_write_text(target, "old")
    assert atomic_write_json(target, {"dice": 0.5}) == target
    assert json.loads(target.read_text()) == {"dice": 0.5}
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_a_failing_writer_keeps_the_old_file_and_removes_its_temporary(tmp_path: Path) -> None:
    target = tmp_path / "cases.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(target) as temporary:
            temporary.write_text("half of the ne")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["cases.csv"]


def test_format_suffixes_survive_for_writers_that_choose_the_format_from_the_name(tmp_path: Path) -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    with atomic_path(tmp_path / "rows.npy") as temporary:
        assert temporary.name.endswith(".npy") and temporary.parent == tmp_path
        np.save(temporary, array)  # numpy would append ".npy" to a name without it
    np.testing.assert_array_equal(np.load(tmp_path / "rows.npy"), array)
    with atomic_path(tmp_path / "volume.nii.gz") as temporary:
        assert temporary.name.endswith(".nii.gz")
        nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), temporary)
    assert nib.load(tmp_path / "volume.nii.gz").shape == (2, 2, 2)
    assert sorted(os.listdir(tmp_path)) == ["rows.npy", "volume.nii.gz"]
