"""Volume-level segmentation metrics used by the downstream protocol of arXiv 2212.01893 (section 4 of METHOD.md).

The paper scores 3D segmentation (BraTS, MMWHS) by the **3D IoU per volume**: the slice-wise predictions of one case are
stacked back into a volume and the intersection over union is computed over all voxels of that volume, then averaged
over volumes (and over trials). Dice and the 95th-percentile Hausdorff distance are reported next to it.

Empty structures are handled explicitly, because small structures and tumour sub-regions are often absent:

* IoU and Dice of a class that is absent from **both** the label and the prediction are 1 (perfect agreement);
  a class absent from one side only scores 0. This is MONAI's ``ignore_empty=False`` behaviour.
* HD95 is undefined when either side is empty: it is NaN and summaries skip NaNs (and report how many were skipped).

Everything here wraps MONAI's metric functions; nothing recomputes an overlap by hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.data import MetaTensor
from monai.metrics import HausdorffDistanceMetric, MeanIoU, compute_iou

__all__ = ["HD95Metric", "VolumeIoUMetric", "volume_iou", "voxel_spacing", "mean_std", "summarise"]


class VolumeIoUMetric(MeanIoU):
    """The paper's 3D IoU: per-volume, per-class IoU over every voxel of the volume, empty-vs-empty scored as 1.

    A thin specialisation of :class:`monai.metrics.MeanIoU` that fixes ``ignore_empty=False`` so that a class absent
    from both label and prediction counts as perfect agreement instead of being dropped, and excludes the background
    channel by default.

    Inputs are one-hot (or multi-label) binarised volumes ``(B, C, H, W, D)``; ``get_buffer()`` holds ``(N, C')`` per
    case and class values, ``aggregate()`` their mean (``reduction="mean"``): the mean over volumes of each volume's
    mean over classes.

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
