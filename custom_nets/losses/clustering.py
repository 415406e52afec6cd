"""Parts shared by the clustering losses: prototype layers, input checks, what the collapse monitor reads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ClusteringLoss", "check_clustering_inputs", "prototype_layers"]


def prototype_layers(prototypes: nn.Module | Sequence[nn.Module]) -> list[nn.Linear]:
    """Return the bias-free ``nn.Linear`` layers whose weight rows are prototypes, in head order.

    Args:
        prototypes: one ``nn.Linear``, an ``nn.ModuleList`` of them (e.g. ``JointSSLNet.intra_prototypes``) or any
            module / sequence of modules containing them.

    Raises:
        ValueError: when no ``nn.Linear`` is found or one of them has a bias (a prototype score is ``z @ C^T`` only).
    """
    modules = [prototypes] if isinstance(prototypes, nn.Module) else list(prototypes)
    layers = [layer for module in modules for layer in module.modules() if isinstance(layer, nn.Linear)]
    if not layers:
        raise ValueError(f"no nn.Linear prototype layer found in {type(prototypes).__name__}.")
    for layer in layers:
        if layer.bias is not None:
            raise ValueError(
                f"prototype layer {layer} has a bias; prototype layers must be nn.Linear(..., bias=False)."
            )
    return layers


def check_clustering_inputs(
    projections: Sequence[torch.Tensor], scores: Sequence[Sequence[torch.Tensor]], min_views: int = 2
) -> int:
    """Validate the shapes of a clustering head's outputs and return the number of items of views 0 and 1.

    Args:
        projections: per view ``v``, ``(M_v, P)``.
        scores: per head ``h``, per view ``v``, ``(M_v, K_h)``.
        min_views: the least number of views required.

    Raises:
        ValueError: on a missing head or view, different view counts, or item counts that do not match (views 0 and 1
            must hold the same items; the other views hold a prefix of them).
    """
    if len(scores) == 0:
        raise ValueError("scores must hold at least one prototype head.")
    num_views = len(projections)
    if num_views < min_views:
        raise ValueError(f"at least {min_views} views are required, got {num_views} projections.")
    num_items = projections[0].shape[0]
    if projections[1].shape[0] != num_items:
        raise ValueError(f"views 0 and 1 must hold the same items, got {num_items} and {projections[1].shape[0]}.")
    for head, head_scores in enumerate(scores):
        if len(head_scores) != num_views:
            raise ValueError(f"head {head} has scores for {len(head_scores)} views but there are {num_views} views.")
        for view, (view_scores, view_projection) in enumerate(zip(head_scores, projections, strict=True)):
            if view_scores.ndim != 2 or view_scores.shape[0] != view_projection.shape[0]:
                raise ValueError(
                    f"head {head}, view {view}: scores of shape {tuple(view_scores.shape)} do not match the "
                    f"{view_projection.shape[0]} projections of that view."
                )
            if view_scores.shape[0] > num_items or view_scores.shape[1] != head_scores[0].shape[1]:
                raise ValueError(
                    f"head {head}, view {view}: shape {tuple(view_scores.shape)}; a view holds at most the {num_items} "
                    f"items of views 0/1 and every view of a head has the same number of prototypes."
                )
    return num_items


class ClusteringLoss(nn.Module):
    """Base of the clustering losses: records what :class:`ClusterCollapseMonitor` reads after each call.

    ``last_assignments``: per head, ``(M_0,)`` index of the nearest prototype of every item of view 0 (computed on
    demand from the kept detached scores); ``num_prototypes``: per head ``K_h``; ``last_loss``: detached scalar.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last_view0_scores: list[torch.Tensor] = []
        self.last_loss: torch.Tensor | None = None

    @property
    def last_assignments(self) -> list[torch.Tensor]:
        return [scores.argmax(dim=1) for scores in self._last_view0_scores]

    @property
    def num_prototypes(self) -> list[int]:
        return [scores.shape[1] for scores in self._last_view0_scores]

    def _record(self, scores: Sequence[Sequence[torch.Tensor]], loss: torch.Tensor) -> None:
        self._last_view0_scores = [head_scores[0].detach() for head_scores in scores]
        self.last_loss = loss.detach()
