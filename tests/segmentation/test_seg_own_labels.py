"""Own data through finetune_brainseg: a plain grey / white matter label map (values 0, 1, 2), not BraTS codes.

The issue this guards against: with the default ``label_mode`` the values 1 and 2 passed as BraTS codes, were merged
into "whole tumour", and a third class that no label holds scored a perfect 1, inflating the mean.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import run
from monai.data import MetaTensor

from custom_nets.data.segmentation import make_datalist
from custom_nets.datasets import brats

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "finetune_brainseg"
TINY = {"encoder_depth": 18, "decoder_channels": [16, 16, 8, 8, 8], "image_size": [32, 32], "num_workers": 0}


def _tissue_label(shape: tuple[int, ...]) -> np.ndarray:
    """Grey matter 1 around white matter 2 in slices 1-4."""
    label = np.zeros(shape, dtype=np.uint8)
    label[4:20, 3:17, 1:5] = 1
    label[8:16, 6:14, 1:5] = 2
    return label


def _own_dataset(root: Path, seg_data) -> Path:
    rng = np.random.default_rng(2)
    for index in range(4):
        label = _tissue_label(seg_data.SHAPE)
        image = 50.0 + 100.0 * label + rng.normal(0.0, 5.0, seg_data.SHAPE)
        seg_data.write_nifti(root / "images" / f"brain{index}.nii.gz", image.astype(np.float32))
        seg_data.write_nifti(root / "labels" / f"brain{index}.nii.gz", label)
    return Path(
        make_datalist(
            str(root / "images"),
            str(root / "labels"),
            str(root / "datalist.json"),
            val_fraction=0.25,
            test_fraction=0.25,
        )
    )


def _run(bundle: Path, configs: list[str], **overrides) -> None:
    run(
        config_file=[str(bundle / "configs" / c) for c in configs],
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        bundle_root=str(bundle),
        **overrides,
    )


def test_label_mode_and_class_names_must_agree():
    with pytest.raises(ValueError, match=r"label_mode 'whole_tumour' .* class_names has 3.*set label_mode 'plain'"):
        brats.check_label_mode("whole_tumour", ["background", "gm", "wm"])
    with pytest.raises(ValueError, match="trains 3 classes"):
        brats.check_label_mode("regions", ["background", "tumour"])
    with pytest.raises(ValueError, match="one class name per label value"):
        brats.check_label_mode("plain", ["background"])
    with pytest.raises(ValueError, match="label_mode must be one of"):
        brats.check_label_mode("tissue", ["background", "gm"])
    brats.check_label_mode("plain", ["background", "gm", "wm"])


def test_plain_labels_are_kept_and_checked_against_class_names():
    label = MetaTensor(torch.tensor([[[[0.0, 1.0, 2.0]]]]), meta={"filename_or_obj": "/d/brain7.nii.gz"})
    transform = brats.BratsLabelsd("label", mode="plain", class_names=["background", "gm", "wm"])
    assert torch.equal(transform({"label": label})["label"], label)
    narrow = brats.BratsLabelsd("label", mode="plain", class_names=["background", "gm"])
    with pytest.raises(ValueError, match=r"brain7\.nii\.gz: label values \[2\.0\] are not class indices 0\.\.1"):
        narrow({"label": label})
    with pytest.raises(ValueError, match="needs class_names"):
        brats.BratsLabelsd("label", mode="plain")


@pytest.mark.slow
def test_plain_label_map_end_to_end(tmp_path, seg_data):
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("models", "outputs"))
    datalist = _own_dataset(tmp_path / "data", seg_data)
    common = {"dataset_dir": str(datalist.parent), **TINY}

    with pytest.raises(Exception) as refused:  # the reported mistake is refused at start-up
        _run(bundle, ["train.json"], class_names=["background", "gm", "wm"], epochs=1, **common)
    assert "set label_mode 'plain'" in str(refused.value.__cause__)  # MONAI wraps the config's error
    assert not (bundle / "models" / "model.pt").exists()

    # csf is named but no label holds it: trained as a 4th output, flagged and left out of the means at evaluation
    classes = {"label_mode": "plain", "class_names": ["background", "gm", "wm", "csf"]}
    _run(bundle, ["train.json"], epochs=1, batch_size=1, slices_per_volume=2, val_interval=1, **classes, **common)
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert state["segmentation_head.0.weight"].shape[0] == 4
    _run(bundle, ["train.json", "evaluate.json"], **classes, **common)
    summary = json.loads((bundle / "outputs" / "eval" / "summary.json").read_text())
    assert summary["absent_classes"] == ["csf"]
    metrics = summary["metrics"]
    assert {"iou_gm", "iou_wm", "iou_csf", "iou_mean"} <= set(metrics)
    expected_mean = (metrics["iou_gm"]["mean"] + metrics["iou_wm"]["mean"]) / 2  # one test case: csf left out
    assert metrics["iou_mean"]["mean"] == pytest.approx(expected_mean)
    (prediction,) = (bundle / "outputs" / "eval" / "predictions").glob("*.nii.gz")
    assert set(np.unique(np.asarray(nib.load(str(prediction)).dataobj)).tolist()) <= {0, 1, 2, 3}


@pytest.mark.slow
def test_heart_bundle_flags_the_mm_whs_classes_a_plain_label_map_lacks(tmp_path, seg_data):
    """finetune_heart with its default 8 MM-WHS class names on a 0/1/2 label map: classes 3..7 are in no label, so
    they are flagged and left out of the means instead of scoring five free 1s per case."""
    bundle = tmp_path / "heart"
    shutil.copytree(BUNDLE.parent / "finetune_heart", bundle, ignore=shutil.ignore_patterns("models", "outputs"))
    datalist = _own_dataset(tmp_path / "data", seg_data)
    common = {"dataset_dir": str(datalist.parent), **TINY}
    _run(bundle, ["train.json"], epochs=1, batch_size=1, slices_per_volume=2, val_interval=1, **common)
    _run(bundle, ["train.json", "evaluate.json"], **common)
    summary = json.loads((bundle / "outputs" / "eval" / "summary.json").read_text())
    names = json.loads((bundle / "configs" / "train.json").read_text())["class_names"]
    assert summary["absent_classes"] == names[3:]
    metrics = summary["metrics"]
    assert metrics["iou_mean"]["mean"] == pytest.approx(
        (metrics[f"iou_{names[1]}"]["mean"] + metrics[f"iou_{names[2]}"]["mean"]) / 2
    )
