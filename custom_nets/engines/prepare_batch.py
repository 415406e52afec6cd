"""Turn a collated joint 2D + 3D batch into the network's inputs and the losses' targets for MONAI engines."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.engines.utils import PrepareBatch, default_prepare_batch
from monai.utils import convert_to_tensor

from custom_nets.nets.joint_ssl import valid_slice_rows

__all__ = ["JointItemIds", "JointPrepareBatch", "choose_slices", "plain_prepare_batch"]


def plain_prepare_batch(
    batchdata: Mapping[str, torch.Tensor] | torch.Tensor,
    device: str | torch.device | None = None,
    non_blocking: bool = False,
    **kwargs: object,
) -> tuple:
    """MONAI's ``default_prepare_batch`` (image and label to ``device``) with MONAI ``MetaTensor`` s turned into plain
    tensors (``convert_to_tensor(track_meta=False)``, no copy): a ``MetaTensor`` sends every operation of the
    forward pass, the loss and the metrics through Python-level metadata handling. For training engines, whose
    outputs are never written as images; evaluators that invert transforms or save predictions need the metadata and
    keep MONAI's default."""
    prepared = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
    return tuple(convert_to_tensor(item, track_meta=False) for item in prepared)  # None stays None


class JointItemIds:
    """Global ids of every clustering item: one per 2D image, one per slice position of every volume.

    DeepCluster-v2 keeps a memory bank row per item. Ids derive from each sample's GLOBAL index in the datalist (the
    concatenated dataset), never from a per-dataset local index: 2D image ``g`` gets id ``g``; slice ``j`` of the
    ``r``-th volume of the datalist gets ``num_items + r * num_slices + j``.

    Args:
        kinds: ``"image"`` or ``"volume"`` for every datalist item, in datalist order.
        num_slices: slices per volume after cropping / padding.
    """

    def __init__(self, kinds: Sequence[str], num_slices: int) -> None:
        unknown = sorted(set(kinds) - {"image", "volume"})
        if unknown:
            raise ValueError(f"datalist kinds must be 'image' or 'volume', found {unknown}.")
        self.num_items = len(kinds)
        self.num_slices = num_slices
        volume_rank = torch.full((self.num_items,), -1, dtype=torch.long)
        is_volume = torch.tensor([kind == "volume" for kind in kinds], dtype=torch.bool)
        volume_rank[is_volume] = torch.arange(int(is_volume.sum()))
        self.volume_rank = volume_rank
        self.num_volumes = int(is_volume.sum())

    @property
    def num_intra_items(self) -> int:
        """Size of the 2D (intra) memory bank: images plus every slice position of every volume."""
        return self.num_items + self.num_volumes * self.num_slices

    def intra_ids(
        self, image_index: torch.Tensor, volume_index: torch.Tensor, slice_valid: torch.Tensor
    ) -> torch.Tensor:
        """Ids ``(B2 + S,)`` of views 0/1 items: the images, then the valid slices in volume-major order."""
        ranks = self.volume_rank[volume_index.cpu()].to(volume_index.device)
        if bool((ranks < 0).any()):
            raise ValueError("a batch volume is listed as a 2D image in the datalist; check its 'kind'.")
        slice_ids = self.num_items + ranks[:, None] * self.num_slices + torch.arange(slice_valid.shape[1]).to(ranks)
        return torch.cat([image_index.long(), slice_ids[slice_valid]])

    def inter_ids(self, volume_index: torch.Tensor) -> torch.Tensor:
        """Ids ``(B3,)`` of volumes for the 3D (inter) memory bank, in ``[0, num_volumes)``."""
        return self.volume_rank[volume_index.cpu()].to(volume_index.device)


def choose_slices(slice_valid: torch.Tensor, count: int) -> torch.Tensor:
    """``(B, N)`` bool: ``count`` random valid slices per volume (all of them when fewer are valid)."""
    scores = torch.rand(slice_valid.shape).masked_fill(~slice_valid.cpu(), 2.0)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return (ranks < count).to(slice_valid.device) & slice_valid


def _to(value: object, device: torch.device | str | None, non_blocking: bool) -> object:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, non_blocking=non_blocking)
    if isinstance(value, (list, tuple)):
        return [_to(v, device, non_blocking) for v in value]
    return value


def _slice_rows(
    slice_valid: torch.Tensor,
    intra_slices: torch.Tensor | None,
    device: torch.device | str | None,
    non_blocking: bool,
) -> dict[str, torch.Tensor]:
    """``slice_rows`` and, with ``intra_slices``, ``intra_rows`` (see :class:`JointPrepareBatch`) from host
    ``(B3, N)`` masks."""
    empty = ~slice_valid.any(dim=1)
    if bool(empty.any()):
        raise ValueError(
            f"volume(s) {empty.nonzero().flatten().tolist()} of this batch have no valid slice (slice_valid all "
            "False); every volume needs at least one slice: check the volume files and the slice cropping."
        )
    rows = {"slice_rows": valid_slice_rows(slice_valid)}
    if intra_slices is not None:
        rows["intra_rows"] = intra_slices.flatten()[rows["slice_rows"]].nonzero().squeeze(1)
    return {key: value.to(device, non_blocking=non_blocking) for key, value in rows.items()}


class JointPrepareBatch(PrepareBatch):
    """``prepare_batch`` for :class:`monai.engines.SupervisedTrainer` on joint 2D + 3D batches.

    Every tensor is copied to ``device`` with the trainer's ``non_blocking``: with batches in pinned memory (the
    loader's ``pin_memory``) the host-to-GPU copies then run asynchronously.

    Returns ``(inputs, targets)`` where ``inputs`` holds ``image_views``, ``volume_views``, their ``*_view_geometry``,
    ``slice_valid``, ``slice_position`` and ``intra_slices`` on the device (what :class:`custom_nets.nets.JointSSLNet`
    takes in train mode) and ``targets`` holds ``intra_index`` ``(B2 + S,)`` and ``inter_index`` ``(B3,)`` (what the
    clustering losses key their memory banks with). With volumes, ``inputs`` also holds two index tensors computed
    here on the host, so that the network's forward pass never waits for the GPU to count valid slices:
    ``slice_rows`` ``(S,)``, the flat ``B3 * N`` indices of the valid slices, and (with ``intra_slices_per_volume``)
    ``intra_rows``, the positions among those ``S`` of the slices that enter the 2D clustering.

    Args:
        item_ids: the global item ids of the datalist.
        intra_slices_per_volume: how many random valid slices of each volume enter the 2D clustering loss (the same in
            both views); ``None`` uses every valid slice. Slices of one volume are strongly correlated: with few
            volumes per batch, all their slices would dominate the 2D batch, and equipartition would then split one
            volume's slices over many prototypes instead of grouping similar anatomy.
    """

    INPUT_KEYS = (
        "image_views",
        "volume_views",
        "slice_valid",
        "slice_position",
        "image_view_geometry",
        "volume_view_geometry",
    )

    def __init__(self, item_ids: JointItemIds, intra_slices_per_volume: int | None = None) -> None:
        if intra_slices_per_volume is not None and intra_slices_per_volume < 1:
            raise ValueError(f"intra_slices_per_volume must be >= 1 or None, got {intra_slices_per_volume}.")
        self.item_ids = item_ids
        self.intra_slices_per_volume = intra_slices_per_volume

    def __call__(
        self,
        batchdata: Mapping[str, object],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: object,
    ) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
        inputs = {key: _to(batchdata.get(key), device, non_blocking) for key in self.INPUT_KEYS}
        image_index = batchdata.get("image_index", torch.zeros(0, dtype=torch.long))
        volume_index = batchdata.get("volume_index", torch.zeros(0, dtype=torch.long))
        slice_valid = batchdata.get("slice_valid")
        if slice_valid is None:
            slice_valid = torch.zeros(0, self.item_ids.num_slices, dtype=torch.bool)
        intra_slices, chosen = slice_valid, None
        if self.intra_slices_per_volume is not None and slice_valid.numel():
            intra_slices = chosen = choose_slices(slice_valid, self.intra_slices_per_volume)
            inputs["intra_slices"] = intra_slices.to(device, non_blocking=non_blocking)
        if slice_valid.numel():
            inputs.update(
                _slice_rows(slice_valid.cpu(), None if chosen is None else chosen.cpu(), device, non_blocking)
            )
        targets = {
            "intra_index": self.item_ids.intra_ids(image_index, volume_index, intra_slices),
            "inter_index": self.item_ids.inter_ids(volume_index),
        }
        targets = {key: value.to(device, non_blocking=non_blocking) for key, value in targets.items()}
        return inputs, targets
