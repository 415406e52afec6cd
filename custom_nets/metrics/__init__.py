"""Evaluation metrics of the downstream tasks of arXiv 2212.01893 (thin wrappers where MONAI already has one)."""

from custom_nets.metrics.segmentation import VolumeIoUMetric, mean_std, summarise, volume_iou

__all__ = ["VolumeIoUMetric", "mean_std", "summarise", "volume_iou"]
