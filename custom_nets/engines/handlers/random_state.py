"""Random number generator states as a checkpoint entry, so that a resumed run draws what an uninterrupted one would."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable, Transform
from torch.utils.data import ConcatDataset, DataLoader, Dataset

__all__ = ["RandomStateCheckpoint", "random_transforms"]


def random_transforms(root: Any) -> list[Randomizable]:
    """Every MONAI ``Randomizable`` reachable from ``root`` (a DataLoader, a Dataset, a transform), in a fixed order.

    Walks datasets (``transform``, the parts of a ``ConcatDataset``), transforms and their attributes (sub-transforms
    such as the views of a multi-view transform or the ``RandAffine`` inside ``RandAffined``), lists and dicts.
    """
    found: list[Randomizable] = []
    seen: set[int] = set()

    def children(node: Any) -> Iterable[Any]:
        if isinstance(node, DataLoader):
            return [node.dataset]
        if isinstance(node, ConcatDataset):
            return node.datasets
        if isinstance(node, Dataset):
            return [getattr(node, "transform", None)]
        if isinstance(node, (list, tuple)):
            return node
        if isinstance(node, dict):
            return node.values()
        if isinstance(node, (Transform, Randomizable)):
            return vars(node).values()
        return []

    def visit(node: Any) -> None:
        if node is None or id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, Randomizable):
            found.append(node)
        for child in children(node):
            if isinstance(child, (DataLoader, Dataset, list, tuple, dict, Transform, Randomizable)):
                visit(child)

    visit(root)
    return found


def _numpy_state(state: tuple) -> dict[str, Any]:
    """``np.random.RandomState.get_state()`` as a tensor and numbers, loadable by ``torch.load(weights_only=True)``."""
    kind, keys, position, has_gauss, cached_gaussian = state
    return {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "position": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _numpy_tuple(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return state["kind"], keys, state["position"], state["has_gauss"], state["cached_gaussian"]


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


class RandomStateCheckpoint:
    """Checkpoint entry (``state_dict`` / ``load_state_dict``) holding every random state a training step draws from.

    Saved: the global torch (and CUDA), NumPy and Python generators, the ``torch.Generator`` of the DataLoader (the
    base seed of its worker processes), and the ``R`` state of every MONAI random transform of the training data
    (:func:`random_transforms`). Put it in the ``save_dict`` of the checkpoint saver and the ``load_dict`` of the
    loader: ``CheckpointLoader`` restores it at ``Events.STARTED``, before the first data of the resumed epoch is
    drawn, so the resumed run sees the batches, crops and augmentations of the uninterrupted one.

    Exact with ``num_workers=0``. With worker processes the transforms draw from copies inside the workers (seeded per
    epoch from the loader's generator, or once for ``persistent_workers``), which the main process cannot read: the
    augmentations of a resumed run then differ (the data order does not). Under ``torch.distributed`` with more than
    one process nothing is saved or restored: only rank 0 writes checkpoints, and its states loaded on every rank would
    give all ranks the same augmentations.

    Args:
        dataloader: the training DataLoader (its dataset's transforms and its generator).
    """

    def __init__(self, dataloader: DataLoader) -> None:
        self.dataloader = dataloader

    def state_dict(self) -> dict[str, Any]:
        if _distributed():
            return {"distributed": True}
        generator = getattr(self.dataloader, "generator", None)
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_state(np.random.get_state()),
            "python": random.getstate(),
            "loader_generator": generator.get_state() if generator is not None else None,
            "transforms": [_numpy_state(t.R.get_state()) for t in random_transforms(self.dataloader)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if _distributed() or state.get("distributed", False):
            return
        transforms = random_transforms(self.dataloader)
        if len(transforms) != len(state["transforms"]):
            raise ValueError(
                f"the checkpoint holds {len(state['transforms'])} random transform states but the training data has "
                f"{len(transforms)}: resume with the settings of the interrupted run (same preset and overrides)."
            )
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        np.random.set_state(_numpy_tuple(state["numpy"]))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        generator = getattr(self.dataloader, "generator", None)
        if generator is not None and state["loader_generator"] is not None:
            generator.set_state(state["loader_generator"])
        for transform, transform_state in zip(transforms, state["transforms"], strict=True):
            transform.R.set_state(_numpy_tuple(transform_state))
