"""Write a detector's boxes as JSON in the original pixel coordinates of each input radiograph."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.apps.detection.transforms.box_ops import zoom_boxes

from custom_nets.atomic_files import atomic_write_json
from custom_nets.metrics.detection_report import image_name

__all__ = ["DetectionWriter", "boxes_to_original"]


def boxes_to_original(
    prediction: dict, meta: dict, class_names: Sequence[str], box_key: str, label_key: str, score_key: str
) -> list[dict]:
    """Detections of one image as ``[{"class_id", "class_name", "score", "x_min", "y_min", "x_max", "y_max"}]`` in the
    pixels of the file read (``meta["original_size"]``), from the network's input size (``meta["spatial_shape"]``)."""
    boxes = prediction[box_key].detach().cpu().numpy().reshape(-1, 4).astype(np.float64)
    zoom = [float(o) / float(s) for o, s in zip(meta["original_size"], meta["spatial_shape"], strict=True)]
    boxes = zoom_boxes(boxes, zoom)
    labels = prediction[label_key].detach().cpu().numpy().reshape(-1)
    scores = prediction[score_key].detach().cpu().float().numpy().reshape(-1)
    order = np.argsort(-scores, kind="stable")
    return [
        {
            "class_id": int(labels[i]),
            "class_name": class_names[int(labels[i])],
            "score": round(float(scores[i]), 5),
            **{k: round(float(v), 2) for k, v in zip(("x_min", "y_min", "x_max", "y_max"), boxes[i], strict=True)},
        }
        for i in order
    ]


class DetectionWriter:
    """Ignite handler: after each iteration, write ``<output_dir>/<image name>.json`` for every image of the batch.

    The file holds ``image`` (datalist ``image_id`` or the input file's stem), ``original_size`` ``[width, height]``,
    ``box_mode`` ``"xyxy"`` (x = column, y = row, pixels of the input file) and ``boxes`` sorted by score. Files are
    written to a temporary name and renamed.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str],
        box_key: str = "box",
        label_key: str = "label",
        score_key: str = "label_scores",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.keys = (box_key, label_key, score_key)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for item, prediction in zip(engine.state.batch, engine.state.output["pred"], strict=True):
            image = item["image"]
            meta = image.meta if hasattr(image, "meta") else {}
            if "original_size" not in meta:
                meta = {"original_size": list(image.shape[1:]), "spatial_shape": list(image.shape[1:])}
            name = image_name(item)
            content = {
                "image": name,
                "original_size": [int(v) for v in torch.as_tensor(meta["original_size"]).tolist()],
                "box_mode": "xyxy",
                "boxes": boxes_to_original(prediction, meta, self.class_names, *self.keys),
            }
            atomic_write_json(self.output_dir / f"{name}.json", content)
