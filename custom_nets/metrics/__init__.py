"""Evaluation metrics of the downstream tasks of arXiv 2212.01893 (thin wrappers where MONAI already has one) and the
RankMe effective rank of embeddings."""

from custom_nets.metrics.embedding import effective_rank
from custom_nets.metrics.segmentation import (
    HD95Metric,
    VolumeDiceMetric,
    VolumeIoUMetric,
    mean_std,
    summarise,
    volume_iou,
    voxel_spacing,
)

__all__ = [
    "HD95Metric",
    "VolumeDiceMetric",
    "VolumeIoUMetric",
    "effective_rank",
    "mean_std",
    "summarise",
    "volume_iou",
    "voxel_spacing",
]
