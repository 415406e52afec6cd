"""The embedded demo corpus: real files readable by MONAI with the right geometry, deterministic, idempotent."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.data import ITKReader
from monai.transforms import LoadImage

from custom_nets.data.demo import DEMO_CLASSES, make_demo_corpus


def items_of(datalist: Path) -> list[dict]:
    return json.loads(datalist.read_text())["training"]


def spacing_of(image) -> np.ndarray:
    return np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0)


def test_corpus_layout_and_labels(demo_datalist):
    items = items_of(demo_datalist)
    assert len(items) == 16
    for kind in ("image", "volume"):
        labels = sorted(item["class_label"] for item in items if item["kind"] == kind)
        assert labels == sorted(list(range(len(DEMO_CLASSES))) * 2)
    suffixes = {Path(item["image"]).suffix or "folder" for item in items}
    assert suffixes == {".png", ".gz", "folder"}
    assert {item["modality"] for item in items if item["kind"] == "volume"} == {"CT", "MR"}


def test_nifti_volumes_load_with_monai(demo_datalist):
    for item in items_of(demo_datalist):
        if item["image"].endswith(".nii.gz"):
            image = LoadImage(image_only=True)(demo_datalist.parent / item["image"])
            assert image.shape[:2] == (64, 64) and 24 <= image.shape[2] <= 40
            spacing = spacing_of(image)
            assert 0.8 <= spacing[0] <= 1.2 and spacing[0] == pytest.approx(spacing[1])
            assert spacing[2] in (1.5, 2.0, 2.5, 3.0)


def test_dicom_series_geometry_and_values_match_the_headers(demo_datalist):
    series = [item for item in items_of(demo_datalist) if item.get("num_files")]
    assert {item["modality"] for item in series} == {"CT", "MR"}
    for item in series:
        folder = demo_datalist.parent / item["image"]
        files = sorted(folder.glob("*.dcm"))
        assert len(files) == item["num_files"]
        headers = [pydicom.dcmread(f) for f in files]
        assert len({h.SOPInstanceUID for h in headers}) == len(files)
        assert len({h.SeriesInstanceUID for h in headers}) == 1
        assert {h.Modality for h in headers} == {item["modality"]}
        image = LoadImage(reader=ITKReader(), image_only=True)(folder)
        assert tuple(image.shape) == (headers[0].Columns, headers[0].Rows, len(files))
        row_spacing, column_spacing = (float(v) for v in headers[0].PixelSpacing)
        z_step = float(headers[1].ImagePositionPatient[2]) - float(headers[0].ImagePositionPatient[2])
        np.testing.assert_allclose(spacing_of(image), [column_spacing, row_spacing, z_step], rtol=1e-4)
        assert float(headers[0].SliceThickness) == pytest.approx(z_step)
        k = len(files) // 2
        expected = headers[k].pixel_array * float(headers[k].RescaleSlope) + float(headers[k].RescaleIntercept)
        torch.testing.assert_close(image[:, :, k].T.double(), torch.as_tensor(expected, dtype=torch.float64))
        if item["modality"] == "CT":
            assert image.min() <= -900 and image.max() >= 400  # air and bone in Hounsfield units


def test_png_images_load_with_monai(demo_datalist):
    for item in items_of(demo_datalist):
        if item["image"].endswith(".png"):
            image = LoadImage(image_only=True)(demo_datalist.parent / item["image"])
            assert tuple(image.shape) == (64, 64)
            assert 0 <= float(image.min()) < float(image.max()) <= 255


def load_all(datalist: Path) -> list[np.ndarray]:
    loader = LoadImage(image_only=True)
    return [np.asarray(loader(datalist.parent / item["image"])) for item in items_of(datalist)]


def test_corpus_is_deterministic_from_the_seed(tmp_path):
    first = load_all(make_demo_corpus(tmp_path / "a", num_per_class=1, seed=5))
    again = load_all(make_demo_corpus(tmp_path / "b", num_per_class=1, seed=5))
    other = load_all(make_demo_corpus(tmp_path / "c", num_per_class=1, seed=6))
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
    assert not any(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(first, other, strict=True))


def test_complete_corpus_is_reused_and_incomplete_one_rebuilt(tmp_path):
    datalist = make_demo_corpus(tmp_path, num_per_class=1, seed=0)
    stamp = datalist.stat().st_mtime_ns
    assert make_demo_corpus(tmp_path, num_per_class=1, seed=0) == datalist
    assert datalist.stat().st_mtime_ns == stamp
    series = next(item for item in items_of(datalist) if item.get("num_files"))
    removed = sorted((tmp_path / series["image"]).glob("*.dcm"))[-1]
    os.remove(removed)
    make_demo_corpus(tmp_path, num_per_class=1, seed=0)
    assert removed.is_file() and datalist.stat().st_mtime_ns != stamp
    make_demo_corpus(tmp_path, num_per_class=2, seed=0)
    assert len(items_of(datalist)) == 16


@pytest.mark.slow
def test_default_corpus_size_and_variety(tmp_path):
    items = items_of(make_demo_corpus(tmp_path))
    assert len(items) == 48
    volumes = [LoadImage(image_only=True)(tmp_path / item["image"]) for item in items if item["kind"] == "volume"]
    assert len({v.shape[-1] for v in volumes}) >= 5
    assert len({round(float(spacing_of(v)[0]), 3) for v in volumes}) >= 10
