"""Detection scores of the chest X-ray bundle: mAP at IoU 0.5 per finding and their mean (the VinDr-CXR convention),
COCO mAP (IoU 0.50:0.95), and an image-level abnormality AUC.

Box matching and average precision are MONAI's (:func:`monai.apps.detection.metrics.matching.matching_batch`,
:class:`monai.apps.detection.metrics.coco.COCOMetric`: greedy matching by score, 101-point interpolated precision as in
pycocotools). MONAI's overall means count classes without ground truth as -1; here the means run over the classes that
have ground truth in the evaluated images, and a class without ground truth is reported as ``None``.

Image-level score: the highest box score of an image (0 without boxes); the image is abnormal when it has at least one
ground-truth box ("No finding" otherwise); AUC by scikit-learn (``None`` when only one kind of image is present).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from ignite.metrics import Metric
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou

__all__ = ["DetectionMAP", "detection_report", "image_abnormality_auc"]

MAP50 = "map50"


def _numpy(value: Any, shape: tuple[int, ...] | None = None, dtype=np.float32) -> np.ndarray:
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    array = array.astype(dtype)
    return array.reshape(shape) if shape is not None else array


def image_abnormality_auc(max_scores: Sequence[float], abnormal: Sequence[bool]) -> float | None:
    """ROC AUC of the image-level score against abnormal (True) / "No finding" (False); ``None`` if one kind only."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(abnormal, dtype=bool)
    if labels.all() or not labels.any():
        return None
    return float(roc_auc_score(labels, np.asarray(max_scores, dtype=np.float64)))


def detection_report(
    predictions: Sequence[dict[str, Any]],
    targets: Sequence[dict[str, Any]],
    class_names: Sequence[str],
    box_key: str = "box",
    label_key: str = "label",
    score_key: str = "label_scores",
    max_detections: int = 100,
) -> dict[str, Any]:
    """Scores of one evaluation set.

    Args:
        predictions: one dict per image with ``xyxy`` boxes ``(D, 4)``, labels ``(D,)`` and scores ``(D,)``.
        targets: one dict per image with ground-truth boxes ``(G, 4)`` and labels ``(G,)`` (G = 0: "No finding").
        class_names: the detection classes, index = label.

    Returns:
        ``map50`` (mean AP at IoU 0.5 over classes with ground truth), ``coco_map`` (mean over the same classes of AP
        averaged over IoU 0.50:0.05:0.95), ``ap50_per_class`` and ``coco_ap_per_class`` (``None`` without ground
        truth), ``image_auc``, ``num_images``, ``num_gt_boxes`` per class.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets.")
    metric = COCOMetric(
        classes=list(class_names),
        iou_list=(0.5,),
        iou_range=(0.5, 0.95, 0.05),
        max_detection=(max_detections,),
        per_class=True,
        verbose=False,
    )
    pred_boxes = [_numpy(p[box_key], (-1, 4)) for p in predictions]
    pred_labels = [_numpy(p[label_key], (-1,), np.int64) for p in predictions]
    pred_scores = [_numpy(p[score_key], (-1,)) for p in predictions]
    gt_boxes = [_numpy(t[box_key], (-1, 4)) for t in targets]
    gt_labels = [_numpy(t[label_key], (-1,), np.int64) for t in targets]
    matches = matching_batch(
        iou_fn=box_iou,
        iou_thresholds=metric.iou_thresholds,
        pred_boxes=pred_boxes,
        pred_classes=pred_labels,
        pred_scores=pred_scores,
        gt_boxes=gt_boxes,
        gt_classes=gt_labels,
        max_detections=max_detections,
    )
    values = metric(matches)[0]
    suffix = f"MaxDet_{max_detections}"
    gt_counts = {name: int(sum((g == i).sum() for g in gt_labels)) for i, name in enumerate(class_names)}
    ap50, coco_ap = {}, {}
    for name in class_names:
        present = gt_counts[name] > 0
        ap50[name] = values[f"{name}_AP_IoU_0.50_{suffix}"] if present else None
        coco_ap[name] = values[f"{name}_mAP_IoU_0.50_0.95_0.05_{suffix}"] if present else None
    scored = [v for v in ap50.values() if v is not None]
    max_scores = [float(s.max()) if len(s) else 0.0 for s in pred_scores]
    return {
        MAP50: float(np.mean(scored)) if scored else None,
        "coco_map": float(np.mean([v for v in coco_ap.values() if v is not None])) if scored else None,
        "ap50_per_class": ap50,
        "coco_ap_per_class": coco_ap,
        "image_auc": image_abnormality_auc(max_scores, [len(g) > 0 for g in gt_labels]),
        "num_images": len(targets),
        "num_gt_boxes": gt_counts,
    }


class DetectionMAP(Metric):
    """Ignite metric: mean AP at IoU 0.5 over the classes with ground truth (:func:`detection_report`'s ``map50``,
    0.0 when no class has ground truth) of the predictions and targets gathered over an epoch.

    ``output_transform`` must give ``(predictions, targets)``: lists with one dict per image, as produced by
    ``RetinaNetDetector`` in eval mode and :func:`custom_nets.engines.detection.detection_prepare_batch`. Under
    ``torch.distributed`` the images of all processes are gathered before scoring.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        output_transform: Callable = lambda x: x,
        box_key: str = "box",
        label_key: str = "label",
        score_key: str = "label_scores",
    ) -> None:
        self.class_names = list(class_names)
        self.keys = {"box_key": box_key, "label_key": label_key, "score_key": score_key}
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._predictions: list[dict] = []
        self._targets: list[dict] = []

    def update(self, output: tuple[Sequence[dict], Sequence[dict]]) -> None:
        predictions, targets = output
        self._predictions.extend({k: _numpy(v) for k, v in p.items()} for p in predictions)
        self._targets.extend({k: _numpy(v) for k, v in t.items()} for t in targets)

    def compute(self) -> float:
        predictions, targets = self._predictions, self._targets
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (predictions, targets))  # each rank saw its shard
            predictions = [p for shard, _ in gathered for p in shard]
            targets = [t for _, shard in gathered for t in shard]
        report = detection_report(predictions, targets, self.class_names, **self.keys)
        return report[MAP50] if report[MAP50] is not None else 0.0
