"""Measuring helpers shared by the benchmark scripts: synchronised wall-clock time and peak tensor memory."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["TensorMemoryTracker", "seconds_per_call", "timed"]


def timed(run: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``run``, synchronised before and after on CUDA so queued kernels are counted."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def seconds_per_call(step: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Mean seconds per call of ``step`` over ``repeats`` back-to-back calls after ``warmup`` calls (CUDA
    synchronised before and after the timed calls only, so queued kernels overlap as in training)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


class TensorMemoryTracker(TorchDispatchMode):
    """Live and peak bytes of the tensor storages that ops create under this mode (forward, backward, recompute).

    An op's output counts when its storage is new: not the storage of one of the op's inputs (views such as
    ``detach`` or ``t`` of a weight, in-place results) and not already tracked. It stops counting when the storage is
    freed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._finalizers: dict[int, weakref.finalize] = {}

    def _released(self, address: int, nbytes: int) -> None:
        self.live_bytes -= nbytes
        self._finalizers.pop(address, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        inputs = {leaf.untyped_storage().data_ptr() for leaf in tree_leaves((args, kwargs)) if _is_tensor(leaf)}
        for leaf in tree_leaves(output):
            if not _is_tensor(leaf):
                continue
            storage = leaf.untyped_storage()
            address = storage.data_ptr()
            if address == 0 or address in inputs or address in self._finalizers:
                continue
            self.live_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            self._finalizers[address] = weakref.finalize(storage, self._released, address, storage.nbytes())
        return output


def _is_tensor(value: object) -> bool:
    return isinstance(value, torch.Tensor)
