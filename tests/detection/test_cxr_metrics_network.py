"""Detection metrics against a hand-computed case; the RetinaNet on the slice encoder; boxes back to original pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.utils.anchor_utils import AnchorGenerator

from custom_nets.engines.detection import DetectionLoss, DetectorInferer, detection_prepare_batch
from custom_nets.engines.handlers.detection_writer import boxes_to_original
from custom_nets.metrics.detection import DetectionMAP, detection_report, image_abnormality_auc
from custom_nets.nets.detection import SliceEncoderRetinaNet
from custom_nets.nets.slice_encoder import SliceEncoder


def _hand_case():
    """Class "a": 2 true boxes in image 0; detections TP 0.9, FP 0.8, TP 0.7. Class "b": 1 true box in image 1, one
    detection with IoU 100/250 = 0.4 (< 0.5). Class "c": no true box anywhere. Image 2: "No finding", no detection."""
    predictions = [
        {
            "box": [[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]],
            "label": [0, 0, 0],
            "label_scores": [0.9, 0.8, 0.7],
        },
        {"box": [[0, 0, 10, 10]], "label": [1], "label_scores": [0.6]},
        {"box": np.zeros((0, 4)), "label": [], "label_scores": []},
    ]
    targets = [
        {"box": [[0, 0, 10, 10], [20, 20, 30, 30]], "label": [0, 0]},
        {"box": [[0, 0, 10, 25]], "label": [1]},
        {"box": np.zeros((0, 4)), "label": []},
    ]
    return predictions, targets


def test_map_against_hand_computed_case():
    report = detection_report(*_hand_case(), class_names=["a", "b", "c"])
    # class a: precision 1 up to recall 0.5, then 2/3 (after the FP) up to recall 1; COCO's 101 recall points
    # (0.00 ... 1.00) sample 51 points at precision 1 and 50 at 2/3
    ap_a = (51 * 1.0 + 50 * (2 / 3)) / 101
    assert report["ap50_per_class"]["a"] == pytest.approx(ap_a)
    assert report["ap50_per_class"]["b"] == 0.0  # IoU 0.4 misses at 0.5
    assert report["ap50_per_class"]["c"] is None  # no ground truth: not averaged
    assert report["map50"] == pytest.approx(ap_a / 2)
    # exact boxes match at every IoU 0.50 ... 0.95, so COCO AP of a equals its AP@0.5
    assert report["coco_ap_per_class"]["a"] == pytest.approx(ap_a)
    assert report["coco_map"] == pytest.approx(ap_a / 2)
    # image scores 0.9, 0.6, 0.0; abnormal, abnormal, normal -> every abnormal image ranks above the normal one
    assert report["image_auc"] == 1.0
    assert report["num_gt_boxes"] == {"a": 2, "b": 1, "c": 0}

    metric = DetectionMAP(["a", "b", "c"])
    metric.reset()
    metric.update(_hand_case())
    assert metric.compute() == pytest.approx(ap_a / 2)


def test_image_auc_hand_case():
    # scores of abnormal images 0.8, 0.4; normal 0.5, 0.1: pairs won 1 + 1 + 0 + 1 of 4
    assert image_abnormality_auc([0.8, 0.4, 0.5, 0.1], [True, True, False, False]) == pytest.approx(0.75)
    assert image_abnormality_auc([0.8, 0.4], [True, True]) is None


@pytest.mark.parametrize("freeze", [False, True])
def test_retinanet_on_pretrained_slice_encoder(freeze):
    encoder = SliceEncoder(depth=18, embed_dim=16)
    export = {f"slice_encoder.{k}": v for k, v in encoder.state_dict().items()}
    network = SliceEncoderRetinaNet(
        num_classes=3, num_anchors=3, depth=18, pretrained_ckpt=export, freeze_encoder=freeze, fpn_channels=16
    )
    assert not network.weight_report.missing and set(network.weight_report.unexpected) == {
        "embedding_proj.weight",
        "embedding_proj.bias",
    }
    assert torch.equal(network.encoder.conv1.weight, encoder.trunk.conv1.weight)
    assert all(p.requires_grad != freeze for p in network.encoder.parameters())
    outputs = network.eval()(torch.rand(2, 1, 64, 96))  # (B, C, W, H); stage 2-4 FPN + max-pooled level
    shapes = [tuple(m.shape) for m in outputs["classification"]]
    assert shapes == [(2, 9, 8, 12), (2, 9, 4, 6), (2, 9, 2, 3), (2, 9, 1, 2)]
    assert [m.shape[1] for m in outputs["box_regression"]] == [12] * 4

    detector = RetinaNetDetector(network, AnchorGenerator(((8,), (16,), (32,), (64,)), ((0.5, 1.0, 2.0),) * 4))
    detector.set_atss_matcher(num_candidates=4, center_in_gt=False)
    detector.set_hard_negative_sampler(batch_size_per_image=32, positive_fraction=0.3, pool_size=20, min_neg=8)
    detector.set_target_keys(box_key="box", label_key="label")
    batch = [
        {"image": torch.rand(1, 64, 64), "box": torch.tensor([[8.0, 10.0, 30.0, 40.0]]), "label": torch.tensor([1])},
        {"image": torch.rand(1, 64, 64), "box": torch.zeros(0, 4), "label": torch.zeros(0, dtype=torch.long)},
    ]
    images, targets, _, kwargs = detection_prepare_batch(batch, "cpu")
    network.train()
    if freeze:
        assert not network.encoder.training  # batch-norm statistics of pretraining are kept
    loss = DetectionLoss()(DetectorInferer(detector)(images, network, **kwargs), targets)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert (network.classification_head.cls_logits.weight.grad is not None) and (
        (network.encoder.conv1.weight.grad is None) == freeze
    )
    network.eval()
    with torch.no_grad():
        detections = DetectorInferer(detector)(images, network)
    assert len(detections) == 2 and set(detections[0]) == {"box", "label", "label_scores"}


def test_wrong_depth_checkpoint_is_an_error():
    export = {f"slice_encoder.{k}": v for k, v in SliceEncoder(depth=18, embed_dim=16).state_dict().items()}
    with pytest.raises(Exception, match="do not fit|did not load"):
        SliceEncoderRetinaNet(num_classes=2, num_anchors=1, depth=34, pretrained_ckpt=export)


def test_boxes_back_to_original_pixels():
    prediction = {
        "box": torch.tensor([[8.0, 16.0, 32.0, 64.0], [0.0, 0.0, 64.0, 64.0]]),
        "label": torch.tensor([3, 8]),
        "label_scores": torch.tensor([0.2, 0.7]),
    }
    meta = {"original_size": [96, 80], "spatial_shape": [64, 64]}
    boxes = boxes_to_original(prediction, meta, [str(i) for i in range(14)], "box", "label", "label_scores")
    assert [b["class_id"] for b in boxes] == [8, 3]  # by score
    assert [boxes[0][k] for k in ("x_min", "y_min", "x_max", "y_max")] == [0, 0, 96, 80]
    assert [boxes[1][k] for k in ("x_min", "y_min", "x_max", "y_max")] == [12, 20, 48, 80]
