"""Epoch-start spherical k-means of the DeepCluster-v2 memory bank, written into the prototype layers."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from ignite.engine import Engine, Events
from torch import nn

from custom_nets.losses.clustering import prototype_layers
from custom_nets.losses.deepcluster import DeepClusterV2Loss

__all__ = ["DeepClusterKMeansHandler"]

logger = logging.getLogger(__name__)


class DeepClusterKMeansHandler:
    """At each epoch start, cluster last epoch's memory bank of a :class:`DeepClusterV2Loss` (spherical k-means per
    head), copy the centroids into the prototype layers and set the cluster targets of every item (DeepCluster-v2,
    Caron et al. 2020; DeepCluster variant of arXiv 2212.01893).

    At the first epoch start the bank is empty, so nothing happens and the loss is zero for that epoch (see
    :class:`DeepClusterV2Loss`). The k-means seed is ``seed + epoch``. Under ``torch.distributed`` the update is a
    collective: attach this handler on EVERY rank (not rank 0 only); all ranks end with identical prototypes.

    Bundle config::

        {"_target_": "custom_nets.engines.handlers.DeepClusterKMeansHandler",
         "loss": "$@loss.intra", "prototypes": "$@network_def.intra_prototypes"}

    Args:
        loss: the DeepCluster-v2 loss that owns the memory bank (e.g. the ``intra`` component of ``JointLoss``).
        prototypes: that head's prototype layers (unwrapped network's modules under DDP).
        seed: base seed of the k-means initialisation.
        name: label used in the log messages (e.g. "intra", "inter").
    """

    def __init__(
        self, loss: DeepClusterV2Loss, prototypes: nn.Module | Sequence[nn.Module], seed: int = 0, name: str = "intra"
    ) -> None:
        if not isinstance(loss, DeepClusterV2Loss):
            raise TypeError(
                f"loss must be a DeepClusterV2Loss, got {type(loss).__name__}; with a JointLoss pass its component, "
                'e.g. "$@loss.intra".'
            )
        self.loss = loss
        self.layers = prototype_layers(prototypes)
        if len(self.layers) != loss.num_heads:
            raise ValueError(f"{len(self.layers)} prototype layers for a loss with {loss.num_heads} heads.")
        self.seed = seed
        self.name = name

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        centroids = self.loss.update_clusters(self.layers, seed=self.seed + engine.state.epoch)
        if not centroids:
            logger.info(f"DeepCluster-v2 [{self.name}] epoch {engine.state.epoch}: memory bank empty, no k-means yet.")
            return
        items = int(self.loss.bank_valid.sum())
        sizes = [
            torch.bincount(a[a >= 0], minlength=len(c)) for a, c in zip(self.loss.assignments, centroids, strict=True)
        ]
        used = ", ".join(f"{int((s > 0).sum())}/{len(s)}" for s in sizes)
        logger.info(
            f"DeepCluster-v2 [{self.name}] epoch {engine.state.epoch}: k-means on {items} items, "
            f"non-empty clusters per head: {used}."
        )
