"""Augmented views for joint image-volume self-supervision (arXiv 2212.01893, METHOD.md "Views").

- 2D images: multi-crop (:class:`ImageMultiCropd`): two global random resized crops of ``image_size`` plus optional
  small crops of ``small_crop_size``, each with its own flip, intensity jitter, blur and noise.
- 3D volumes: one slice sampling per volume (:class:`VolumeSliceSampled`: a window of ``num_slices`` consecutive
  slices, zero-padded with a validity mask when the volume is shorter), then two views (:class:`VolumeTwoViewsd`)
  whose in-plane crop, flip and intensity parameters differ but whose slices are the SAME ones, so slice i of view s
  matches slice i of view t. Within a view every slice gets the same in-plane transform.

Every view also records its geometry (:func:`view_geometry`): the 3 x 3 map from the view's pixel coordinates to the
source image's, so that a dense objective can pair the locations of two views that show the same point.

Tensor layouts: 2D images (C, X, Y); volumes enter as MONAI's (C, X, Y, Z) and leave as (C, N, H, W).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrast,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    Randomizable,
    RandRotate,
    RandScaleIntensity,
    RandShiftIntensity,
    Resize,
)
from monai.utils import MAX_SEED, ensure_tuple_rep

__all__ = [
    "ViewAugmentation",
    "RandResizedCrop",
    "image_view_transform",
    "view_geometry",
    "ImageMultiCropd",
    "slice_spacing",
    "VolumeSliceSampled",
    "VolumeTwoViewsd",
]


@dataclass(frozen=True)
class ViewAugmentation:
    """Parameters of the per-view augmentations (SwAV-style, adapted to grey-level medical images).

    Attributes:
        global_crop_scale: area fraction range of the two global 2D crops.
        small_crop_scale: area fraction range of the small 2D crops.
        volume_crop_scale: in-plane area fraction range of the two 3D views.
        crop_ratio: aspect ratio range of every random resized crop.
        flip_prob: probability of a left-right flip.
        rotate_degrees: in-plane rotation by an angle drawn uniformly from [-rotate_degrees, rotate_degrees]; 0 (the
            paper's views) turns it off.
        intensity: False turns off every intensity change below (spatial views only).
        intensity_prob: probability of each of the scale and shift jitters.
        scale_range: relative intensity scale jitter, factor in [1 - s, 1 + s].
        shift_range: absolute intensity shift jitter, offset in [-s, s].
        contrast_prob: probability of a gamma contrast change.
        contrast_gamma: gamma range.
        blur_prob: probability of a Gaussian blur.
        blur_sigma: blur sigma range in pixels.
        noise_prob: probability of additive Gaussian noise.
        noise_std: upper bound of the noise standard deviation.
    """

    global_crop_scale: tuple[float, float] = (0.3, 1.0)
    small_crop_scale: tuple[float, float] = (0.05, 0.3)
    volume_crop_scale: tuple[float, float] = (0.4, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_prob: float = 0.5
    rotate_degrees: float = 0.0
    intensity: bool = True
    intensity_prob: float = 0.8
    scale_range: float = 0.2
    shift_range: float = 0.1
    contrast_prob: float = 0.5
    contrast_gamma: tuple[float, float] = (0.7, 1.5)
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    noise_prob: float = 0.3
    noise_std: float = 0.05


class RandResizedCrop(Randomizable):
    """Random resized crop of a channel-first 2D tensor (C, X, Y) -> (C, *size), the same crop for every channel.

    The crop covers an area fraction drawn uniformly from ``scale`` and an aspect ratio drawn log-uniformly from
    ``ratio`` (Inception-style sampling, 10 tries, then the whole image), and is resized bilinearly to ``size``.
    """

    def __init__(
        self,
        size: Sequence[int] | int,
        scale: Sequence[float] = (0.3, 1.0),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    ) -> None:
        self.size = ensure_tuple_rep(size, 2)
        self.scale = tuple(scale)
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.resize = Resize(self.size, mode="bilinear", align_corners=False)
        self._box: tuple[int, int, int, int] = (0, 0, 1, 1)

    def randomize(self, spatial_shape: Sequence[int]) -> None:
        width, height = int(spatial_shape[0]), int(spatial_shape[1])
        area = width * height
        for _ in range(10):
            target_area = area * self.R.uniform(*self.scale)
            aspect = math.exp(self.R.uniform(*self.log_ratio))
            crop_w = round(math.sqrt(target_area * aspect))
            crop_h = round(math.sqrt(target_area / aspect))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                x0 = int(self.R.randint(0, width - crop_w + 1))
                y0 = int(self.R.randint(0, height - crop_h + 1))
                self._box = (x0, y0, crop_w, crop_h)
                return
        self._box = (0, 0, width, height)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        self.randomize(image.shape[1:])
        x0, y0, crop_w, crop_h = self._box
        return self.resize(image[:, x0 : x0 + crop_w, y0 : y0 + crop_h])


def image_view_transform(
    size: Sequence[int] | int, crop_scale: Sequence[float], augmentation: ViewAugmentation = ViewAugmentation()
) -> Compose:
    """One random view of a (C, X, Y) tensor: random resized crop to ``size``, left-right flip, optional in-plane
    rotation, intensity scale and shift, gamma contrast, Gaussian blur and noise (each with its probability from
    ``augmentation``)."""
    a = augmentation
    transforms: list = [
        RandResizedCrop(size, scale=crop_scale, ratio=a.crop_ratio),
        RandFlip(prob=a.flip_prob, spatial_axis=0),
    ]
    if a.rotate_degrees > 0:
        transforms.append(RandRotate(range_x=math.radians(a.rotate_degrees), prob=1.0, padding_mode="zeros"))
    if a.intensity:
        transforms += [
            RandScaleIntensity(factors=a.scale_range, prob=a.intensity_prob),
            RandShiftIntensity(offsets=a.shift_range, prob=a.intensity_prob),
            RandAdjustContrast(prob=a.contrast_prob, gamma=a.contrast_gamma),
            RandGaussianSmooth(sigma_x=a.blur_sigma, sigma_y=a.blur_sigma, prob=a.blur_prob),
            RandGaussianNoise(prob=a.noise_prob, std=a.noise_std),
        ]
    return Compose(transforms)


def view_geometry(view: Compose, size: Sequence[int]) -> torch.Tensor:
    """The map from pixel coordinates of the view that ``view`` (from :func:`image_view_transform`) made last to pixel
    coordinates of its source image: ``(3, 3)`` float32 ``A`` with ``(x, y, 1) = A @ (u, v, 1)``, pixel centres at
    integers, first coordinate along the first spatial axis.

    It undoes, in reverse order, MONAI's rotation about the centre ``c = (size - 1) / 2`` (which sends ``p`` to
    ``R(angle)^T (p - c) + c``), the flip of the first axis and the resize of the crop box (``align_corners=False``).
    """
    crop, flip = view.transforms[0], view.transforms[1]
    rotate = view.transforms[2] if len(view.transforms) > 2 and isinstance(view.transforms[2], RandRotate) else None
    size_x, size_y = float(size[0]), float(size[1])
    x0, y0, crop_w, crop_h = crop._box
    resize = torch.tensor(
        [
            [crop_w / size_x, 0.0, x0 + 0.5 * crop_w / size_x - 0.5],
            [0.0, crop_h / size_y, y0 + 0.5 * crop_h / size_y - 0.5],
            [0.0, 0.0, 1.0],
        ],
        dtype=torch.float64,
    )
    unflip = torch.eye(3, dtype=torch.float64)
    if flip._do_transform:
        unflip[0, 0], unflip[0, 2] = -1.0, size_x - 1.0
    unrotate = torch.eye(3, dtype=torch.float64)
    if rotate is not None and rotate._do_transform:
        cos, sin = math.cos(rotate.x), math.sin(rotate.x)
        centre = torch.tensor([(size_x - 1.0) / 2.0, (size_y - 1.0) / 2.0], dtype=torch.float64)
        unrotate[:2, :2] = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64)
        unrotate[:2, 2] = centre - unrotate[:2, :2] @ centre
    return (resize @ unflip @ unrotate).float()


class _MultiViewd(Randomizable, MapTransform):
    """Base of the view makers: a list of random view pipelines, each with its own random state.

    ``set_random_state`` (called by MONAI's ``DataLoader`` / ``set_rnd``) seeds every view from ``self.R``, so the
    views of one sample draw independent parameters and the whole is reproducible from one seed.
    """

    def __init__(self, keys: KeysCollection, views: Sequence[Compose]) -> None:
        MapTransform.__init__(self, keys)
        self.views = list(views)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> _MultiViewd:
        super().set_random_state(seed, state)
        for view in self.views:
            view.set_random_state(seed=int(self.R.randint(MAX_SEED)))
        return self


class ImageMultiCropd(_MultiViewd):
    """Multi-crop views of a 2D image.

    Input ``data[key]``: (C, X, Y). Output ``data["image_views"]``: list of ``2 + num_small_crops`` tensors, views 0
    and 1 of shape (C, *image_size) (global crops), the others (C, *small_crop_size), and
    ``data["image_view_geometry"]``: list of the views' ``(3, 3)`` :func:`view_geometry`. The input key is removed.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_size: Sequence[int] | int,
        small_crop_size: Sequence[int] | int | None = None,
        num_small_crops: int = 0,
        augmentation: ViewAugmentation = ViewAugmentation(),
        output_key: str = "image_views",
    ) -> None:
        if num_small_crops > 0 and small_crop_size is None:
            raise ValueError("num_small_crops > 0 needs a small_crop_size")
        views = [image_view_transform(image_size, augmentation.global_crop_scale, augmentation) for _ in range(2)]
        views += [
            image_view_transform(small_crop_size, augmentation.small_crop_scale, augmentation)
            for _ in range(num_small_crops)
        ]
        super().__init__(keys, views)
        self.output_key = output_key
        self.sizes = [ensure_tuple_rep(image_size, 2)] * 2 + [ensure_tuple_rep(small_crop_size, 2)] * num_small_crops

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d.pop(key)
            image = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
            d[self.output_key] = [torch.as_tensor(view(image)) for view in self.views]
            d["image_view_geometry"] = [
                view_geometry(view, size) for view, size in zip(self.views, self.sizes, strict=True)
            ]
        return d


def slice_spacing(image: torch.Tensor) -> float | None:
    """Distance in mm between consecutive slices (last axis) from a MetaTensor's affine; None when unknown."""
    if not isinstance(image, MetaTensor):
        return None
    affine = torch.as_tensor(image.affine, dtype=torch.float64)
    if affine.shape[0] < 4:
        return None
    spacing = float(torch.linalg.norm(affine[:3, 2]))
    return spacing if spacing > 0 else None


class VolumeSliceSampled(Randomizable, MapTransform):
    """Choose the slices of a volume: a window of ``num_slices`` consecutive slices along the last axis.

    Input ``data[key]``: (C, X, Y, Z), a MetaTensor whose affine gives the slice spacing. Output: ``data[key]`` a plain
    tensor (C, X, Y, N) with N = ``num_slices`` (or Z when ``num_slices`` is None), ``data["slice_valid"]`` (N,) bool,
    False for zero-padded slices (volumes with fewer than N slices are padded at the end), and
    ``data["slice_position"]`` (N,) float32: the z of each slice in mm from the volume's first slice (``index *
    spacing``; the plain index when the spacing is unknown). Padded slices continue the same progression.

    Args:
        keys: volume keys.
        num_slices: slices to keep; None keeps all.
        random_window: random window start (training) instead of the centred window (inference).
    """

    def __init__(self, keys: KeysCollection, num_slices: int | None, random_window: bool = True) -> None:
        MapTransform.__init__(self, keys)
        if num_slices is not None and num_slices < 1:
            raise ValueError(f"num_slices must be >= 1 or None, got {num_slices}")
        self.num_slices = num_slices
        self.random_window = random_window
        self._start = 0

    def randomize(self, depth: int) -> None:
        excess = 0 if self.num_slices is None else max(depth - self.num_slices, 0)
        self._start = int(self.R.randint(0, excess + 1)) if self.random_window else excess // 2

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            spacing = slice_spacing(image)
            image = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
            depth = image.shape[-1]
            count = depth if self.num_slices is None else self.num_slices
            self.randomize(depth)
            window = image[..., self._start : self._start + count]
            valid = torch.zeros(count, dtype=torch.bool)
            valid[: window.shape[-1]] = True
            if window.shape[-1] < count:
                window = torch.nn.functional.pad(window, (0, count - window.shape[-1]))
            position = (self._start + torch.arange(count, dtype=torch.float64)) * (spacing or 1.0)
            d[key] = window
            d["slice_valid"] = valid
            d["slice_position"] = position.float()
        return d


class VolumeTwoViewsd(_MultiViewd):
    """Two slice-aligned views of a sampled volume.

    Input ``data[key]``: (C, X, Y, N) from :class:`VolumeSliceSampled` and ``data[valid_key]`` (N,). Output
    ``data["volume_views"]``: list of 2 tensors (C, N, *volume_size). Each view draws its own in-plane crop, flip and
    intensity parameters and applies them identically to all N slices; both views keep the same N slices in the same
    order. Padded slices stay zero. ``data["volume_view_geometry"]``: the two views' ``(3, 3)`` in-plane
    :func:`view_geometry`, shared by all their slices. The input key is removed.
    """

    def __init__(
        self,
        keys: KeysCollection,
        volume_size: Sequence[int] | int,
        augmentation: ViewAugmentation = ViewAugmentation(),
        valid_key: Hashable = "slice_valid",
        output_key: str = "volume_views",
    ) -> None:
        views = [image_view_transform(volume_size, augmentation.volume_crop_scale, augmentation) for _ in range(2)]
        super().__init__(keys, views)
        self.valid_key = valid_key
        self.output_key = output_key
        self.size = ensure_tuple_rep(volume_size, 2)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            volume = torch.as_tensor(d.pop(key))
            channels, num_slices = volume.shape[0], volume.shape[-1]
            stacked = volume.permute(0, 3, 1, 2).reshape(channels * num_slices, *volume.shape[1:3])
            invalid = ~torch.as_tensor(d[self.valid_key], dtype=torch.bool)
            views = []
            for view in self.views:
                out = torch.as_tensor(view(stacked))
                out = out.reshape(channels, num_slices, *out.shape[1:]).contiguous()
                out[:, invalid] = 0
                views.append(out)
            d[self.output_key] = views
            d["volume_view_geometry"] = [view_geometry(view, self.size) for view in self.views]
        return d
