"""Dense swapped prediction: the SwAV objective on the locations of a 2D feature map (an option beyond the paper)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from custom_nets.losses.clustering import ClusteringLoss
from custom_nets.losses.sinkhorn import sinkhorn_knopp
from custom_nets.losses.swav import soft_cross_entropy

__all__ = ["DenseSwAVLoss", "match_locations"]


def match_locations(query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """For every location of ``query`` ``(M, L, C)``, the index of the location of ``reference`` ``(M, L', C)`` of the
    same item with the highest cosine similarity: ``(M, L)`` long (DenseCL's correspondence, Wang et al., CVPR 2021)."""
    if query.ndim != 3 or reference.ndim != 3 or query.shape[0] != reference.shape[0]:
        raise ValueError(
            f"expected (M, L, C) features of the same items, got {tuple(query.shape)} and {tuple(reference.shape)}."
        )
    query = F.normalize(query.detach().float(), dim=-1)
    reference = F.normalize(reference.detach().float(), dim=-1)
    return torch.einsum("mlc,mkc->mlk", query, reference).argmax(dim=-1)


def _check_dense_inputs(scores: Sequence[Sequence[torch.Tensor]], features: Sequence[Sequence[torch.Tensor]]) -> None:
    if len(scores) != 2 or len(features) != 2:
        raise ValueError(f"expected scores and features of 2 views, got {len(scores)} and {len(features)}.")
    if not len(scores[0]) == len(scores[1]) == len(features[0]) == len(features[1]):
        raise ValueError("both views must hold the same groups of scores and features.")
    for group, (first, second, feature) in enumerate(zip(scores[0], scores[1], features[0], strict=True)):
        if first.ndim != 3 or first.shape[:2] != second.shape[:2] or feature.shape[:2] != first.shape[:2]:
            raise ValueError(
                f"group {group}: scores {tuple(first.shape)} / {tuple(second.shape)} and features "
                f"{tuple(feature.shape)} must all be (M, L, .) with the same M and L in both views."
            )


class DenseSwAVLoss(ClusteringLoss):
    """Swapped prediction of Sinkhorn codes between the locations of two views' feature maps: SwAV (Caron et al.
    2020, arXiv 2006.09882) made dense by DenseCL's matching of locations (Wang et al., "Dense Contrastive Learning
    for Self-Supervised Visual Pre-Training", CVPR 2021).

    Not part of arXiv 2212.01893, whose objectives are all global per slice or per volume; it is an option for
    pretraining ``f_intra`` for dense downstream tasks (segmentation). Items are the 2D global views and the volume
    slices of ``L_intra``. For each assignment view ``a`` and the other view ``b``: the codes
    ``q_a = sinkhorn(scores_a)`` are computed over every location of every item at once (all groups together), each
    location ``j`` of view ``b`` is matched to the location ``m(j)`` of the same item in view ``a`` whose backbone
    feature is most similar (:func:`match_locations`; detached), and predicts its code:
    ``loss = mean_a mean_j CE(q_a[m(j)], softmax(scores_b[j] / temperature))``.

    Shapes (``forward(scores, features)``):
        scores: per view (2), per group ``g`` (items of one spatial size, e.g. images and volume slices),
            ``(M_g, L_g, K)`` = unit-norm dense projections ``@ C^T``.
        features: the same layout, ``(M_g, L_g, C)``: the backbone features that define the matches.
        returns: scalar float32 loss.

    After each call ``last_assignments`` (``[(sum_g M_g L_g,)]``, nearest prototype of every location of view 0),
    ``num_prototypes`` and ``last_loss`` feed :class:`ClusterCollapseMonitor`.

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

    def forward(
        self, scores: Sequence[Sequence[torch.Tensor]], features: Sequence[Sequence[torch.Tensor]]
    ) -> torch.Tensor:
        _check_dense_inputs(scores, features)
        flat_scores = [torch.cat([group.flatten(0, 1) for group in view]) for view in scores]
        matches = [[match_locations(b, a) for a, b in zip(features[0], features[1], strict=True)]]
        matches.append([match_locations(a, b) for a, b in zip(features[0], features[1], strict=True)])
        view_losses = []
        for assigned in (0, 1):
            codes = sinkhorn_knopp(flat_scores[assigned], self.epsilon, self.sinkhorn_iterations, self.distributed)
            matched_codes = []
            offset = 0
            for group, match in zip(scores[assigned], matches[assigned], strict=True):
                num_items, num_locations = group.shape[:2]
                rows = offset + match + num_locations * torch.arange(num_items, device=match.device)[:, None]
                matched_codes.append(codes[rows.flatten()])
                offset += num_items * num_locations
            log_probabilities = F.log_softmax(flat_scores[1 - assigned].float() / self.temperature, dim=1)
            view_losses.append(soft_cross_entropy(log_probabilities, torch.cat(matched_codes)))
        loss = torch.stack(view_losses).mean()
        self._record([[flat_scores[0]]], loss)
        return loss
