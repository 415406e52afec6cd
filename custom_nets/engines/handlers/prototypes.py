"""Prototype maintenance for SwAV / DeepCluster-v2 heads: unit-norm rows every iteration, frozen at the start."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from torch import nn

from custom_nets.losses.clustering import prototype_layers

__all__ = ["PrototypeHandler"]


class PrototypeHandler:
    """Keep the prototype rows on the unit sphere and freeze them for the first iterations (SwAV / DeepCluster-v2
    recipe, Caron et al. 2020; prototypes of arXiv 2212.01893).

    - ``normalize``: at the start of every iteration (and when the run starts) each prototype row is re-normalised,
      so scores ``z @ C^T`` are cosine similarities.
    - ``freeze_iterations``: for iterations ``1..freeze_iterations`` (ignite's 1-based ``engine.state.iteration``,
      so resuming keeps the count) the prototypes' gradients are dropped after the backward pass and before the
      optimiser step (MONAI's ``IterationEvents.BACKWARD_COMPLETED``), exactly like SwAV's ``p.grad = None``: the
      optimiser then skips them (no momentum or weight-decay update). This needs a MONAI engine such as
      ``SupervisedTrainer``. With DDP the gradients have already been averaged; dropping them on every rank keeps
      the replicas identical, so attach this handler on every rank.

    Bundle config::

        {"_target_": "custom_nets.engines.handlers.PrototypeHandler",
         "prototypes": "$@network_def.intra_prototypes", "freeze_iterations": 313}

    Args:
        prototypes: the prototype layers (``nn.Linear(P, K, bias=False)``, a ``ModuleList`` of them, or a list).
            With DDP pass the unwrapped network's modules (the same objects the wrapped one uses).
        freeze_iterations: number of first iterations without prototype updates (313 in the SwAV reference setup).
        normalize: re-normalise the rows every iteration.
    """

    def __init__(
        self, prototypes: nn.Module | Sequence[nn.Module], freeze_iterations: int = 0, normalize: bool = True
    ) -> None:
        if freeze_iterations < 0:
            raise ValueError(f"freeze_iterations must be >= 0, got {freeze_iterations}.")
        self.layers = prototype_layers(prototypes)
        self.freeze_iterations = freeze_iterations
        self.normalize = normalize

    def attach(self, engine: Engine) -> None:
        if self.normalize:
            engine.add_event_handler(Events.STARTED, self.normalize_rows)
            engine.add_event_handler(Events.ITERATION_STARTED, self.normalize_rows)
        if self.freeze_iterations > 0:
            if not engine.has_registered_events(IterationEvents.BACKWARD_COMPLETED):
                raise ValueError(
                    "freezing prototypes needs an engine that fires IterationEvents.BACKWARD_COMPLETED between the "
                    "backward pass and the optimiser step (a MONAI SupervisedTrainer); got "
                    f"{type(engine).__name__}."
                )
            engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.drop_gradients_while_frozen)

    @torch.no_grad()
    def normalize_rows(self, engine: Engine | None = None) -> None:
        for layer in self.layers:
            layer.weight.copy_(F.normalize(layer.weight, dim=1))

    def drop_gradients_while_frozen(self, engine: Engine) -> None:
        if engine.state.iteration <= self.freeze_iterations:
            for layer in self.layers:
                layer.weight.grad = None
