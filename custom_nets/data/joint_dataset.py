"""Datasets and loaders that serve 2D images and 3D volumes together (arXiv 2212.01893, joint pretraining).

Training (:func:`build_joint_dataloader`): each datalist item is read with MONAI's readers, checked, normalised by
modality; volumes are reoriented (``Orientationd``), resampled to ``spacing`` (``Spacingd``) and centre-cropped or
padded in-plane to ``volume_size``; 2D images are resized so that their longest side is ``max(image_size)``. That
deterministic part can be cached (``CacheDataset`` in memory or ``PersistentDataset`` on disk). Then, per sample,
2D images get multi-crop views and volumes get a slice window of ``num_slices`` and two slice-aligned views
(:mod:`custom_nets.data.views`). A :class:`~custom_nets.data.sampler.JointBatchSampler` mixes the kinds in a fixed
ratio per batch and shards across DDP ranks; :func:`~custom_nets.data.collate.joint_collate` builds the batch dict.

Inference (:func:`build_inference_dataset`): the same reading and normalisation, no augmentation: one image ->
(C, H, W) resized/padded to ``image_size``, one volume -> (C, N, H, W) with its ``slice_valid`` and
``slice_position``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.transforms import (
    Compose,
    Orientationd,
    Resized,
    Spacingd,
    Transform,
    Transposed,
)
from monai.utils import ensure_tuple_rep

from custom_nets.data.collate import joint_collate
from custom_nets.data.datalist import load_datalist, prepare_items
from custom_nets.data.intensity import ModalityNormalized
from custom_nets.data.loading import CropOrPadToBackgroundd, EnsureKindShaped, LoadMedicalImaged
from custom_nets.data.sampler import JointBatchSampler
from custom_nets.data.views import ImageMultiCropd, ViewAugmentation, VolumeSliceSampled, VolumeTwoViewsd

__all__ = [
    "CACHE_MODES",
    "resolve_items",
    "image_base_transforms",
    "volume_base_transforms",
    "cache_folder",
    "build_dataset",
    "build_joint_dataset",
    "build_joint_dataloader",
    "KindDispatchd",
    "build_inference_dataset",
]

CACHE_MODES = ("none", "memory", "disk")
"""``none``: ``monai.data.Dataset``; ``memory``: ``CacheDataset``; ``disk``: ``PersistentDataset`` (needs a folder)."""


def resolve_items(
    datalist: str | os.PathLike | Sequence[Mapping | str], base_dir: str | os.PathLike | None, key: str
) -> list[dict]:
    """Datalist items ready for the transforms: from a JSON path (list ``key``) or from a list of entries.

    ``base_dir`` defaults to the datalist's folder (JSON) or the working directory (list). Every item gets
    ``global_index`` = its position in the list.
    """
    if isinstance(datalist, (str, os.PathLike)):
        return load_datalist(datalist, base_dir, key)
    return prepare_items(list(datalist), Path.cwd() if base_dir is None else base_dir, source="datalist")


def _intensity(key: str, intensity: Mapping | None) -> ModalityNormalized:
    return ModalityNormalized(key, **dict(intensity or {}))


def image_base_transforms(
    image_size: Sequence[int] | int, channels: int = 1, intensity: Mapping | None = None, key: str = "image"
) -> list[Transform]:
    """Deterministic part for 2D items: read, check, normalise, resize the longest side to ``max(image_size)``.

    Output ``data[key]``: (channels, X, Y) float32 with ``max(X, Y) == max(image_size)``.
    ``intensity``: keyword arguments of :class:`~custom_nets.data.intensity.ModalityNormalized`.
    """
    longest = max(ensure_tuple_rep(image_size, 2))
    return [
        LoadMedicalImaged(key),
        EnsureKindShaped(key, channels=channels),
        _intensity(key, intensity),
        Resized(key, spatial_size=longest, size_mode="longest", mode="bilinear", anti_aliasing=True),
    ]


def volume_base_transforms(
    volume_size: Sequence[int] | int,
    spacing: Sequence[float] | None = None,
    channels: int = 1,
    axcodes: str | None = "RAS",
    intensity: Mapping | None = None,
    key: str = "image",
) -> list[Transform]:
    """Deterministic part for 3D items: read, check, normalise, reorient, resample, crop/pad in-plane.

    Output ``data[key]``: MetaTensor (channels, H, W, Z) with (H, W) = ``volume_size`` and Z the resampled slice
    count; with ``axcodes="RAS"`` the slice axis is the axial (inferior-superior) one. ``spacing`` (mm, e.g.
    ``(1.0, 1.0, 2.5)``; a value <= 0 keeps that axis's spacing) resamples with ``Spacingd``; None keeps the native
    grid. In-plane padding uses the image's minimum (background), so padding is not mistaken for tissue.
    """
    size = ensure_tuple_rep(volume_size, 2)
    transforms: list[Transform] = [
        LoadMedicalImaged(key),
        EnsureKindShaped(key, channels=channels),
        _intensity(key, intensity),
    ]
    if axcodes:
        transforms.append(Orientationd(key, axcodes=axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if spacing is not None:
        transforms.append(Spacingd(key, pixdim=tuple(float(s) for s in spacing), mode="bilinear"))
    transforms.append(CropOrPadToBackgroundd(key, spatial_size=(*size, -1)))
    return transforms


def cache_folder(cache_dir: str | os.PathLike | None, name: str, settings: Mapping) -> Path | None:
    """``cache_dir/<name>-<hash of settings>``: a ``PersistentDataset`` folder per preprocessing setting.

    ``PersistentDataset`` keys its files by the data item only, so a changed spacing or size would otherwise reuse
    stale cached arrays.
    """
    if cache_dir is None:
        return None
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{name}-{digest}"


def build_dataset(
    items: Sequence[Mapping],
    transform: Compose,
    cache: str = "none",
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
) -> Dataset:
    """A MONAI ``Dataset`` / ``CacheDataset`` / ``PersistentDataset`` over ``items`` (see :data:`CACHE_MODES`).

    Caches hold the output of the transforms before the first random one.
    """
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    if cache == "memory":
        return CacheDataset(list(items), transform, num_workers=max(1, num_workers), progress=False)
    if cache == "disk":
        if cache_dir is None:
            raise ValueError("cache='disk' needs a cache_dir (a folder for PersistentDataset)")
        return PersistentDataset(list(items), transform, cache_dir=cache_dir)
    return Dataset(list(items), transform)


def build_joint_dataset(
    items: Sequence[Mapping],
    num_slices: int | None = 32,
    image_size: Sequence[int] | int = 64,
    volume_size: Sequence[int] | int = 64,
    small_crop_size: Sequence[int] | int | None = None,
    num_small_crops: int = 0,
    spacing: Sequence[float] | None = None,
    cache: str = "none",
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
    augmentation: ViewAugmentation | None = None,
    channels: int = 1,
    axcodes: str | None = "RAS",
    intensity: Mapping | None = None,
) -> tuple[torch.utils.data.ConcatDataset, int, int]:
    """Training dataset of views: 2D items first, then 3D items (each in datalist order).

    Returns ``(dataset, num_images, num_volumes)`` where ``dataset`` is a ``ConcatDataset`` whose positions
    ``[0, num_images)`` are 2D samples (``image_views``) and the rest 3D samples (``volume_views``, ``slice_valid``,
    ``slice_position``), all with ``kind``, ``global_index`` and ``class_label``. ``num_slices`` must be set: volumes
    of one batch share N.
    """
    if num_slices is None:
        raise ValueError("training needs a fixed num_slices so that volumes can share a batch")
    augmentation = augmentation or ViewAugmentation()
    images = [dict(item) for item in items if item["kind"] == "image"]
    volumes = [dict(item) for item in items if item["kind"] == "volume"]
    image_transform = Compose(
        image_base_transforms(image_size, channels, intensity)
        + [ImageMultiCropd("image", image_size, small_crop_size, num_small_crops, augmentation)]
    )
    volume_transform = Compose(
        volume_base_transforms(volume_size, spacing, channels, axcodes, intensity)
        + [
            VolumeSliceSampled("image", num_slices, random_window=True),
            VolumeTwoViewsd("image", volume_size, augmentation),
        ]
    )
    settings = {"image_size": image_size, "volume_size": volume_size, "spacing": spacing, "channels": channels}
    settings.update(axcodes=axcodes, intensity=dict(intensity or {}))
    parts = []
    for name, part, transform in (("images", images, image_transform), ("volumes", volumes, volume_transform)):
        if part:
            part_dir = cache_folder(cache_dir, f"train-{name}", settings)
            parts.append(build_dataset(part, transform, cache, part_dir, num_workers))
    return torch.utils.data.ConcatDataset(parts), len(images), len(volumes)


def build_joint_dataloader(
    datalist: str | os.PathLike | Sequence[Mapping | str],
    base_dir: str | os.PathLike | None = None,
    num_slices: int = 32,
    image_size: Sequence[int] | int = 64,
    volume_size: Sequence[int] | int = 64,
    small_crop_size: Sequence[int] | int | None = 32,
    num_small_crops: int = 0,
    images_per_batch: int = 8,
    volumes_per_batch: int = 2,
    num_workers: int = 0,
    cache: str = "none",
    spacing: Sequence[float] | None = None,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    key: str = "training",
    cache_dir: str | os.PathLike | None = None,
    augmentation: ViewAugmentation | None = None,
    channels: int = 1,
    axcodes: str | None = "RAS",
    intensity: Mapping | None = None,
    shuffle: bool = True,
    pin_memory: bool = False,
    persistent_workers: bool = True,
) -> DataLoader:
    """The joint pretraining loader: batches in the batch format of COMMON.md.

    Each batch is the dict of :func:`~custom_nets.data.collate.joint_collate`: ``image_views`` (2 global views of
    ``image_size`` + ``num_small_crops`` views of ``small_crop_size``, each (B2, C, H_v, W_v)), ``image_index``,
    ``image_class``, ``volume_views`` (2 x (B3, C, num_slices, *volume_size)), ``slice_valid``, ``slice_position``
    (mm), ``volume_index``, ``volume_class``; B2 = ``images_per_batch``, B3 = ``volumes_per_batch`` (0 for a kind
    without items). Indices are positions in the datalist list ``key``.

    Args:
        datalist: datalist JSON path, or a list of items (dicts with ``image`` etc., see :mod:`.datalist`).
        base_dir: folder of the relative image paths (default: the datalist's folder).
        num_slices: slices per volume (random window, zero-padded with ``slice_valid`` False).
        image_size: size of the global 2D crops (int or (H, W)).
        volume_size: in-plane size of the volume views.
        small_crop_size: size of the small 2D crops.
        num_small_crops: number of small 2D crops per image.
        images_per_batch: 2D items per batch (per rank).
        volumes_per_batch: volumes per batch (per rank).
        num_workers: DataLoader worker processes.
        cache: ``"none"``, ``"memory"`` (CacheDataset) or ``"disk"`` (PersistentDataset under ``cache_dir``, one
            sub-folder per preprocessing setting, see :func:`cache_folder`).
        spacing: target voxel spacing in mm for volumes (``Spacingd``), None keeps the native grid.
        seed: seed of the batch order (same on all ranks) and of the augmentations (offset by rank).
        rank, world_size: DDP sharding; default from ``torch.distributed`` when initialised.
        key: datalist list to read.
        cache_dir: folder for ``cache="disk"``.
        augmentation: view augmentation parameters (default :class:`~custom_nets.data.views.ViewAugmentation`).
        channels: input channels of the network (1 for pretraining).
        axcodes: orientation of volumes before slicing (slices along the last code's axis).
        intensity: keyword arguments of :class:`~custom_nets.data.intensity.ModalityNormalized` (e.g. ``ct_window``).
        shuffle: shuffle items each epoch.
        pin_memory: collate batches into page-locked memory (a loader thread), so that host-to-GPU copies can run
            asynchronously (``non_blocking``); only useful with a GPU.
        persistent_workers: keep the worker processes (and their caches and random streams) alive between epochs
            instead of starting them again each epoch; ignored when ``num_workers`` is 0.

    The loader's ``batch_sampler`` is a :class:`~custom_nets.data.sampler.JointBatchSampler`: call
    ``loader.batch_sampler.set_epoch(epoch)`` at each epoch start; ``num_images`` / ``num_volumes`` on it give the
    dataset composition.
    """
    items = resolve_items(datalist, base_dir, key)
    dataset, num_images, num_volumes = build_joint_dataset(
        items,
        num_slices=num_slices,
        image_size=image_size,
        volume_size=volume_size,
        small_crop_size=small_crop_size,
        num_small_crops=num_small_crops,
        spacing=spacing,
        cache=cache,
        cache_dir=cache_dir,
        num_workers=num_workers,
        augmentation=augmentation,
        channels=channels,
        axcodes=axcodes,
        intensity=intensity,
    )
    sampler = JointBatchSampler(
        num_images, num_volumes, images_per_batch, volumes_per_batch, shuffle, seed, rank, world_size
    )
    generator = torch.Generator().manual_seed(seed * 1_000 + sampler.rank)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=joint_collate,
        num_workers=num_workers,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
    )


class KindDispatchd(Transform):
    """Apply ``transforms[data[kind_key]]`` to a data dict: one pipeline per item kind (deterministic)."""

    def __init__(self, transforms: Mapping[str, Compose], kind_key: Hashable = "kind") -> None:
        self.transforms = dict(transforms)
        self.kind_key = kind_key

    def __call__(self, data: Mapping) -> dict:
        return self.transforms[data[self.kind_key]](dict(data))


def build_inference_dataset(
    datalist: str | os.PathLike | Sequence[Mapping | str],
    base_dir: str | os.PathLike | None = None,
    image_size: Sequence[int] | int = 64,
    volume_size: Sequence[int] | int = 64,
    num_slices: int | None = None,
    spacing: Sequence[float] | None = None,
    key: str = "training",
    cache: str = "none",
    cache_dir: str | os.PathLike | None = None,
    channels: int = 1,
    axcodes: str | None = "RAS",
    intensity: Mapping | None = None,
) -> Dataset:
    """Deterministic dataset for embedding extraction, in datalist order, no augmentation.

    Each sample is a dict with ``image``: (C, H, W) for a 2D item (longest side resized to ``max(image_size)``, then
    centre-padded/cropped to ``image_size``) or (C, N, H, W) for a volume (same reading, orientation, spacing and
    in-plane crop/pad as training; the centred ``num_slices`` window, or all slices when None), plus ``kind``,
    ``global_index``, ``class_label``, ``modality``, ``source_image`` (the file) and, for volumes, ``slice_valid``
    (N,) bool and ``slice_position`` (N,) float32 mm. With a ``DataLoader(batch_size=1)`` an image becomes
    (1, C, H, W) and a volume (1, C, N, H, W).
    """
    items = resolve_items(datalist, base_dir, key)
    size = ensure_tuple_rep(image_size, 2)
    image_pipeline = Compose(
        image_base_transforms(image_size, channels, intensity) + [CropOrPadToBackgroundd("image", spatial_size=size)]
    )
    volume_pipeline = Compose(
        volume_base_transforms(volume_size, spacing, channels, axcodes, intensity)
        + [VolumeSliceSampled("image", num_slices, random_window=False), Transposed("image", indices=(0, 3, 1, 2))]
    )
    transform = Compose([KindDispatchd({"image": image_pipeline, "volume": volume_pipeline})])
    settings = {"image_size": image_size, "volume_size": volume_size, "spacing": spacing, "channels": channels}
    settings.update(axcodes=axcodes, intensity=dict(intensity or {}), num_slices=num_slices)
    return build_dataset(items, transform, cache, cache_folder(cache_dir, "inference", settings))
