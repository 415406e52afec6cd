"""3D IoU / Dice / HD95 against hand-computed values, empty-structure policy, and the evaluation report handler."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import DiceMetric

from custom_nets.metrics import (
    HD95Metric,
    VolumeDiceMetric,
    VolumeIoUMetric,
    mean_std,
    summarise,
    volume_iou,
    voxel_spacing,
)
from custom_nets.metrics.segmentation_report import SegmentationReport, case_name


def _one_hot_case() -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 4, 4, 4, 2) one-hot: class 1 pred 4 voxels / label 6 voxels / overlap 3; class 2 empty in both;
    class 3 empty in the label, 2 predicted voxels."""
    pred = torch.zeros(1, 4, 4, 4, 2)
    label = torch.zeros(1, 4, 4, 4, 2)
    pred[0, 1, 0, 0:4, 0] = 1  # 4 voxels
    label[0, 1, 0, 1:4, 0] = 1  # 3 voxels, all inside the prediction
    label[0, 1, 1, 0:3, 0] = 1  # 3 more voxels outside it
    pred[0, 3, 3, 0:2, 1] = 1
    pred[0, 0] = 1 - pred[0, 1:].amax(dim=0)
    label[0, 0] = 1 - label[0, 1:].amax(dim=0)
    return pred, label


def test_volume_iou_hand_computed_with_empty_policy():
    pred, label = _one_hot_case()
    metric = VolumeIoUMetric(include_background=False, reduction="none")
    metric(pred, label)
    per_class = metric.get_buffer()
    assert per_class.shape == (1, 3)
    expected = torch.tensor([[3 / 7, 1.0, 0.0]])  # overlap 3, union 4 + 6 - 3; empty-vs-empty = 1; FP only = 0
    assert torch.allclose(per_class, expected)
    assert torch.allclose(volume_iou(pred, label), expected.mean(dim=1))
    assert torch.allclose(
        volume_iou(pred, label, include_background=True)[0] * 4, expected.sum() + _bg_iou(pred, label)
    )


def test_class_absent_from_every_label_is_left_out_of_the_mean():
    """Classes 2 and 3 (scored channels 1, 2) are in no label: the mean is class 1's alone, in IoU and Dice."""
    pred, label = _one_hot_case()
    iou = VolumeIoUMetric()
    iou(pred, label)
    assert iou.absent_classes() == [1, 2]
    assert iou.aggregate().item() == pytest.approx(3 / 7)
    per_class = VolumeIoUMetric(reduction="none")
    per_class(pred, label)
    assert torch.allclose(per_class.aggregate(), torch.tensor([[3 / 7, math.nan, math.nan]]), equal_nan=True)
    dice = VolumeDiceMetric()
    second_label = pred.clone()  # a second case whose label holds class 3: only class 2 stays absent
    dice(torch.cat([pred, pred]), torch.cat([label, second_label]))
    assert dice.absent_classes() == [1]
    assert dice.aggregate().item() == pytest.approx(((2 * 3 / 10 + 0) / 2 + 1) / 2)
    dice.reset()
    assert dice.absent_classes() == []


def _bg_iou(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    inter = (pred[0, 0] * label[0, 0]).sum()
    return inter / (pred[0, 0].sum() + label[0, 0].sum() - inter)


def test_dice_matches_hand_value_and_same_empty_policy():
    pred, label = _one_hot_case()
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(pred, label)
    assert torch.allclose(dice, torch.tensor([[2 * 3 / (4 + 6), 1.0, 0.0]]))


def test_hd95_in_millimetres_from_affine_and_nan_when_empty():
    pred = torch.zeros(1, 2, 8, 3, 3)
    label = torch.zeros(1, 2, 8, 3, 3)
    pred[0, 1, 1, 1, 1] = 1
    label[0, 1, 4, 1, 1] = 1  # 3 voxels apart along the first axis
    pred[0, 0], label[0, 0] = 1 - pred[0, 1], 1 - label[0, 1]
    affine = torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0]))
    in_voxels = HD95Metric(reduction="none")(pred, label)
    assert in_voxels.item() == pytest.approx(3.0)
    metric = HD95Metric(reduction="none")
    metric([MetaTensor(pred[0], affine=affine)], [MetaTensor(label[0], affine=affine)])
    assert metric.aggregate().item() == pytest.approx(6.0)
    empty_pred = pred.clone()
    empty_pred[0, 1] = 0
    assert math.isnan(HD95Metric(reduction="none")(empty_pred, label).item())


def test_voxel_spacing_of_rotated_affine():
    rotation = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    affine = torch.eye(4)
    affine[:3, :3] = rotation @ torch.diag(torch.tensor([0.5, 0.7, 3.0]))
    assert voxel_spacing(affine) == pytest.approx([0.5, 0.7, 3.0])


def test_mean_std_and_summary_skip_non_finite():
    mean, std, count = mean_std([1.0, 2.0, 3.0, 4.0])
    assert (mean, count) == (2.5, 4)
    assert std == pytest.approx(math.sqrt(5 / 3))  # sample std, ddof = 1
    assert mean_std([7.0]) == (7.0, 0.0, 1)
    summary = summarise([1.0, float("nan"), 3.0, float("inf")])
    assert summary == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "count": 2, "skipped": 2}
    assert math.isnan(mean_std([float("nan")])[0])


def test_case_name_strips_image_suffixes():
    assert case_name("/x/ct_train_1001_label.nii.gz") == "ct_train_1001_label"
    assert case_name(["/x/a_flair.nii", "/x/a_t1.nii"]) == "a_flair"
    assert case_name("b.mha") == "b"


def test_segmentation_report_writes_case_rows_summary_and_overlays(tmp_path):
    pred, label = _one_hot_case()
    items = []
    for index in range(2):
        meta = {"filename_or_obj": f"/data/case{index}_label.nii.gz"}
        items.append(
            {
                "pred": MetaTensor(pred[0], meta=dict(meta)),
                "label": MetaTensor(label[0] if index == 0 else pred[0], meta=dict(meta)),
                "image": MetaTensor(torch.rand(1, 4, 4, 2)),
            }
        )
    engine = Engine(lambda e, batch: [batch])
    iou = IgniteMetricHandler(
        metric_fn=VolumeIoUMetric(include_background=False), output_transform=from_engine(["pred", "label"])
    )
    iou.attach(engine, "val_iou")
    report = SegmentationReport(tmp_path, metric_names={"iou": "val_iou"}, class_names=["a", "b", "c"], num_overlays=1)
    report.attach(engine)
    engine.run(items, max_epochs=1)

    with open(tmp_path / "cases.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["case0_label", "case1_label"]
    assert float(rows[0]["iou_a"]) == pytest.approx(3 / 7)
    # class b is in no label (case 1's label is case 0's prediction): flagged, its column kept, out of the means
    assert float(rows[0]["iou_b"]) == 1.0
    assert float(rows[0]["iou_mean"]) == pytest.approx((3 / 7 + 0) / 2)
    assert float(rows[1]["iou_mean"]) == pytest.approx(1.0)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_cases"] == 2 and summary["absent_classes"] == ["b"]
    assert "left out of every <metric>_mean" in summary["absent_class_rule"]
    assert summary["metrics"]["iou_mean"]["mean"] == pytest.approx((3 / 7 / 2 + 1) / 2)
    assert engine.state.metrics["val_iou"] == pytest.approx((3 / 7 / 2 + 1) / 2)
    overlays = sorted(p.name for p in (tmp_path / "overlays").iterdir())
    assert overlays == ["case0_label.png"]
    assert (tmp_path / "overlays" / "case0_label.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_segmentation_report_rejects_missing_details(tmp_path):
    engine = Engine(lambda e, batch: [batch])
    SegmentationReport(tmp_path, metric_names={"iou": "absent"}, class_names=["a"], num_overlays=0).attach(engine)
    item = {"pred": MetaTensor(torch.zeros(2, 2, 2, 2)), "label": MetaTensor(torch.zeros(2, 2, 2, 2))}
    with pytest.raises(KeyError, match="save_details"):
        engine.run([item], max_epochs=1)
