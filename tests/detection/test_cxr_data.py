"""VinDr-CXR adapter: DICOM photometry, box scaling and fusion, CSV checks, preparation into a detection datalist."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from custom_nets.data.datalist import DatalistError, validate_datalist
from custom_nets.data.validate_data import bundle_expectations
from custom_nets.datasets import vindr_cxr
from custom_nets.datasets.vindr_cxr import (
    LoadChestXrayd,
    check_boxes_inside,
    fuse_boxes,
    read_chest_xray,
    read_dicom_radiograph,
    scale_boxes,
)

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "finetune_cxr"
BOX = (20, 10, 50, 30)  # x_min, y_min, x_max, y_max of a dense (bright) lesion


def _display(cxr) -> np.ndarray:
    return cxr.chest_phantom(np.random.default_rng(1), [BOX])


def _lesion_brighter(image: np.ndarray) -> bool:
    x_min, y_min, x_max, y_max = BOX
    inside = image[y_min:y_max, x_min:x_max].mean()
    return bool(inside > image.mean() + 0.3)


@pytest.mark.parametrize("presentation_shape", [None, "INVERSE"])
def test_monochrome1_reads_the_right_way_up_and_is_inverted_once(cxr, tmp_path, presentation_shape):
    display = _display(cxr)
    stored = np.round((1.0 - display) * 4095)  # MONOCHROME1: dense tissue has low stored values
    tags = {} if presentation_shape is None else {"PresentationLUTShape": presentation_shape}
    path = cxr.write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", **tags)
    image = read_dicom_radiograph(path)
    assert image.shape == (cxr.ROWS, cxr.COLS) and image.dtype == np.float32
    assert _lesion_brighter(image)
    np.testing.assert_allclose(image, (display - display.min()) / np.ptp(display), atol=1e-3)

    # the same pixels as MONOCHROME2 read identically; a prepared PNG of it is not inverted a second time
    same = cxr.write_dicom(tmp_path / "m2.dcm", np.round(display * 4095), photometric="MONOCHROME2")
    np.testing.assert_allclose(read_dicom_radiograph(same), image, atol=1e-3)
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(tmp_path / "m1.png")
    assert _lesion_brighter(read_chest_xray(tmp_path / "m1.png"))


@pytest.mark.parametrize("bits_stored", [8, 12, 16])
def test_any_bit_depth_gives_the_same_image(cxr, tmp_path, bits_stored):
    display = _display(cxr)
    stored = np.round(display * (2**bits_stored - 1))
    path = cxr.write_dicom(tmp_path / f"b{bits_stored}.dcm", stored, bits_stored=bits_stored)
    expected = (display - display.min()) / np.ptp(display)
    np.testing.assert_allclose(read_dicom_radiograph(path), expected, atol=2.0 / 2**bits_stored + 1e-3)


def test_rescale_slope_and_intercept_are_applied(cxr, tmp_path):
    display = _display(cxr)
    # a negative slope turns the stored values around: the modality values are dense = high again
    path = cxr.write_dicom(tmp_path / "r.dcm", np.round((1.0 - display) * 4095), RescaleSlope=-1, RescaleIntercept=4095)
    assert _lesion_brighter(read_dicom_radiograph(path))


def test_voi_lut_sequence_is_applied(cxr, tmp_path):
    display = _display(cxr)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]  # entries, first mapped value, bits per entry
    item.LUTData = np.repeat(np.array([0, 65535], dtype=np.uint16), 2048).tobytes()  # a step: a binary display
    path = cxr.write_dicom(tmp_path / "voi.dcm", np.round(display * 4095), VOILUTSequence=[item])
    image = read_dicom_radiograph(path)
    assert set(np.unique(image).tolist()) == {0.0, 1.0}
    assert _lesion_brighter(image)


def test_window_is_applied(cxr, tmp_path):
    display = _display(cxr)
    path = cxr.write_dicom(tmp_path / "w.dcm", np.round(display * 4095), WindowCenter=2048, WindowWidth=400)
    image = read_dicom_radiograph(path)
    saturated = np.isclose(image, 0.0) | np.isclose(image, 1.0)
    assert saturated.mean() > 0.95  # every pixel outside 2048 +- 200 is clipped; without the window none would be
    assert _lesion_brighter(image)


def test_box_scaling_round_trip():
    boxes = np.array([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 96.0, 80.0]])
    scaled = scale_boxes(boxes, (96, 80), (64, 64))
    np.testing.assert_allclose(scaled[1], [0, 0, 64, 64])
    np.testing.assert_allclose(scaled[0], [10 * 64 / 96, 20 * 64 / 80, 30 * 64 / 96, 40 * 64 / 80])
    np.testing.assert_allclose(scale_boxes(scaled, (64, 64), (96, 80)), boxes, atol=1e-5)


def test_loader_resizes_image_and_boxes_together(cxr, tmp_path):
    display = _display(cxr)
    path = cxr.write_dicom(tmp_path / "x.dcm", np.round(display * 4095))
    item = LoadChestXrayd("image", image_size=(48, 40), box_keys="box")({"image": str(path), "box": [list(BOX)]})
    image, box = item["image"], item["box"]
    assert tuple(image.shape) == (1, 48, 40)  # (C, W, H): x first, as MONAI reads 2D PNGs
    assert image.meta["original_size"] == [cxr.COLS, cxr.ROWS]
    np.testing.assert_allclose(box[0], [20 / 2, 10 / 2, 50 / 2, 30 / 2])
    x_min, y_min, x_max, y_max = np.round(box[0]).astype(int)
    assert image[0, x_min:x_max, y_min:y_max].mean() > image.mean() + 0.3  # the box still frames the lesion


def test_fusion_hand_case():
    boxes = np.array(
        [
            [10, 10, 20, 20],  # reader 1, class 0
            [12, 10, 22, 20],  # reader 2, class 0: IoU 8/12 = 0.67 with the first -> fused
            [50, 50, 60, 60],  # reader 2, class 0, elsewhere -> its own cluster
            [10, 10, 20, 20],  # reader 3, class 5: same place, other class -> never fused across classes
            [11, 10, 21, 20],  # reader 3, class 0: IoU with the mean box (11, 10, 21, 20) = 1 -> joins the first
        ],
        dtype=float,
    )
    labels = np.array([0, 0, 0, 5, 0])
    fused, fused_labels, votes = fuse_boxes(boxes, labels, iou_threshold=0.5)
    np.testing.assert_allclose(fused, [[11, 10, 21, 20], [50, 50, 60, 60], [10, 10, 20, 20]])
    assert fused_labels.tolist() == [0, 0, 5] and votes.tolist() == [3, 1, 1]
    kept, _, kept_votes = fuse_boxes(boxes, labels, iou_threshold=0.5, min_votes=2)
    np.testing.assert_allclose(kept, [[11, 10, 21, 20]])
    assert kept_votes.tolist() == [3]
    empty = fuse_boxes(np.zeros((0, 4)), np.zeros(0))
    assert empty[0].shape == (0, 4) and empty[1].shape == (0,)


def test_box_outside_image_is_rejected_naming_the_image(cxr, tmp_path):
    with pytest.raises(ValueError, match="image abc123.*outside"):
        check_boxes_inside(np.array([[0, 0, 97, 10]]), (96, 80), "abc123")
    folder = cxr.make_vindr_folder(tmp_path / "raw", num_images=4)
    lines = folder.csv.read_text().splitlines()
    bad_id = lines[1].split(",")[0]
    lines.append(f"{bad_id},Nodule/Mass,8,R8,90,70,100,79")  # x_max 100 > width 96
    folder.csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"image {bad_id}"):
        vindr_cxr.prepare(str(folder.images), str(folder.csv), str(tmp_path / "out"), image_size=64)


def test_finding_without_box_is_rejected(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\nimg7,Nodule/Mass,8,R1,,,,\n")
    with pytest.raises(ValueError, match="image img7: finding 8 has no box"):
        vindr_cxr.read_annotations(path)


def test_prepare_writes_detection_datalist(cxr, tmp_path):
    folder = cxr.make_vindr_folder(tmp_path / "raw", num_images=8)
    datalist = json.loads(
        open(vindr_cxr.prepare(str(folder.images), str(folder.csv), str(tmp_path / "out"), image_size=64)).read()
    )
    entries = [e for split in ("training", "validation", "testing") for e in datalist[split]]
    assert len(entries) == 8 and datalist["image_size"] == [64, 64]
    for entry in entries:
        assert set(entry) >= {"image", "box", "label", "image_id", "original_size"}
        assert entry["image"] == f"images/{entry['image_id']}.png"
        assert entry["original_size"] == [cxr.COLS, cxr.ROWS]
        assert entry["original_pixel_spacing"] == {"ImagerPixelSpacing": [0.139, 0.139]}  # the DICOM's, kept
        truth = folder.truth[entry["image_id"]]
        assert len(entry["box"]) == len(entry["label"]) == len(truth)  # readers' boxes fused to one per lesion
        expected = scale_boxes(np.array(truth, dtype=float).reshape(-1, 4), (cxr.COLS, cxr.ROWS), (64, 64))
        np.testing.assert_allclose(np.array(entry["box"]).reshape(-1, 4), expected, atol=64 / cxr.ROWS)
        png = np.asarray(Image.open(tmp_path / "out" / entry["image"]))
        assert png.shape == (64, 64) and png.dtype == np.uint8
        if truth:  # MONOCHROME1 + INVERSE presentation shape: the lesion is bright in the PNG
            x_min, y_min, x_max, y_max = np.round(entry["box"][0]).astype(int)
            assert png[y_min + 2 : y_max - 2, x_min + 2 : x_max - 2].mean() > png.mean() + 60
    assert {v for e in entries for v in e.get("votes", [])} <= {1, 2, 3}


def test_prepare_refuses_dicoms_with_an_absurd_pixel_spacing_before_converting_any(cxr, tmp_path, caplog):
    """prepare_vindr_cxr checks every DICOM's pixel spacing with finetune_cxr's expectations before it converts one:
    each bad file is one line naming the file, the tag and the fix, and nothing is written; a DICOM without spacing
    is converted with a warning and an empty ``original_pixel_spacing``."""
    folder = cxr.make_vindr_folder(tmp_path / "raw", num_images=4)
    first, second, third = sorted(folder.images.iterdir())[:3]
    stored = np.round(_display(cxr) * 4095)
    cxr.write_dicom(first, stored, PixelSpacing=[139.0, 139.0])  # micrometres written as mm
    cxr.write_dicom(second, stored, ImagerPixelSpacing=[0.0, 0.139])
    with pytest.raises(DatalistError) as refused:
        vindr_cxr.prepare(str(folder.images), str(folder.csv), str(tmp_path / "out"), image_size=64)
    fix = "fix the header (re-export the image) or remove the image from src_dir and its rows from the CSV"
    assert refused.value.problems == [
        f"{first}: PixelSpacing 139 x 139 mm is outside 0.02 - 5 mm per pixel (pixel_spacing_range_mm): a unit "
        f"mistake (m, cm or um instead of mm) or a header that does not describe the image; {fix}",
        f"{second}: ImagerPixelSpacing [0.0, 0.139] is not two positive numbers (row, column spacing in mm); {fix}",
    ]
    assert not (tmp_path / "out").exists()

    cxr.write_dicom(first, stored, PixelSpacing=[0.125, 0.125])
    cxr.write_dicom(second, stored)  # no spacing: a warning
    with caplog.at_level("WARNING", logger="custom_nets.datasets.vindr_cxr"):
        datalist = json.loads(
            Path(vindr_cxr.prepare(str(folder.images), str(folder.csv), str(tmp_path / "out"), 64)).read_text()
        )
    assert f"{second}: no PixelSpacing or ImagerPixelSpacing in the header" in caplog.text
    spacing = {
        e["image_id"]: e["original_pixel_spacing"] for s in ("training", "validation", "testing") for e in datalist[s]
    }
    assert spacing == {
        first.stem: {"PixelSpacing": [0.125, 0.125]},
        second.stem: {},
        third.stem: {"ImagerPixelSpacing": [0.139, 0.139]},
        **{p.stem: {"ImagerPixelSpacing": [0.139, 0.139]} for p in sorted(folder.images.iterdir())[3:]},
    }


SPACING_CASES = {  # DICOM tags -> (the start of the one problem, or None; the start of the one warning, or None)
    "zero": ({"PixelSpacing": [0.0, 0.15]}, "PixelSpacing [0.0, 0.15] is not two positive numbers", None),
    "negative": ({"ImagerPixelSpacing": [-0.14, 0.14]}, "ImagerPixelSpacing [-0.14, 0.14] is not two positive", None),
    "one_value": ({"PixelSpacing": "0.14"}, "PixelSpacing 0.14 is not two positive numbers", None),
    "micrometres": ({"PixelSpacing": [150.0, 150.0]}, "PixelSpacing 150 x 150 mm is outside 0.02 - 5 mm", None),
    "metres": ({"ImagerPixelSpacing": [0.00015, 0.00015]}, "ImagerPixelSpacing 0.00015 x 0.00015 mm is outside", None),
    "broken_beside_a_good_one": (
        {"PixelSpacing": [0.14, 0.14], "ImagerPixelSpacing": [0.0, 0.0]},
        "ImagerPixelSpacing [0.0, 0.0] is not two positive numbers",
        None,
    ),
    "missing": ({}, None, "no PixelSpacing or ImagerPixelSpacing in the header"),
    "not_square": ({"PixelSpacing": [0.1, 0.2]}, None, "PixelSpacing 0.1 x 0.2 mm: pixels 2 times longer"),
    "detector_only": ({"ImagerPixelSpacing": [0.139, 0.139]}, None, None),
    "both": ({"PixelSpacing": [0.125, 0.125], "ImagerPixelSpacing": [0.139, 0.139]}, None, None),
}


@pytest.mark.parametrize("case", list(SPACING_CASES))
def test_dicom_pixel_spacing_is_checked_with_the_bundle_expectations(cxr, tmp_path, case):
    """``validate_data --bundle finetune_cxr`` on a detection datalist of one generated DICOM: a broken or absurd
    PixelSpacing / ImagerPixelSpacing is one problem naming the file, the tag and the fix; a missing or non-square
    one a warning; a sane one nothing."""
    tags, problem, warning = SPACING_CASES[case]
    stored = np.round(_display(cxr) * 4095)
    path = cxr.write_dicom(tmp_path / "cxr.dcm", stored, **tags)
    item = {"image": "cxr.dcm", "box": [BOX], "label": [3]}
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [item]}))
    expectations = bundle_expectations("finetune_cxr")
    if problem is not None:
        with pytest.raises(DatalistError) as refused:
            validate_datalist(tmp_path / "datalist.json", expectations=expectations)
        (line,) = refused.value.problems
        assert line.startswith(f"[training] {path}: {problem}"), line
        assert line.endswith("fix the header (re-export the image) or remove it from the datalist")
        return
    warnings = validate_datalist(tmp_path / "datalist.json", expectations=expectations)["warnings"]
    assert len(warnings) == (0 if warning is None else 1), warnings
    assert all(line.startswith(f"[training] {path}: {warning}") for line in warnings)


@pytest.mark.slow
def test_an_absurd_pixel_spacing_stops_inference_at_start_up(cxr, tmp_path, bundle_checks):
    """finetune_cxr's inference.json checks the pixel spacing of its DICOM inputs with the same expectations as its
    training (PixelSpacing in micrometres: refused, naming the file); with ``skip_bad`` the other image is read."""
    root = tmp_path / "finetune_cxr"
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("models", "outputs"))
    folder = tmp_path / "images"
    stored = np.round(_display(cxr) * 4095)
    good = cxr.write_dicom(folder / "good.dcm", stored, PixelSpacing=[0.139, 0.139])
    bad = cxr.write_dicom(folder / "micrometres.dcm", stored, PixelSpacing=[139.0, 139.0])
    settings = {"dataset_dir": str(folder), "encoder_depth": 18, "fpn_channels": 16, "image_size": [64, 64]}
    with pytest.raises(RuntimeError) as stopped:  # MONAI wraps errors of the config's "initialize"
        bundle_checks.inference_workflow(root, **settings)
    (line,) = stopped.value.__cause__.problems
    assert line.startswith(f"{bad}: PixelSpacing 139 x 139 mm is outside 0.02 - 5 mm per pixel")
    workflow = bundle_checks.inference_workflow(root, skip_bad=True, **settings)
    assert workflow.parser.get_parsed_content("checked_items") == [{"image": str(good)}]
