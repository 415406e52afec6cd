"""Detection of collapsed clustering (all items on few prototypes) from a SwAV / DeepCluster-v2 loss."""

from __future__ import annotations

import logging
import math
from typing import Protocol

import torch
from ignite.engine import Engine, Events
from torch import nn

__all__ = ["ClusterCollapseMonitor", "assignment_statistics"]

logger = logging.getLogger(__name__)


class ScalarWriter(Protocol):
    """What is needed of a ``torch.utils.tensorboard.SummaryWriter``."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> None: ...


def assignment_statistics(counts: torch.Tensor) -> tuple[float, int]:
    """Normalised entropy and number of used prototypes of an assignment histogram ``counts`` (``(K,)``).

    The entropy is divided by ``log(min(K, n))`` (``n`` assignments), its largest possible value, so 1 means the
    items are spread as evenly as possible and 0 means every item went to one prototype.
    """
    total = float(counts.sum())
    used = int((counts > 0).sum())
    if total == 0:
        return 0.0, 0
    probabilities = counts[counts > 0].double() / total
    entropy = float(-(probabilities * probabilities.log()).sum())
    largest = math.log(min(counts.numel(), total))
    return (entropy / largest if largest > 0 else 0.0), used


class ClusterCollapseMonitor:
    """Watch a clustering loss for collapse (arXiv 2212.01893 trains SwAV / DeepCluster-v2 heads; a collapsed head
    sends every item to one or a few prototypes and stops learning).

    After every iteration it accumulates, per head, how many items had each prototype as nearest prototype
    (``loss.last_assignments``, kept by :class:`SwAVLoss` and :class:`DeepClusterV2Loss`) and the loss value. Every
    ``interval`` iterations (or at each epoch end when ``interval`` is None) it computes per head:
    ``entropy`` (normalised assignment entropy, see :func:`assignment_statistics`), ``prototypes_in_use`` and
    ``loss_over_log_k`` (loss / mean log K: about 1 when the predictions are no better than uniform). These go to
    ``summary_writer`` as ``collapse/<name>/head<h>/<stat>`` when one is given. When a head's entropy is below
    ``min_entropy`` or fewer than ``min_prototypes_in_use`` prototypes are used, a warning is logged, and with
    ``stop_on_collapse`` the run is stopped (``engine.terminate()``) after ``patience`` consecutive collapsed checks.
    It reads this rank's items only and uses no collective, so it may run on rank 0 only.

    Bundle config::

        {"_target_": "custom_nets.engines.handlers.ClusterCollapseMonitor", "loss": "$@loss.intra",
         "name": "intra", "summary_writer": "@summary_writer", "stop_on_collapse": true}

    Args:
        loss: a clustering loss exposing ``last_assignments``, ``num_prototypes`` and ``last_loss``.
        name: label of the head group in tags and messages.
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter`` (or anything with ``add_scalar``), optional.
        min_entropy: normalised entropy below which a head counts as collapsed.
        min_prototypes_in_use: a head using fewer prototypes counts as collapsed.
        interval: check every this many iterations; None checks at each epoch end.
        stop_on_collapse: terminate the engine on collapse.
        patience: consecutive collapsed checks before stopping.
    """

    def __init__(
        self,
        loss: nn.Module,
        name: str = "intra",
        summary_writer: ScalarWriter | None = None,
        min_entropy: float = 0.1,
        min_prototypes_in_use: int = 2,
        interval: int | None = None,
        stop_on_collapse: bool = False,
        patience: int = 1,
    ) -> None:
        for attribute in ("last_assignments", "num_prototypes", "last_loss"):
            if not hasattr(loss, attribute):
                raise TypeError(
                    f"{type(loss).__name__} has no '{attribute}'; pass a SwAVLoss or DeepClusterV2Loss "
                    '(with a JointLoss, its component, e.g. "$@loss.intra").'
                )
        if interval is not None and interval < 1:
            raise ValueError(f"interval must be >= 1 or None, got {interval}.")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}.")
        self.loss = loss
        self.name = name
        self.summary_writer = summary_writer
        self.min_entropy = min_entropy
        self.min_prototypes_in_use = min_prototypes_in_use
        self.interval = interval
        self.stop_on_collapse = stop_on_collapse
        self.patience = patience
        self.collapsed_checks = 0
        self.last_statistics: list[dict[str, float]] = []
        self._last_seen: torch.Tensor | None = None
        self._reset()

    def _reset(self) -> None:
        self._counts: list[torch.Tensor] = []
        self._loss_sum = 0.0
        self._loss_calls = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.accumulate)
        check_event = (
            Events.EPOCH_COMPLETED if self.interval is None else Events.ITERATION_COMPLETED(every=self.interval)
        )
        engine.add_event_handler(check_event, self.check)

    def accumulate(self, engine: Engine | None = None) -> None:
        """Add the loss's latest assignments (ignored when the loss was not called since the previous iteration)."""
        if self.loss.last_loss is None or self.loss.last_loss is self._last_seen:
            return
        self._last_seen = self.loss.last_loss
        if not self._counts:
            self._counts = [torch.zeros(k, dtype=torch.long) for k in self.loss.num_prototypes]
        for counts, assignments in zip(self._counts, self.loss.last_assignments, strict=True):
            counts += torch.bincount(assignments.cpu(), minlength=counts.numel())
        self._loss_sum += float(self.loss.last_loss)
        self._loss_calls += 1

    def check(self, engine: Engine) -> None:
        """Compute, log and act on the statistics gathered since the previous check."""
        if not self._counts:
            return
        step = engine.state.epoch if self.interval is None else engine.state.iteration
        mean_loss = self._loss_sum / self._loss_calls
        mean_log_k = sum(math.log(c.numel()) for c in self._counts) / len(self._counts)
        self.last_statistics = []
        collapsed_heads = []
        for head, counts in enumerate(self._counts):
            entropy, used = assignment_statistics(counts)
            statistics = {"entropy": entropy, "prototypes_in_use": used, "loss_over_log_k": mean_loss / mean_log_k}
            self.last_statistics.append(statistics)
            if self.summary_writer is not None:
                for key, value in statistics.items():
                    self.summary_writer.add_scalar(f"collapse/{self.name}/head{head}/{key}", value, step)
            if entropy < self.min_entropy or used < self.min_prototypes_in_use:
                collapsed_heads.append(f"head {head}: entropy {entropy:.3f}, {used}/{counts.numel()} prototypes in use")
        self._reset()
        if not collapsed_heads:
            self.collapsed_checks = 0
            return
        self.collapsed_checks += 1
        logger.warning(
            f"clustering collapse [{self.name}] at {'epoch' if self.interval is None else 'iteration'} {step}: "
            f"{'; '.join(collapsed_heads)} (thresholds: entropy >= {self.min_entropy}, "
            f">= {self.min_prototypes_in_use} prototypes). Check the learning rate, the prototype freeze and the "
            "augmentations; SwAV may need a feature queue for small batches."
        )
        if self.stop_on_collapse and self.collapsed_checks >= self.patience:
            logger.warning(f"stopping the run: clustering [{self.name}] collapsed in {self.collapsed_checks} checks.")
            engine.terminate()
