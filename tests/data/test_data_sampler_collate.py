"""Mixed 2D/3D batch sampler (ratio, DDP sharding) and the joint collate function (batch format of COMMON.md)."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from custom_nets.data.collate import joint_collate
from custom_nets.data.sampler import JointBatchSampler


def split(batch, num_images):
    return [i for i in batch if i < num_images], [i for i in batch if i >= num_images]


def test_every_batch_holds_the_configured_ratio():
    sampler = JointBatchSampler(num_images=20, num_volumes=6, images_per_batch=4, volumes_per_batch=2, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5  # max(ceil(20 / 4), ceil(6 / 2))
    seen_images, seen_volumes = set(), set()
    for batch in batches:
        images, volumes = split(batch, 20)
        assert len(images) == 4 and len(volumes) == 2
        seen_images.update(images)
        seen_volumes.update(volumes)
    assert seen_images == set(range(20)) and seen_volumes == set(range(20, 26))


def test_single_kind_batches():
    only_volumes = list(JointBatchSampler(0, 7, images_per_batch=4, volumes_per_batch=2, shuffle=False))
    assert only_volumes == [[0, 1], [2, 3], [4, 5], [6, 0]]
    only_images = list(JointBatchSampler(5, 3, images_per_batch=2, volumes_per_batch=0, shuffle=False))
    assert only_images == [[0, 1], [2, 3], [4, 0]]


def test_no_items_for_any_kind_is_an_error():
    with pytest.raises(ValueError, match="empty batches"):
        JointBatchSampler(0, 4, images_per_batch=2, volumes_per_batch=0)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_equal_shards(world_size):
    num_images, num_volumes = 24, 12
    shards = [
        list(JointBatchSampler(num_images, num_volumes, 4, 2, seed=9, rank=r, world_size=world_size))
        for r in range(world_size)
    ]
    assert len({len(batches) for batches in shards}) == 1
    flat = [sorted(i for batch in batches for i in batch) for batches in shards]
    assert len({len(items) for items in flat}) == 1
    union = [i for items in flat for i in items]
    assert len(union) == len(set(union)) == num_images + num_volumes  # disjoint and complete


def test_uneven_shards_still_have_equal_batch_counts():
    shards = [list(JointBatchSampler(11, 5, 3, 2, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 2
    assert all(len(split(b, 11)[0]) == 3 and len(split(b, 11)[1]) == 2 for s in shards for b in s)
    covered = {i for s in shards for b in s for i in b}
    assert covered == set(range(16))


def test_epochs_reshuffle_deterministically():
    sampler = JointBatchSampler(16, 8, 4, 2, seed=3)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert first != second
    assert list(sampler) == second  # __iter__ advanced the epoch to 1


def test_rank_outside_world_is_rejected():
    with pytest.raises(ValueError, match="rank 2"):
        JointBatchSampler(4, 4, 2, 2, rank=2, world_size=2)


def image_sample(index, views=((1, 8, 8), (1, 8, 8), (1, 4, 4)), label=None):
    sample = {"kind": "image", "global_index": index, "image_views": [torch.rand(s) for s in views]}
    if label is not None:
        sample["class_label"] = label
    return sample


def volume_sample(index, valid=5, num_slices=6, label=None):
    sample = {
        "kind": "volume",
        "global_index": index,
        "volume_views": [torch.rand(1, num_slices, 8, 8) for _ in range(2)],
        "slice_valid": torch.arange(num_slices) < valid,
        "slice_position": 2.0 * torch.arange(num_slices, dtype=torch.float32),
    }
    if label is not None:
        sample["class_label"] = label
    return sample


BATCH_KEYS = {
    "image_views",
    "image_index",
    "image_class",
    "volume_views",
    "slice_valid",
    "slice_position",
    "volume_index",
    "volume_class",
}


def test_collate_mixed_batch():
    samples = [volume_sample(7, valid=3, label=2), image_sample(4, label=1), image_sample(9), volume_sample(1)]
    batch = joint_collate(samples)
    assert set(batch) == BATCH_KEYS
    assert [tuple(v.shape) for v in batch["image_views"]] == [(2, 1, 8, 8), (2, 1, 8, 8), (2, 1, 4, 4)]
    assert all(v.dtype == torch.float32 for v in batch["image_views"] + batch["volume_views"])
    torch.testing.assert_close(batch["image_views"][2][1], samples[2]["image_views"][2])
    assert batch["image_index"].tolist() == [4, 9] and batch["image_index"].dtype == torch.long
    assert batch["image_class"].tolist() == [1, -1]
    assert [tuple(v.shape) for v in batch["volume_views"]] == [(2, 1, 6, 8, 8)] * 2
    torch.testing.assert_close(batch["volume_views"][1][0], samples[0]["volume_views"][1])
    assert batch["slice_valid"].dtype == torch.bool and batch["slice_valid"].shape == (2, 6)
    assert batch["slice_valid"].sum(dim=1).tolist() == [3, 5]
    assert batch["slice_position"].dtype == torch.float32 and batch["slice_position"].shape == (2, 6)
    assert batch["volume_index"].tolist() == [7, 1] and batch["volume_class"].tolist() == [2, -1]


def test_collate_stacks_the_view_geometry_when_every_sample_has_it():
    images = [{**image_sample(i), "image_view_geometry": [torch.eye(3) * (i + v) for v in range(3)]} for i in (1, 2)]
    volumes = [volume_sample(3), volume_sample(4)]
    batch = joint_collate(images + volumes)
    assert [tuple(g.shape) for g in batch["image_view_geometry"]] == [(2, 3, 3)] * 3
    torch.testing.assert_close(batch["image_view_geometry"][2][1], torch.eye(3) * 4)
    assert "volume_view_geometry" not in batch  # the volumes did not record it


def test_collate_gives_plain_tensors_for_metatensor_views():
    """MONAI's readers and transforms return MetaTensors; the batch holds plain tensors with the same values (a
    MetaTensor would send every operation of the network through Python-level metadata handling)."""
    samples = [image_sample(0), image_sample(1), volume_sample(2), volume_sample(3)]
    for sample in samples:
        key = "image_views" if sample["kind"] == "image" else "volume_views"
        sample[key] = [MetaTensor(view, affine=torch.eye(4) * 2) for view in sample[key]]
    batch = joint_collate(samples)
    assert {type(view) for view in batch["image_views"] + batch["volume_views"]} == {torch.Tensor}
    torch.testing.assert_close(batch["volume_views"][1][1], samples[3]["volume_views"][1].as_tensor())
    torch.testing.assert_close(batch["image_views"][2][0], samples[0]["image_views"][2].as_tensor())


def test_collate_images_only():
    batch = joint_collate([image_sample(0), image_sample(1)])
    assert len(batch["image_views"]) == 3 and batch["volume_views"] == []
    assert batch["volume_index"].shape == (0,) and batch["volume_index"].dtype == torch.long
    assert batch["slice_valid"].shape[0] == 0 and batch["slice_valid"].dtype == torch.bool


def test_collate_volumes_only():
    batch = joint_collate([volume_sample(3), volume_sample(5)])
    assert batch["image_views"] == [] and batch["image_index"].shape == (0,)
    assert len(batch["volume_views"]) == 2 and batch["volume_views"][0].shape == (2, 1, 6, 8, 8)


def test_collate_rejects_mismatched_slice_counts():
    with pytest.raises(ValueError, match="different slice counts"):
        joint_collate([volume_sample(0, num_slices=6), volume_sample(1, num_slices=4, valid=4)])


def test_rank_and_world_size_come_from_torch_distributed(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    sampler = JointBatchSampler(16, 8, 2, 1, seed=0)
    assert (sampler.rank, sampler.world_size, len(sampler)) == (1, 4, 2)
