"""Detection of dimensional collapse (embeddings spanning few directions) by the RankMe effective rank."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys

from custom_nets.engines.handlers.collapse import ScalarWriter
from custom_nets.metrics.embedding import effective_rank

__all__ = ["EffectiveRankMonitor", "evenly_spaced_rows"]

logger = logging.getLogger(__name__)


def evenly_spaced_rows(features: torch.Tensor, count: int | None) -> torch.Tensor:
    """At most ``count`` rows of ``features`` ``(M, d)``, evenly spaced from the first to the last (all when None)."""
    if count is None or features.shape[0] <= count:
        return features
    index = torch.linspace(0, features.shape[0] - 1, count, device=features.device).round().long()
    return features[index]


def _network_output(output: Mapping[str, Any]) -> Mapping[str, Any]:
    """The network's output dict in a ``SupervisedTrainer``'s ``engine.state.output``."""
    return output[CommonKeys.PRED]


class EffectiveRankMonitor:
    """Watch the RankMe effective rank (:func:`custom_nets.metrics.effective_rank`) of the slice embeddings of
    ``f_intra`` and of the volume features of ``f_inter`` during pretraining (arXiv 2212.01893).

    Clustering collapse (:class:`ClusterCollapseMonitor`) sees items piling on few prototypes; dimensional collapse is
    subtler: the embeddings still differ but span only a few directions. The effective rank shows it: about 1 for
    collapsed features, up to ``min(rows, d)`` for isotropic ones.

    Design: no extra forward pass. In train mode :class:`custom_nets.nets.JointSSLNet` already returns, detached,
    ``slice_embedding`` ``(B2 + S, d)`` (view 0: the 2D images, then every valid slice of the volumes) and
    ``volume_feature`` ``(B3, d)`` (view 0, before any projection head). After every iteration the monitor appends at
    most ``rows_per_iteration`` evenly spaced rows of each (float32, CPU) to a rolling buffer that keeps the last
    ``buffer_size`` rows: a batch holds only 4-6 volumes, so volume features must accumulate over iterations, and the
    cap keeps the slices of one batch's few volumes from filling the slice buffer alone. Every ``interval``
    iterations and at completion it computes each buffer's rank (float64). The rows thus come from the last few
    network states and from training forwards (augmented views, masked slice sequences, dropout on), which is cheaper
    than a probe pass and enough to see collapse; a probe set in eval mode would give the absolute RankMe figures.

    Each rank goes to ``summary_writer`` as ``effective_rank/intra`` and ``effective_rank/inter``, and
    ``{"iteration", "intra", "intra_rows", "inter", "inter_rows"}`` (a name only once its buffer holds 2 rows) to
    ``self.history`` and ``self.last``. A rank below ``max(min_rank_fraction * min(rows, d), min_rank)`` logs one
    warning per check. The threshold is relative to the largest attainable rank, ``min(rows, d)``: features of a
    random network already use many directions (RankMe well above 5 % of the maximum, although the volume features of
    an untrained ``f_inter`` are nearly parallel), while collapsed ones give about 1; since a rank is at least 1, the
    default fraction only warns from ``min(rows, d) > 20`` on. The monitor reads this process's items only and uses
    no collective, so it may run on rank 0 only.

    Bundle config (``train#rank0_handlers``)::

        {"_target_": "custom_nets.engines.handlers.EffectiveRankMonitor", "summary_writer": "@summary_writer",
         "interval": 100}

    Args:
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter`` (or anything with ``add_scalar``), optional.
        interval: check every this many iterations (and at completion).
        buffer_size: rows kept per buffer (the largest attainable rank is ``min(buffer_size, d)``).
        rows_per_iteration: rows taken from each iteration's output per buffer; None takes them all.
        min_rank_fraction: warn below this fraction of ``min(rows, d)``.
        min_rank: warn below this absolute rank as well; None: no absolute threshold.
        output_transform: maps ``engine.state.output`` to the network's output dict (default: its ``"pred"``).
    """

    FEATURE_KEYS = {"intra": "slice_embedding", "inter": "volume_feature"}
    """Name of each monitored buffer -> key of the network's output dict."""

    def __init__(
        self,
        summary_writer: ScalarWriter | None = None,
        interval: int = 100,
        buffer_size: int = 256,
        rows_per_iteration: int | None = 64,
        min_rank_fraction: float = 0.05,
        min_rank: float | None = None,
        output_transform: Callable[[Any], Mapping[str, Any]] = _network_output,
    ) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}.")
        if buffer_size < 2:
            raise ValueError(f"buffer_size must be >= 2, got {buffer_size}.")
        if rows_per_iteration is not None and rows_per_iteration < 1:
            raise ValueError(f"rows_per_iteration must be >= 1 or None, got {rows_per_iteration}.")
        if not 0.0 <= min_rank_fraction <= 1.0:
            raise ValueError(f"min_rank_fraction must be in [0, 1], got {min_rank_fraction}.")
        self.summary_writer = summary_writer
        self.interval = interval
        self.buffer_size = buffer_size
        self.rows_per_iteration = rows_per_iteration
        self.min_rank_fraction = min_rank_fraction
        self.min_rank = min_rank
        self.output_transform = output_transform
        self.history: list[dict[str, float | int]] = []
        self.last: dict[str, float | int] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        self._last_check: int | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self.check)
        engine.add_event_handler(Events.COMPLETED, self.check)

    def threshold(self, rows: int, dim: int) -> float:
        """The rank below which features of ``rows`` x ``dim`` count as collapsed."""
        return max(self.min_rank_fraction * min(rows, dim), self.min_rank or 0.0)

    def collect(self, engine: Engine) -> None:
        """Append this iteration's slice embeddings and volume features to the rolling buffers."""
        output = self.output_transform(engine.state.output)
        present = {name: output[key] for name, key in self.FEATURE_KEYS.items() if key in output}
        if not present:
            raise KeyError(
                f"the network output has none of {sorted(self.FEATURE_KEYS.values())}: EffectiveRankMonitor needs "
                "the train-mode output of custom_nets.nets.JointSSLNet (see output_transform)."
            )
        for name, features in present.items():
            rows = evenly_spaced_rows(features.detach(), self.rows_per_iteration).to("cpu", torch.float32)
            if name in self._buffers:
                rows = torch.cat([self._buffers[name], rows])
            self._buffers[name] = rows[-self.buffer_size :]

    def check(self, engine: Engine) -> None:
        """Compute, report and judge the effective rank of each buffer holding at least 2 rows."""
        iteration = engine.state.iteration
        if iteration == self._last_check:
            return
        self._last_check = iteration
        record: dict[str, float | int] = {"iteration": iteration}
        low = []
        for name, features in self._buffers.items():
            rows, dim = features.shape
            if rows < 2:
                continue
            rank = effective_rank(features)
            record[name], record[f"{name}_rows"] = rank, rows
            if self.summary_writer is not None:
                self.summary_writer.add_scalar(f"effective_rank/{name}", rank, iteration)
            threshold = self.threshold(rows, dim)
            if rank < threshold:
                low.append(f"{name} {rank:.2f} < {threshold:.2f} ({rows} rows of dimension {dim})")
        if len(record) == 1:
            return
        self.history.append(record)
        self.last = record
        if low:
            logger.warning(
                f"dimensional collapse at iteration {iteration}: effective rank {'; '.join(low)}. The embeddings span "
                "few directions; check the learning rate, the prototype freeze and the augmentations."
            )
