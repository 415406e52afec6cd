"""Datalist loading/validation errors that name the file, and the folder-scanning CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from custom_nets.data.datalist import DatalistError, infer_kind, load_datalist, prepare_items, validate_datalist
from custom_nets.data.demo import _write_dicom_series
from custom_nets.data.make_datalist import make_datalist


def write_datalist(path, items, key="training"):
    path.write_text(json.dumps({key: items}))
    return path


def test_load_resolves_paths_and_fills_defaults(tmp_path, nifti_writer):
    nifti_writer(tmp_path / "vol.nii.gz", np.zeros((4, 4, 3), np.float32))
    Image.fromarray(np.zeros((5, 6), np.uint8)).save(tmp_path / "img.png")
    (tmp_path / "CT").mkdir()  # a folder named like a modality must not turn the modality into a path
    datalist = write_datalist(
        tmp_path / "list.json",
        [{"image": "vol.nii.gz", "modality": "ct", "class_label": 3}, {"image": "img.png"}],
    )
    items = load_datalist(datalist)
    assert items[0] == {
        "image": str(tmp_path / "vol.nii.gz"),
        "modality": "CT",
        "class_label": 3,
        "kind": "volume",
        "global_index": 0,
    }
    assert items[1]["kind"] == "image" and items[1]["modality"] is None and items[1]["class_label"] == -1


def test_missing_file_names_the_file_and_the_fix(tmp_path):
    datalist = write_datalist(tmp_path / "list.json", [{"image": "nowhere/scan.nii.gz"}])
    with pytest.raises(DatalistError, match=r"nowhere/scan.nii.gz: file not found .*fix the path or the base_dir"):
        load_datalist(datalist)


def test_unknown_extension_is_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DatalistError, match=r"notes.txt: unknown file type '.txt'"):
        prepare_items([{"image": "notes.txt"}], tmp_path)


def test_empty_datalist_and_missing_key(tmp_path):
    with pytest.raises(DatalistError, match="empty"):
        load_datalist(write_datalist(tmp_path / "empty.json", []))
    with pytest.raises(DatalistError, match="no 'validation' list"):
        load_datalist(write_datalist(tmp_path / "train.json", [{"image": "x.png"}]), key="validation")
    with pytest.raises(DatalistError, match="datalist file not found"):
        load_datalist(tmp_path / "absent.json")


def test_bad_kind_modality_and_label_are_all_reported(tmp_path):
    Image.fromarray(np.zeros((5, 6), np.uint8)).save(tmp_path / "img.png")
    items = [
        {"image": "img.png", "kind": "movie"},
        {"image": "img.png", "modality": "PET"},
        {"image": "img.png", "class_label": "cat"},
    ]
    with pytest.raises(DatalistError, match="3 problem") as error:
        prepare_items(items, tmp_path)
    assert "kind 'movie'" in str(error.value) and "PET" in str(error.value) and "class_label" in str(error.value)


def test_infer_kind():
    assert infer_kind("a/b.nii.gz") == "volume" and infer_kind("a/b.mhd") == "volume"
    assert infer_kind("a/b.PNG") == "image" and infer_kind("a/b.dcm") == "image"


def test_validate_reports_corrupt_nan_and_wrong_dims_in_one_error(tmp_path, nifti_writer):
    nifti_writer(tmp_path / "good.nii.gz", np.random.rand(6, 6, 4).astype(np.float32))
    nan_volume = np.zeros((6, 6, 4), np.float32)
    nan_volume[1, 2, 3] = np.nan
    nifti_writer(tmp_path / "nan.nii.gz", nan_volume)
    (tmp_path / "corrupt.nii.gz").write_bytes(b"this is not a nifti file")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG broken")
    Image.fromarray(np.zeros((5, 6), np.uint8)).save(tmp_path / "flat.png")
    nifti_writer(tmp_path / "single_slice.nii.gz", np.zeros((6, 6, 1), np.float32))
    items = [
        {"image": "good.nii.gz"},
        {"image": "nan.nii.gz"},
        {"image": "corrupt.nii.gz"},
        {"image": "corrupt.png"},
        {"image": "flat.png", "kind": "volume"},
        {"image": "single_slice.nii.gz"},
    ]
    with pytest.raises(DatalistError, match="5 problem") as error:
        validate_datalist(write_datalist(tmp_path / "list.json", items))
    lines = str(error.value).splitlines()[1:]
    expected = {
        "nan.nii.gz": "NaN/inf",
        "corrupt.nii.gz": "unreadable NIfTI header",
        "corrupt.png": "cannot read",
        "flat.png": "expected a 3D volume",
        "single_slice.nii.gz": "single slice",
    }
    for name, problem in expected.items():
        assert any(str(tmp_path / name) in line and problem in line for line in lines), (name, lines)


def test_validate_summarises_a_good_datalist(demo_datalist):
    summary = validate_datalist(demo_datalist)
    assert summary["items"] == 16
    assert summary["kinds"] == {"volume": 8, "image": 8}
    assert summary["modalities"] == {"CT": 4, "MR": 4, "XR": 8}


def test_make_datalist_scans_every_format(tmp_path, nifti_writer):
    root = tmp_path / "data"
    (root / "lungs" / "series").mkdir(parents=True)
    (root / "brains").mkdir()
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(root / "lungs" / "cxr.png")
    volume = np.zeros((8, 8, 5), np.int16)
    _write_dicom_series(root / "lungs" / "series", volume, (0.7, 0.7, 2.0), "CT", "scan")
    nifti_writer(root / "brains" / "t1.nii.gz", np.zeros((8, 8, 6), np.float32))
    nifti_writer(root / "brains" / "flat.nii", np.zeros((8, 8), np.float32))
    (root / "brains" / "case.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 8 8 4\nElementDataFile = x.raw\n"
    )
    (root / "brains" / "readme.txt").write_text("ignored")
    out = make_datalist(str(root), str(root / "list.json"), class_from_folder=True)
    content = json.loads(open(out).read())
    assert content["classes"] == ["brains", "lungs"]
    assert content["training"] == [
        {"image": "brains/case.mhd", "kind": "volume", "class_label": 0},
        {"image": "brains/flat.nii", "kind": "image", "class_label": 0},
        {"image": "brains/t1.nii.gz", "kind": "volume", "class_label": 0},
        {"image": "lungs/cxr.png", "kind": "image", "class_label": 1},
        {"image": "lungs/series", "kind": "volume", "modality": "CT", "class_label": 1},
    ]


@pytest.mark.parametrize("out_folder", ["elsewhere", "data/lists", "."])
def test_make_datalist_outside_root_resolves_from_the_datalist(tmp_path, nifti_writer, out_folder):
    """Written anywhere but directly in root, paths are absolute: they resolve from the datalist's folder (the
    readers' default) and from root (a bundle's dataset_dir) alike."""
    root = tmp_path / "data"
    (root / "ct").mkdir(parents=True)
    rng = np.random.default_rng(0)
    nifti_writer(root / "ct" / "a.nii.gz", rng.random((6, 6, 4)).astype(np.float32))
    Image.fromarray(rng.integers(0, 255, (8, 9), dtype=np.uint8)).save(root / "b.png")
    out = make_datalist(str(root), str(tmp_path / out_folder / "list.json"))
    paths = [entry["image"] for entry in json.loads(open(out).read())["training"]]
    assert paths == [str((root / "b.png").resolve()), str((root / "ct" / "a.nii.gz").resolve())]
    for base_dir in (None, root):
        assert [item["image"] for item in load_datalist(out, base_dir)] == paths
    assert validate_datalist(out)["items"] == 2


@pytest.mark.slow
def test_make_datalist_cli_with_modality(tmp_path):
    root = tmp_path / "xr"
    root.mkdir()
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(root / "a.jpg")
    out = root / "list.json"
    command = [sys.executable, "-m", "custom_nets.data.make_datalist", "--root", str(root), "--out", str(out)]
    subprocess.run([*command, "--modality", "CR"], check=True, capture_output=True)
    assert json.loads(out.read_text())["training"] == [{"image": "a.jpg", "kind": "image", "modality": "XR"}]


def test_make_datalist_on_an_empty_folder(tmp_path):
    with pytest.raises(DatalistError, match="no PNG/JPG"):
        make_datalist(str(tmp_path), str(tmp_path / "list.json"))
