"""Evaluation report of the chest X-ray detector: metrics JSON and PNGs of predicted against true boxes.

:class:`DetectionReport` is an ignite handler for a MONAI ``SupervisedEvaluator`` driving a ``RetinaNetDetector``
(:mod:`custom_nets.engines.detection`). When the evaluation completes it writes

* ``metrics.json``: :func:`custom_nets.metrics.detection.detection_report` (mAP@0.5 per finding and mean, COCO mAP,
  image-level AUC) plus the highest box score and the number of true boxes of every image;
* ``figures/<image_id>.png``: for the first ``num_figures`` images, the radiograph with true boxes (green) and
  predicted boxes scoring at least ``figure_score_threshold`` (red, class and score).

Images are named by their datalist ``image_id`` (or the file's stem), never by anything read from a DICOM header.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

from custom_nets.atomic_files import atomic_write_json
from custom_nets.metrics.detection import MAP50, detection_report
from custom_nets.metrics.figures import pyplot, save_figure

__all__ = ["DetectionReport", "image_name", "save_box_figure"]

logger = logging.getLogger(__name__)


def image_name(item: dict) -> str:
    """An item's ``image_id``, else the stem of its image file."""
    if "image_id" in item:
        return str(item["image_id"])
    filename = getattr(item["image"], "meta", {}).get("filename_or_obj", "image")
    return Path(str(filename)).name.split(".")[0]


def _array(value) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def save_box_figure(
    image: np.ndarray,
    true_boxes: np.ndarray,
    true_labels: np.ndarray,
    pred_boxes: np.ndarray,
    pred_labels: np.ndarray,
    pred_scores: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    score_threshold: float = 0.3,
) -> Path:
    """Draw an ``(W, H)`` radiograph (MONAI layout, x first) with true (green) and predicted (red) ``xyxy`` boxes."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5, 5))
    width, height = np.asarray(image).shape
    # extent: pixel (i, j) covers [i, i + 1) x [j, j + 1), the convention of the box coordinates
    axis.imshow(np.asarray(image).T, cmap="gray", vmin=0.0, vmax=1.0, extent=(0, width, height, 0))
    drawn = [(b, int(c), None, "lime") for b, c in zip(true_boxes.reshape(-1, 4), true_labels.reshape(-1), strict=True)]
    drawn += [
        (b, int(c), float(s), "red")
        for b, c, s in zip(pred_boxes.reshape(-1, 4), pred_labels.reshape(-1), pred_scores.reshape(-1), strict=True)
        if s >= score_threshold
    ]
    for box, label, score, colour in drawn:
        x_min, y_min, x_max, y_max = (float(v) for v in box)
        axis.add_patch(plt.Rectangle((x_min, y_min), x_max - x_min, y_max - y_min, fill=False, color=colour, lw=1.2))
        text = class_names[label] + ("" if score is None else f" {score:.2f}")
        axis.text(x_min, y_min, text, color=colour, fontsize=6, va="bottom")
    axis.set_title("true (green) / predicted (red)", fontsize=8)
    axis.axis("off")
    figure.tight_layout()
    return save_figure(figure, path)


class DetectionReport:
    """Collect an evaluator's detections and write ``metrics.json`` and box figures when it completes.

    Args:
        output_dir: folder for ``metrics.json`` and ``figures/``.
        class_names: detection classes, index = label.
        num_figures: images drawn (the first ones of the evaluation order).
        figure_score_threshold: lowest score of a drawn predicted box.
        box_key, label_key, score_key: keys of the targets and of the detector's outputs.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str],
        num_figures: int = 8,
        figure_score_threshold: float = 0.3,
        box_key: str = "box",
        label_key: str = "label",
        score_key: str = "label_scores",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.num_figures = num_figures
        self.figure_score_threshold = figure_score_threshold
        self.keys = {"box_key": box_key, "label_key": label_key, "score_key": score_key}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def reset(self, engine: Engine | None = None) -> None:
        self.names: list[str] = []
        self.predictions: list[dict[str, np.ndarray]] = []
        self.targets: list[dict[str, np.ndarray]] = []

    def collect(self, engine: Engine) -> None:
        output = engine.state.output
        box, label, score = self.keys["box_key"], self.keys["label_key"], self.keys["score_key"]
        for item, pred, target in zip(engine.state.batch, output["pred"], output["label"], strict=True):
            name = image_name(item)
            prediction = {k: _array(pred[k]) for k in (box, label, score)}
            truth = {k: _array(target[k]) for k in (box, label)}
            if len(self.names) < self.num_figures:
                save_box_figure(
                    _array(item["image"])[0],
                    truth[box],
                    truth[label],
                    prediction[box],
                    prediction[label],
                    prediction[score],
                    self.class_names,
                    self.output_dir / "figures" / f"{name}.png",
                    self.figure_score_threshold,
                )
            self.names.append(name)
            self.predictions.append(prediction)
            self.targets.append(truth)

    def write(self, engine: Engine) -> None:
        report = detection_report(self.predictions, self.targets, self.class_names, **self.keys)
        score_key, label_key = self.keys["score_key"], self.keys["label_key"]
        report["images"] = [
            {
                "image_id": name,
                "max_score": float(p[score_key].max()) if len(p[score_key]) else 0.0,
                "num_true_boxes": int(len(t[label_key])),
            }
            for name, p, t in zip(self.names, self.predictions, self.targets, strict=True)
        ]
        path = atomic_write_json(self.output_dir / "metrics.json", report)
        logger.info(
            "detection on %d images: mAP@0.5 %s, COCO mAP %s, image AUC %s -> %s",
            report["num_images"],
            report[MAP50],
            report["coco_map"],
            report["image_auc"],
            path,
        )
