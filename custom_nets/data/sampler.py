"""Batch sampler that mixes 2D images and 3D volumes in a fixed ratio, sharded across DDP ranks.

Joint pretraining (arXiv 2212.01893) trains one slice encoder on 2D images and on the slices of volumes in the same
step, so every batch holds ``images_per_batch`` images and ``volumes_per_batch`` volumes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["JointBatchSampler"]


class JointBatchSampler(Sampler[list[int]]):
    """Yield batches of dataset positions with a fixed number of 2D images and of volumes each.

    The dataset is seen as ``num_images`` images at positions ``[0, num_images)`` followed by ``num_volumes`` volumes
    at ``[num_images, num_images + num_volumes)`` (the layout of ``torch.utils.data.ConcatDataset([images,
    volumes])``). An epoch is long enough for every image and every volume to appear at least once over all ranks:
    ``len(self) = max(ceil(num_images / (images_per_batch * world_size)), ceil(num_volumes / (volumes_per_batch *
    world_size)))`` batches on every rank. Each kind is drawn from a stream of independent permutations (the shorter
    kind is re-shuffled and repeated to fill the epoch), the stream is cut into ``world_size`` equal shards, and rank r
    takes shard r, so ranks see disjoint items within one pass over the data and all yield the same number of batches.

    A kind with no items, or with 0 items per batch, is left out of every batch (2D-only / 3D-only training).
    The order depends only on ``seed`` and the epoch: call :meth:`set_epoch` at each epoch start (each ``__iter__``
    also advances the epoch by one, so consecutive epochs differ when nobody calls it).

    Args:
        num_images: number of 2D items.
        num_volumes: number of 3D items.
        images_per_batch: 2D items per batch and rank.
        volumes_per_batch: 3D items per batch and rank.
        shuffle: random permutations (False: dataset order, for tests and evaluation).
        seed: base seed shared by all ranks.
        rank: this process's rank; default from ``torch.distributed`` when initialised, else 0.
        world_size: number of ranks; default from ``torch.distributed`` when initialised, else 1.
    """

    def __init__(
        self,
        num_images: int,
        num_volumes: int,
        images_per_batch: int,
        volumes_per_batch: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if min(num_images, num_volumes, images_per_batch, volumes_per_batch) < 0:
            raise ValueError("item counts and per-batch counts must be >= 0")
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, {self.world_size})")
        self.num_images = num_images
        self.num_volumes = num_volumes
        self.images_per_batch = images_per_batch if num_images > 0 else 0
        self.volumes_per_batch = volumes_per_batch if num_volumes > 0 else 0
        if self.images_per_batch == 0 and self.volumes_per_batch == 0:
            raise ValueError(
                f"empty batches: {num_images} images x {images_per_batch} per batch and {num_volumes} volumes x "
                f"{volumes_per_batch} per batch; give items and a positive per-batch count for at least one kind"
            )
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        counts = []
        if self.images_per_batch:
            counts.append(math.ceil(self.num_images / (self.images_per_batch * self.world_size)))
        if self.volumes_per_batch:
            counts.append(math.ceil(self.num_volumes / (self.volumes_per_batch * self.world_size)))
        return max(counts)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the next ``__iter__`` (same value on every rank)."""
        self.epoch = epoch

    def _rank_stream(self, count: int, per_batch: int, offset: int, generator: torch.Generator) -> list[int]:
        """This rank's share of a stream of permutations of ``range(count)``, shifted by ``offset``."""
        if per_batch == 0:
            return []
        total = len(self) * per_batch * self.world_size
        stream: list[int] = []
        while len(stream) < total:
            order = torch.randperm(count, generator=generator) if self.shuffle else torch.arange(count)
            stream.extend((order + offset).tolist())
        shard = total // self.world_size
        return stream[self.rank * shard : (self.rank + 1) * shard]

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        images = self._rank_stream(self.num_images, self.images_per_batch, 0, generator)
        volumes = self._rank_stream(self.num_volumes, self.volumes_per_batch, self.num_images, generator)
        for b in range(len(self)):
            batch = images[b * self.images_per_batch : (b + 1) * self.images_per_batch]
            batch += volumes[b * self.volumes_per_batch : (b + 1) * self.volumes_per_batch]
            yield batch
