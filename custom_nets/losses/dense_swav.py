"""Dense swapped prediction: the SwAV objective between matching locations of two views' feature maps (an option
beyond the paper)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from custom_nets.losses.clustering import ClusteringLoss
from custom_nets.losses.sinkhorn import sinkhorn_knopp

__all__ = ["DenseSwAVLoss", "match_locations"]


def match_locations(
    query: torch.Tensor, reference: torch.Tensor, reference_cell: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair every location of one view with the location of the other view that shows the same point.

    Args:
        query: ``(M, L, 2)`` source-image coordinates of the location centres of one view of ``M`` items.
        reference: ``(M, L', 2)`` the same for the other view of the same items.
        reference_cell: ``(M,)`` the side of a reference location's cell in source-image pixels.

    Returns:
        ``(M, L)`` long index of the nearest reference location of the same item, and ``(M, L)`` bool: True where the
        query point lies within half a cell diagonal of that location's centre (False: the other view does not show it).
    """
    if query.ndim != 3 or reference.ndim != 3 or query.shape[0] != reference.shape[0] or query.shape[-1] != 2:
        raise ValueError(
            f"expected (M, L, 2) coordinates of the same items, got {tuple(query.shape)} and {tuple(reference.shape)}."
        )
    distance = torch.cdist(query.detach().float(), reference.detach().float())
    nearest, index = distance.min(dim=-1)
    return index, nearest <= reference_cell.detach().float()[:, None] * math.sqrt(0.5)


def _check_dense_inputs(
    scores: Sequence[Sequence[torch.Tensor]],
    coordinates: Sequence[Sequence[torch.Tensor]],
    cell_sizes: Sequence[Sequence[torch.Tensor]],
) -> None:
    if not len(scores) == len(coordinates) == len(cell_sizes) == 2:
        raise ValueError(
            f"expected 2 views, got {len(scores)} scores, {len(coordinates)} coordinates, {len(cell_sizes)} cell sizes."
        )
    groups = {len(view) for views in (scores, coordinates, cell_sizes) for view in views}
    if len(groups) != 1:
        raise ValueError("both views must hold the same groups of scores, coordinates and cell sizes.")
    for view in range(2):
        for group, (score, coordinate, cell) in enumerate(
            zip(scores[view], coordinates[view], cell_sizes[view], strict=True)
        ):
            if score.ndim != 3 or coordinate.shape[:2] != score.shape[:2] or cell.shape != score.shape[:1]:
                raise ValueError(
                    f"view {view}, group {group}: scores {tuple(score.shape)} (M, L, K), coordinates "
                    f"{tuple(coordinate.shape)} (M, L, 2) and cell sizes {tuple(cell.shape)} (M,) do not match."
                )
        if [s.shape[0] for s in scores[view]] != [s.shape[0] for s in scores[1 - view]]:
            raise ValueError("both views must hold the same items in every group.")


class DenseSwAVLoss(ClusteringLoss):
    """Swapped prediction of Sinkhorn codes between the locations of two views that show the same point: SwAV
    (Caron et al. 2020, arXiv 2006.09882) made dense with geometric correspondences, as PixPro (Xie et al., CVPR 2021)
    pairs the pixels of two crops.

    Not part of arXiv 2212.01893, whose objectives are all global per slice or per volume; it is an option for
    pretraining ``f_intra`` for dense downstream tasks (segmentation). Items are the 2D global views and the volume
    slices of ``L_intra``. For each assignment view ``a`` and the other view ``b``: the codes
    ``q_a = sinkhorn(scores_a)`` are computed over every location of every item at once (all groups together); each
    location ``j`` of view ``b`` that view ``a`` also shows (:func:`match_locations` on the known view geometry)
    predicts the code of its match ``m(j)``; the loss is the mean of ``CE(q_a[m(j)], softmax(scores_b[j] /
    temperature))`` over the matched locations of both directions. Matching by geometry, not by feature similarity
    (DenseCL), matters: with DenseCL's matching on the demo the assignments came to encode the position in the map (a
    shortcut that solves the task without looking at the content).

    Shapes (``forward(scores, coordinates, cell_sizes)``), per view (2), per group ``g`` (items of one map size, e.g.
    images and volume slices):
        scores: ``(M_g, L_g, K)`` = unit-norm dense projections ``@ C^T``.
        coordinates: ``(M_g, L_g, 2)`` source-image pixel coordinates of the location centres.
        cell_sizes: ``(M_g,)`` the side of one location's cell in source-image pixels.
        returns: scalar float32 loss (0 with a gradient path when no location is shown by both views).

    After each call ``last_assignments`` (``[(sum_g M_g L_g,)]``, nearest prototype of every location of view 0),
    ``num_prototypes`` and ``last_loss`` feed :class:`ClusterCollapseMonitor`; ``last_matched_fraction`` (a 0-dim
    tensor: reading it makes the host wait for the device) is the share of locations that found a match. Nothing in a
    call makes the host wait: unmatched locations are masked by value, not removed.

    Args:
        temperature: softmax temperature of the predictions (0.1).
        epsilon: Sinkhorn regularisation (0.05).
        sinkhorn_iterations: Sinkhorn iterations (3).
        distributed: all-reduce the Sinkhorn sums across processes when ``torch.distributed`` is initialised.
    """

    def __init__(
        self, temperature: float = 0.1, epsilon: float = 0.05, sinkhorn_iterations: int = 3, distributed: bool = True
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.distributed = distributed
        self.last_matched_fraction: float | None = None

    def forward(
        self,
        scores: Sequence[Sequence[torch.Tensor]],
        coordinates: Sequence[Sequence[torch.Tensor]],
        cell_sizes: Sequence[Sequence[torch.Tensor]],
    ) -> torch.Tensor:
        _check_dense_inputs(scores, coordinates, cell_sizes)
        flat_scores = [torch.cat([group.flatten(0, 1) for group in view]) for view in scores]
        cross_entropy, matched, total = flat_scores[0].new_zeros((), dtype=torch.float32), 0, 0
        # unmatched locations are masked by value, not removed: counting them would make the host wait for the GPU
        for assigned in (0, 1):
            other = 1 - assigned
            codes = sinkhorn_knopp(flat_scores[assigned], self.epsilon, self.sinkhorn_iterations, self.distributed)
            rows, keep, offset = [], [], 0
            for group in range(len(scores[assigned])):
                num_items, num_locations = scores[assigned][group].shape[:2]
                index, valid = match_locations(
                    coordinates[other][group], coordinates[assigned][group], cell_sizes[assigned][group]
                )
                items = torch.arange(num_items, device=index.device)[:, None]
                rows.append((offset + items * num_locations + index).flatten())
                keep.append(valid.flatten())
                offset += num_items * num_locations
            keep_all = torch.cat(keep)
            log_probabilities = F.log_softmax(flat_scores[other].float() / self.temperature, dim=1)
            per_location = torch.einsum("ik,ik->i", codes[torch.cat(rows)], log_probabilities)
            cross_entropy = cross_entropy - torch.where(keep_all, per_location, 0.0).sum()
            matched, total = matched + keep_all.sum(), total + keep_all.numel()
        loss = cross_entropy / matched.clamp_min(1)  # 0, with a gradient path, when nothing matched
        self.last_matched_fraction = (matched / max(total, 1)).detach()
        self._record([[flat_scores[0]]], loss)
        return loss
