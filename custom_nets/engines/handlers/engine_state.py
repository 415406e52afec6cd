"""Put the training engine itself into the checkpoint dict, so epoch and iteration are saved and resumed."""

from __future__ import annotations

from collections.abc import MutableMapping

from ignite.engine import Engine

__all__ = ["CheckpointEngineState"]


class CheckpointEngineState:
    """Register the engine this handler is attached to under ``key`` of ``checkpoint_contents``.

    A bundle config cannot list the trainer inside the ``save_dict`` of a CheckpointSaver that is itself one of the
    trainer's handlers (a circular reference). Share one dict between MONAI's ``CheckpointSaver`` and
    ``CheckpointLoader`` and add this handler: at attach time the trainer joins the dict, so its ``epoch`` and
    ``iteration`` are written with the weights and restored on resume.
    """

    def __init__(self, checkpoint_contents: MutableMapping[str, object], key: str = "trainer") -> None:
        self.checkpoint_contents = checkpoint_contents
        self.key = key

    def attach(self, engine: Engine) -> None:
        self.checkpoint_contents[self.key] = engine
