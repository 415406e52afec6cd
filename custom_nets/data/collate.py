"""Collate mixed 2D/3D samples into the joint batch format of the project (COMMON.md "Batch format").

Joint pretraining (arXiv 2212.01893) feeds 2D images and volumes through one slice encoder in the same step; this
function groups the samples made by :class:`~custom_nets.data.views.ImageMultiCropd` and
:class:`~custom_nets.data.views.VolumeTwoViewsd` by kind and stacks their views.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.utils import convert_to_tensor

__all__ = ["joint_collate"]


def _stack_views(samples: Sequence[Mapping], key: str) -> list[torch.Tensor]:
    if not samples:
        return []
    counts = {len(s[key]) for s in samples}
    if len(counts) != 1:
        raise ValueError(f"samples hold different numbers of {key}: {sorted(counts)}")
    # plain tensors, sharing memory: a MONAI MetaTensor (what its readers and transforms return) would send every
    # operation of the training step through Python-level metadata handling (the demo-shape CPU step took 9-12 % longer,
    # benchmarks/pretrain_step.py --metatensor-views); the views' geometry travels in the batch as its own tensors
    return [
        torch.stack([convert_to_tensor(s[key][v], track_meta=False).float() for s in samples])
        for v in range(counts.pop())
    ]


def _long(samples: Sequence[Mapping], key: str, default: int | None = None) -> torch.Tensor:
    values = [int(s[key]) if key in s or default is None else default for s in samples]
    return torch.tensor(values, dtype=torch.long)


def joint_collate(samples: Sequence[Mapping]) -> dict[str, object]:
    """Stack a list of samples into one joint batch.

    Each sample is a dict with ``kind`` (``"image"`` or ``"volume"``), ``global_index`` and ``class_label`` (optional,
    -1 when absent); 2D samples hold ``image_views`` (list of (C, H_v, W_v)), 3D samples hold ``volume_views`` (list
    of 2 (C, N, H, W)), ``slice_valid`` (N,) and ``slice_position`` (N,); either may hold its views' ``(3, 3)``
    geometry (``image_view_geometry``, ``volume_view_geometry``, see :func:`~custom_nets.data.views.view_geometry`).

    Returns:
        dict with
        ``image_views``: list over views of (B2, C, H_v, W_v) float32, empty when B2 == 0 (plain tensors: a
        ``MetaTensor`` view loses its metadata);
        ``image_view_geometry``: list over views of (B2, 3, 3), when the samples hold it;
        ``image_index``: (B2,) long global datalist indices; ``image_class``: (B2,) long (-1 unknown);
        ``volume_views``: list of 2 tensors (B3, C, N, H, W) float32, empty when B3 == 0;
        ``volume_view_geometry``: list of 2 (B3, 3, 3), when the samples hold it;
        ``slice_valid``: (B3, N) bool; ``slice_position``: (B3, N) float32 mm;
        ``volume_index``: (B3,) long global datalist indices; ``volume_class``: (B3,) long (-1 unknown).
        Images come first in the order they appear in ``samples``, then volumes likewise.
    """
    kinds = {s["kind"] for s in samples}
    if not kinds <= {"image", "volume"}:
        raise ValueError(f"unknown sample kinds {sorted(kinds - {'image', 'volume'})}; expected 'image' or 'volume'")
    images = [s for s in samples if s["kind"] == "image"]
    volumes = [s for s in samples if s["kind"] == "volume"]
    num_slices = {int(torch.as_tensor(s["slice_valid"]).numel()) for s in volumes}
    if len(num_slices) > 1:
        raise ValueError(f"volumes with different slice counts {sorted(num_slices)} cannot share a batch")
    batch = {
        "image_views": _stack_views(images, "image_views"),
        "image_index": _long(images, "global_index"),
        "image_class": _long(images, "class_label", default=-1),
        "volume_views": _stack_views(volumes, "volume_views"),
        "slice_valid": torch.stack([torch.as_tensor(s["slice_valid"], dtype=torch.bool) for s in volumes])
        if volumes
        else torch.zeros(0, 0, dtype=torch.bool),
        "slice_position": torch.stack([torch.as_tensor(s["slice_position"], dtype=torch.float32) for s in volumes])
        if volumes
        else torch.zeros(0, 0, dtype=torch.float32),
        "volume_index": _long(volumes, "global_index"),
        "volume_class": _long(volumes, "class_label", default=-1),
    }
    for key, group in (("image_view_geometry", images), ("volume_view_geometry", volumes)):
        if group and all(key in s for s in group):
            batch[key] = _stack_views(group, key)
    return batch
