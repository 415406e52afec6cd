"""Expose the terms of a multi-term loss as per-epoch metrics, so StatsHandler and TensorBoard log them."""

from __future__ import annotations

from collections import defaultdict

from ignite.engine import Engine, Events

__all__ = ["LossTermsHandler"]


class LossTermsHandler:
    """Average ``loss.terms`` (a dict of scalar tensors refreshed at every call of the loss) over each epoch.

    At every iteration the current terms are copied into ``engine.state.output["loss_terms"]`` (floats); at epoch end
    their means go to ``engine.state.metrics`` as ``loss_<term>``, where MONAI's StatsHandler and
    TensorBoardStatsHandler pick them up, and to ``history`` (one dict per epoch).

    Args:
        loss: any module with a ``terms`` attribute, e.g. :class:`custom_nets.losses.JointLoss`.
        prefix: metric name prefix.
    """

    def __init__(self, loss: object, prefix: str = "loss_") -> None:
        self.loss = loss
        self.prefix = prefix
        self._sums: dict[str, float] = defaultdict(float)
        self._count = 0
        self.history: list[dict[str, float]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.publish)

    def reset(self, engine: Engine) -> None:
        self._sums.clear()
        self._count = 0

    def accumulate(self, engine: Engine) -> None:
        terms = {name: float(value) for name, value in getattr(self.loss, "terms", {}).items()}
        if isinstance(engine.state.output, dict):
            engine.state.output["loss_terms"] = terms
        for name, value in terms.items():
            self._sums[name] += value
        self._count += 1

    def publish(self, engine: Engine) -> None:
        means = {name: total / max(self._count, 1) for name, total in self._sums.items()}
        for name, value in means.items():
            engine.state.metrics[f"{self.prefix}{name}"] = value
        self.history.append({"epoch": engine.state.epoch, **means})
