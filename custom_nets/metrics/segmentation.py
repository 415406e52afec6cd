"""Volume-level segmentation metrics used by the downstream protocol of arXiv 2212.01893 (section 4 of METHOD.md).

The paper scores 3D segmentation (BraTS, MMWHS) by the **3D IoU per volume**: the slice-wise predictions of one case are
stacked back into a volume and the intersection over union is computed over all voxels of that volume, then averaged
over volumes (and over trials). Dice and the 95th-percentile Hausdorff distance are reported next to it.

Empty structures are handled explicitly, because small structures and tumour sub-regions are often absent:

* IoU and Dice of a class that is absent from **both** the label and the prediction are 1 (perfect agreement);
  a class absent from one side only scores 0. This is MONAI's ``ignore_empty=False`` behaviour.
* HD95 is undefined when either side is empty: it is NaN and summaries skip NaNs (and report how many were skipped).
* A class absent from the label of **every** case of an evaluation has no ground truth at all: its empty-vs-empty 1
  would inflate the mean (a never-labelled class scores a perfect 1 whatever the network does) and a stray prediction
  would deflate it on no evidence. :class:`VolumeIoUMetric` and :class:`VolumeDiceMetric` leave such a class out of
  ``aggregate()`` (the mean over the classes that some label holds) and name it in :meth:`absent_classes`; the per-case
  values in ``get_buffer()`` keep it. A class absent from some cases only keeps the per-case rule above.

Everything here wraps MONAI's metric functions; nothing recomputes an overlap by hand.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.metrics import Cumulative, DiceMetric, HausdorffDistanceMetric, MeanIoU, compute_iou
from monai.metrics.utils import do_metric_reduction

__all__ = [
    "AbsentClassesExcluded",
    "HD95Metric",
    "VolumeDiceMetric",
    "VolumeIoUMetric",
    "volume_iou",
    "voxel_spacing",
    "mean_std",
    "summarise",
]

logger = logging.getLogger(__name__)


class AbsentClassesExcluded:
    """Mixin for a MONAI cumulative metric of ``(B, C)`` per-case, per-class values computed from one-hot
    ``(B, C, ...)`` labels: records which scored classes the labels hold, and leaves a class that no label of the
    evaluation holds out of ``aggregate()`` (logged with a warning). ``get_buffer()`` is unchanged.

    Needs the host metric's ``include_background`` and ``reduction`` attributes.
    """

    include_background: bool
    reduction: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.label_presence = Cumulative()  # (N, C') booleans as floats: class c has a labelled voxel in case n
        super().__init__(*args, **kwargs)

    def reset(self) -> None:
        super().reset()  # type: ignore[misc]
        self.label_presence.reset()

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        scored = y if self.include_background else y[:, 1:]
        self.label_presence.extend(scored.reshape(*scored.shape[:2], -1).bool().any(dim=-1).float())
        return super()._compute_tensor(y_pred, y, **kwargs)  # type: ignore[misc]

    def absent_classes(self) -> list[int]:
        """Indices (among the scored channels) of the classes that no label of the evaluation holds."""
        presence = self.label_presence.get_buffer()
        if presence is None:
            return []
        return torch.nonzero(presence.sum(dim=0) == 0).flatten().tolist()

    def aggregate(self, reduction: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        data = self.get_buffer()  # type: ignore[attr-defined]
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"{type(self).__name__} has no values to aggregate; call it on a batch first.")
        absent = self.absent_classes()
        if absent:
            logger.warning(
                "%s: scored class(es) %s have no labelled voxel in any of the %d cases; left out of the mean",
                type(self).__name__,
                absent,
                data.shape[0],
            )
            data[:, absent] = float("nan")
        value, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (value, not_nans) if getattr(self, "get_not_nans", False) else value


class VolumeIoUMetric(AbsentClassesExcluded, MeanIoU):
    """The paper's 3D IoU: per-volume, per-class IoU over every voxel of the volume, empty-vs-empty scored as 1.

    A specialisation of :class:`monai.metrics.MeanIoU` that fixes ``ignore_empty=False`` so that a class absent
    from both label and prediction of a case counts as perfect agreement instead of being dropped, excludes the
    background channel by default, and leaves a class that no label of the evaluation holds out of the mean
    (:class:`AbsentClassesExcluded`).

    Inputs are one-hot (or multi-label) binarised volumes ``(B, C, H, W, D)``; ``get_buffer()`` holds ``(N, C')`` per
    case and class values, ``aggregate()`` their mean (``reduction="mean"``): the mean over volumes of each volume's
    mean over the classes that some label holds.

    Args:
        include_background: whether the first channel is scored (False for softmax outputs with a background
            channel, True for multi-label region outputs such as BraTS WT/TC/ET).
        reduction: MONAI reduction applied by ``aggregate``.
        get_not_nans: whether ``aggregate`` also returns the count of non-NaN values.
    """

    def __init__(self, include_background: bool = False, reduction: str = "mean", get_not_nans: bool = False) -> None:
        super().__init__(
            include_background=include_background, reduction=reduction, get_not_nans=get_not_nans, ignore_empty=False
        )


class VolumeDiceMetric(AbsentClassesExcluded, DiceMetric):
    """Per-volume Dice (MONAI :class:`~monai.metrics.DiceMetric`, ``ignore_empty=False``: empty in label and
    prediction = 1) whose ``aggregate()`` leaves out a class that no label of the evaluation holds, as
    :class:`VolumeIoUMetric` does. Inputs binarised one-hot ``(B, C, H, W, D)``; ``get_buffer()`` holds ``(N, C')``."""

    def __init__(self, include_background: bool = False, reduction: str = "mean", get_not_nans: bool = False) -> None:
        super().__init__(
            include_background=include_background, reduction=reduction, get_not_nans=get_not_nans, ignore_empty=False
        )


def voxel_spacing(affine: torch.Tensor, spatial_dims: int = 3) -> list[float]:
    """Voxel sizes (mm) from a ``(spatial_dims + 1)``-square affine: the norms of its first ``spatial_dims`` columns."""
    matrix = torch.as_tensor(affine, dtype=torch.float64)[:spatial_dims, :spatial_dims]
    return torch.linalg.vector_norm(matrix, dim=0).tolist()


class HD95Metric(HausdorffDistanceMetric):
    """95th-percentile symmetric Hausdorff distance in millimetres.

    MONAI's :class:`~monai.metrics.HausdorffDistanceMetric` with ``percentile=95`` whose voxel spacing is read from the
    label's affine (a MetaTensor, as produced by MONAI's loaders), so that ignite metric handlers, which pass no
    ``spacing``, still report millimetres; plain tensors are measured in voxels. The value is NaN when the label or
    the prediction of a class is empty (undefined distance).

    Inputs: binarised one-hot ``(B, C, H, W, D)``; ``get_buffer()`` holds ``(N, C')`` values.
    """

    def __init__(self, include_background: bool = False, reduction: str = "mean", get_not_nans: bool = False) -> None:
        super().__init__(
            include_background=include_background, percentile=95, reduction=reduction, get_not_nans=get_not_nans
        )

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: object) -> torch.Tensor:
        if "spacing" not in kwargs and isinstance(y, MetaTensor) and y.affine.ndim == 2:
            kwargs["spacing"] = voxel_spacing(y.affine, y.ndim - 2)
        return super()._compute_tensor(y_pred, y, **kwargs)


def volume_iou(y_pred: torch.Tensor, y: torch.Tensor, include_background: bool = False) -> torch.Tensor:
    """Per-volume 3D IoU, averaged over the scored classes.

    Args:
        y_pred: binarised one-hot prediction ``(B, C, H, W, D)``.
        y: binarised one-hot label of the same shape.
        include_background: whether channel 0 is scored.

    Returns:
        ``(B,)`` tensor: for each volume the mean over classes of ``|P & G| / |P | G|``, with a class empty in both
        scored 1 and a class empty in exactly one scored 0.
    """
    per_class = compute_iou(y_pred=y_pred, y=y, include_background=include_background, ignore_empty=False)
    return per_class.mean(dim=1)


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value) of the finite values.

    Returns:
        ``(mean, std, count)`` where ``count`` is the number of finite values used; ``(nan, nan, 0)`` when none.
    """
    finite = [float(v) for v in values if math.isfinite(float(v))]
    if not finite:
        return float("nan"), float("nan"), 0
    mean = sum(finite) / len(finite)
    if len(finite) == 1:
        return mean, 0.0, 1
    var = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)
    return mean, math.sqrt(var), len(finite)


def summarise(values: Sequence[float]) -> dict[str, float | int]:
    """Summary of one metric column: mean, std, the number of finite values and of skipped (NaN/inf) values."""
    mean, std, count = mean_std(values)
    return {"mean": mean, "std": std, "count": count, "skipped": len(values) - count}
