"""2D multi-crop views and slice-aligned 3D views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from custom_nets.data.views import (
    ImageMultiCropd,
    RandResizedCrop,
    ViewAugmentation,
    VolumeSliceSampled,
    VolumeTwoViewsd,
)

SPATIAL_ONLY = ViewAugmentation(intensity=False)


def slice_indexed_volume(depth: int, size: int = 24, slice_spacing: float = 2.5) -> MetaTensor:
    """(1, X, Y, Z) volume whose slice k is constant k (k = 0..depth-1), affine with the given slice spacing."""
    values = torch.arange(depth, dtype=torch.float32).reshape(1, 1, 1, depth).expand(1, size, size, depth)
    return MetaTensor(values.clone(), affine=torch.diag(torch.tensor([0.8, 0.8, slice_spacing, 1.0])))


def sample_views(volume, num_slices, augmentation=SPATIAL_ONLY, seed=0, random_window=True, volume_size=16):
    sampler = VolumeSliceSampled("image", num_slices, random_window=random_window)
    viewer = VolumeTwoViewsd("image", volume_size, augmentation)
    sampler.set_random_state(seed)
    viewer.set_random_state(seed + 1)
    return viewer(sampler({"image": volume}))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_two_views_keep_the_same_slices(seed):
    out = sample_views(slice_indexed_volume(depth=20), num_slices=8, seed=seed)
    view_s, view_t = out["volume_views"]
    assert view_s.shape == view_t.shape == (1, 8, 16, 16)
    start = out["slice_position"][0].item() / 2.5
    expected = start + torch.arange(8, dtype=torch.float32)
    for view in (view_s, view_t):
        # every slice of a view stays constant and equals its source slice index, in order
        torch.testing.assert_close(view.amin(dim=(0, 2, 3)), expected)
        torch.testing.assert_close(view.amax(dim=(0, 2, 3)), expected)
    assert out["slice_valid"].all()
    assert "image" not in out


def test_views_differ_in_plane_but_share_the_transform_across_slices():
    depth = 12
    grid = torch.arange(24, dtype=torch.float32).reshape(1, 24, 1, 1)
    volume = MetaTensor(100.0 * torch.arange(depth).reshape(1, 1, 1, depth) + grid.expand(1, 24, 24, depth))
    augmentation = ViewAugmentation(intensity=False, flip_prob=0.0)
    out = sample_views(volume, num_slices=depth, augmentation=augmentation, seed=5)
    view_s, view_t = out["volume_views"]
    # within a view, slice i minus slice 0 is the constant 100 * i: one in-plane transform for all slices
    offsets = view_s - view_s[:, :1]
    torch.testing.assert_close(offsets, 100.0 * torch.arange(depth).reshape(1, depth, 1, 1).expand_as(offsets))
    # the two views used different in-plane crops
    assert not torch.allclose(view_s[:, 0], view_t[:, 0])


def test_rotation_turns_every_slice_of_a_view_by_the_same_angle():
    pattern = torch.zeros(24, 24)
    pattern[10:14, 2:22] = 1.0  # a bar along the first axis
    depth = 6
    volume = MetaTensor((1.0 + torch.arange(depth)).reshape(1, 1, 1, depth) * pattern.reshape(1, 24, 24, 1))
    augmentation = ViewAugmentation(
        intensity=False, flip_prob=0.0, volume_crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), rotate_degrees=90.0
    )
    out = sample_views(volume, num_slices=depth, augmentation=augmentation, seed=3, volume_size=24)
    for view in out["volume_views"]:
        # rotation and resampling are linear and shared: slice i stays (1 + i) times slice 0
        expected = (1.0 + torch.arange(depth)).reshape(1, depth, 1, 1) * view[:, :1]
        torch.testing.assert_close(view, expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(view[0, 0], pattern, atol=0.1)  # the bar was turned
    assert not torch.allclose(out["volume_views"][0], out["volume_views"][1])  # each view draws its own angle


def test_intensity_jitter_preserves_slice_order():
    augmentation = ViewAugmentation(noise_std=0.01, blur_prob=0.0)
    out = sample_views(slice_indexed_volume(depth=30), num_slices=16, augmentation=augmentation, seed=11)
    for view in out["volume_views"]:
        means = view.mean(dim=(0, 2, 3))
        assert torch.equal(torch.argsort(means), torch.arange(16))


def test_short_volume_is_padded_with_invalid_zero_slices():
    out = sample_views(slice_indexed_volume(depth=5) + 1.0, num_slices=8, augmentation=ViewAugmentation())
    assert out["slice_valid"].tolist() == [True] * 5 + [False] * 3
    torch.testing.assert_close(out["slice_position"], 2.5 * torch.arange(8, dtype=torch.float32))
    for view in out["volume_views"]:
        assert torch.count_nonzero(view[:, 5:]) == 0
        assert bool((view[:, :5].abs().sum(dim=(0, 2, 3)) > 0).all())


def test_centred_window_and_positions_in_mm():
    sampler = VolumeSliceSampled("image", 6, random_window=False)
    out = sampler({"image": slice_indexed_volume(depth=11, slice_spacing=3.0)})
    assert out["image"].shape == (1, 24, 24, 6)
    torch.testing.assert_close(out["image"][0, 0, 0], torch.arange(2.0, 8.0))  # start = (11 - 6) // 2
    torch.testing.assert_close(out["slice_position"], 3.0 * torch.arange(2.0, 8.0))
    assert out["slice_position"].dtype == torch.float32


def test_all_slices_kept_and_index_positions_without_spacing():
    out = VolumeSliceSampled("image", None)({"image": torch.zeros(1, 4, 4, 7)})
    assert out["image"].shape == (1, 4, 4, 7)
    torch.testing.assert_close(out["slice_position"], torch.arange(7, dtype=torch.float32))


def test_multi_crop_shapes_and_reproducibility():
    image = torch.rand(1, 40, 50)
    maker = ImageMultiCropd("image", image_size=32, small_crop_size=(12, 16), num_small_crops=3)
    views = maker.set_random_state(7)({"image": image})["image_views"]
    assert [tuple(v.shape) for v in views] == [(1, 32, 32)] * 2 + [(1, 12, 16)] * 3
    assert not torch.allclose(views[0], views[1])
    again = ImageMultiCropd("image", image_size=32, small_crop_size=(12, 16), num_small_crops=3).set_random_state(7)
    for first, second in zip(views, again({"image": image})["image_views"], strict=True):
        torch.testing.assert_close(first, second)


def test_multi_crop_needs_small_size():
    with pytest.raises(ValueError, match="small_crop_size"):
        ImageMultiCropd("image", image_size=32, num_small_crops=2)


def test_full_scale_crop_is_identity():
    image = torch.rand(2, 20, 20)
    crop = RandResizedCrop(20, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(torch.as_tensor(crop(image)), image)


def test_random_crop_covers_requested_area():
    crop = RandResizedCrop(10, scale=(0.25, 0.25), ratio=(1.0, 1.0)).set_random_state(0)
    crop.randomize((40, 40))
    x0, y0, width, height = crop._box
    assert (width, height) == (20, 20)
    assert 0 <= x0 <= 20 and 0 <= y0 <= 20
    assert np.isclose(width * height / 1600, 0.25)


def _source_coordinates(width: int, height: int) -> torch.Tensor:
    """(3, X, Y): each pixel's own coordinates along X and Y, and a channel of ones that marks the inside."""
    xs, ys = torch.meshgrid(
        torch.arange(width, dtype=torch.float32), torch.arange(height, dtype=torch.float32), indexing="ij"
    )
    return torch.stack([xs, ys, torch.ones_like(xs)])


@pytest.mark.parametrize("seed", range(6))
def test_view_geometry_maps_view_pixels_to_the_source_pixels_they_show(seed):
    """Pushed through the views' crop, resize, flip and rotation, a coordinate image shows at every view pixel
    (inside the source) the source coordinates that ``view_geometry`` computes."""
    augmentation = ViewAugmentation(intensity=False, rotate_degrees=30.0, global_crop_scale=(0.3, 1.0))
    maker = ImageMultiCropd(
        "image", image_size=(40, 36), small_crop_size=12, num_small_crops=1, augmentation=augmentation
    )
    sample = maker.set_random_state(seed)({"image": _source_coordinates(70, 60)})
    for view, geometry in zip(sample["image_views"], sample["image_view_geometry"], strict=True):
        assert geometry.shape == (3, 3) and geometry.dtype == torch.float32
        pixels = _source_coordinates(*view.shape[1:])
        predicted = torch.einsum("ij,jxy->ixy", geometry, pixels)
        inside = view[2] > 0.999  # away from the zero padding of the rotation
        assert inside.sum() > 0.5 * inside.numel()
        torch.testing.assert_close(predicted[:2, inside], view[:2, inside], atol=0.1, rtol=0.0)  # 1/10 pixel


def test_volume_views_record_one_geometry_per_view_for_all_slices():
    augmentation = ViewAugmentation(intensity=False, rotate_degrees=30.0)
    volume = _source_coordinates(24, 24)[:, :, :, None].expand(3, 24, 24, 5).clone()  # x, y, ones in every slice
    sampler = VolumeSliceSampled("image", 5)
    viewer = VolumeTwoViewsd("image", 16, augmentation).set_random_state(3)
    sample = viewer(sampler.set_random_state(0)({"image": volume}))
    for view, geometry in zip(sample["volume_views"], sample["volume_view_geometry"], strict=True):
        predicted = torch.einsum("ij,jxy->ixy", geometry, _source_coordinates(16, 16))
        inside = view[2, 0] > 0.999  # away from the zero padding of the rotation
        for index in range(5):  # every slice of a view went through the same in-plane transform
            torch.testing.assert_close(predicted[:2, inside], view[:2, index][:, inside], atol=0.1, rtol=0.0)
