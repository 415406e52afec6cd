"""Tell a batch sampler which epoch starts, so every epoch (and every rank) gets its own deterministic order."""

from __future__ import annotations

from ignite.engine import Engine, Events

__all__ = ["SamplerEpochHandler"]


class SamplerEpochHandler:
    """Call ``sampler.set_epoch(epoch)`` at each epoch start (ignite epochs are 1-based; the sampler gets 0-based).

    MONAI's workflows only do this for a ``DistributedSampler`` passed as ``sampler``; a ``batch_sampler`` such as
    :class:`custom_nets.data.JointBatchSampler` needs this handler, also when resuming mid-run.
    """

    def __init__(self, sampler: object) -> None:
        if not hasattr(sampler, "set_epoch"):
            raise TypeError(f"{type(sampler).__name__} has no set_epoch method.")
        self.sampler = sampler

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.sampler.set_epoch(engine.state.epoch - 1)
