"""What a training step does with a NaN or infinite loss: skip the optimiser step, or stop the run with a message."""

from __future__ import annotations

import logging

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

__all__ = ["NAN_POLICIES", "NonFiniteLossGuard"]

NAN_POLICIES = ("stop", "skip")

logger = logging.getLogger(__name__)


def _non_finite_anywhere(loss: torch.Tensor) -> bool:
    """True when ``loss`` is NaN/inf here or, under ``torch.distributed``, on any process: DDP averages the gradients,
    so one process's bad loss spoils every process's step and all must act alike (one small all-reduce a step)."""
    bad = torch.tensor(0.0 if bool(torch.isfinite(loss).all()) else 1.0, device=loss.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bool(bad.item() > 0)


class NonFiniteLossGuard:
    """Ignite handler on ``IterationEvents.BACKWARD_COMPLETED`` of a MONAI trainer, before the optimiser step.

    When the loss is NaN or infinite:

    * ``policy="stop"``: raise ``FloatingPointError`` naming the iteration, so no update is applied; checkpoints
      written before stay as they are (and the saver's final checkpoint holds the last finite weights).
    * ``policy="skip"``: the step is not applied. Without AMP every gradient is dropped (``grad = None``: PyTorch
      optimisers skip such parameters, momentum and weight decay included); with an AMP ``GradScaler`` the gradients
      are set to NaN so that ``scaler.step`` skips the step and ``scaler.update`` lowers the scale, as for an
      overflow. The learning-rate schedule still advances. Each skip is logged; ``max_consecutive_skips`` in a row
      stop the run (the model no longer recovers); the skipped iterations are listed at the end (``self.skipped``).

    Attach it before handlers that read gradients on the same event (e.g. ``GradientControl``), on every process of
    a distributed run: the decision is shared (a bad loss on one process skips or stops the step everywhere). State
    fed by the forward pass (feature queues, batch-norm statistics) is not rolled back.

    Args:
        policy: ``"stop"`` or ``"skip"``.
        max_consecutive_skips: consecutive non-finite losses that stop a ``"skip"`` run.
    """

    def __init__(self, policy: str = "stop", max_consecutive_skips: int = 10) -> None:
        if policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {policy!r}.")
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}.")
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped: list[int] = []
        self._consecutive = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._report)

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        loss = engine.state.output["loss"]
        if not _non_finite_anywhere(loss):
            self._consecutive = 0
            return
        where = f"iteration {engine.state.iteration} (epoch {engine.state.epoch})"
        advice = (
            "Lower the learning rate, check the input intensities (python -m custom_nets.cli validate_data), enable "
            "gradient clipping, or resume from the last checkpoint"
        )
        if self.policy == "stop":
            raise FloatingPointError(
                f"non-finite loss {float(loss.detach().float().mean())} at {where}; nan_policy 'stop' ended the run "
                f"before this step was applied. {advice} (nan_policy 'skip' skips such steps)."
            )
        self._consecutive += 1
        if self._consecutive >= self.max_consecutive_skips:
            raise FloatingPointError(
                f"{self._consecutive} non-finite losses in a row up to {where}: the run does not recover. {advice}."
            )
        self.skipped.append(engine.state.iteration)
        scaler = getattr(engine, "scaler", None) if getattr(engine, "amp", False) else None
        for group in engine.optimizer.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                if scaler is not None:
                    parameter.grad.fill_(float("nan"))
                else:
                    parameter.grad = None
        logger.warning("non-finite loss at %s: optimiser step skipped (nan_policy 'skip')", where)

    def _report(self, engine: Engine) -> None:
        if self.skipped:
            logger.warning(
                "%d optimiser step(s) skipped for a non-finite loss, at iterations %s",
                len(self.skipped),
                self.skipped,
            )
