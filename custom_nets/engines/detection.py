"""Engine pieces that let MONAI's stock ``SupervisedTrainer`` / ``SupervisedEvaluator`` drive a ``RetinaNetDetector``.

The detector needs the targets in its forward pass during training and returns a dict of losses; in eval mode it
returns one dict of boxes per image. So: :func:`detection_prepare_batch` passes the targets as a keyword argument,
:class:`DetectorInferer` hands the engine's network to the detector and calls it, and :class:`DetectionLoss` adds the
detector's classification and box-regression losses. Batches are lists of dicts (``collate_fn=no_collation``),
because images carry different numbers of boxes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.inferers import Inferer
from torch import nn

__all__ = ["DetectionLoss", "DetectorInferer", "detection_prepare_batch"]


def detection_prepare_batch(
    batchdata: Sequence[Mapping[str, Any]],
    device: str | torch.device | None = None,
    non_blocking: bool = False,
    box_key: str = "box",
    label_key: str = "label",
    **kwargs: Any,
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]] | None, tuple, dict]:
    """A list of items ``{"image": (C, W, H), "box": (N, 4), "label": (N,)}`` -> images, targets, (), ``{"targets"}``.

    Targets are ``None`` when the items have no boxes (inference).
    """
    move = {"device": device, "non_blocking": non_blocking}
    images = [item["image"].to(**move, **kwargs) for item in batchdata]
    if box_key not in batchdata[0]:
        return images, None, (), {}
    targets = [
        {
            box_key: torch.as_tensor(item[box_key], dtype=torch.float32).reshape(-1, 4).to(**move),
            label_key: torch.as_tensor(item[label_key], dtype=torch.long).reshape(-1).to(**move),
        }
        for item in batchdata
    ]
    return images, targets, (), {"targets": targets}


class DetectorInferer(Inferer):
    """Run ``detector`` (a configured :class:`RetinaNetDetector`) with the engine's network.

    Training mode: ``(images, network, targets=...)`` -> dict of losses. Eval mode: ``(images, network)`` -> list of
    dicts of ``xyxy`` boxes, labels and ``<label>_scores`` per image, in the input image's coordinates.
    """

    def __init__(self, detector: RetinaNetDetector) -> None:
        super().__init__()
        self.detector = detector

    def __call__(self, inputs: Sequence[torch.Tensor] | torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any):
        self.detector.network = network
        self.detector.train(network.training)
        if network.training:
            return self.detector(inputs, kwargs.get("targets"))
        return self.detector(inputs)


class DetectionLoss(nn.Module):
    """Weighted sum of the detector's losses: ``cls_weight * classification + box_weight * box_regression``."""

    def __init__(
        self,
        cls_weight: float = 1.0,
        box_weight: float = 1.0,
        cls_key: str = "classification",
        box_key: str = "box_regression",
    ) -> None:
        super().__init__()
        self.weights = {cls_key: cls_weight, box_key: box_weight}

    def forward(self, losses: Mapping[str, torch.Tensor], targets: Any = None) -> torch.Tensor:
        return sum(weight * losses[key] for key, weight in self.weights.items())
