"""Measuring helpers shared by the benchmark scripts: synchronised wall-clock time, peak tensor memory, and counts of
the operators that launch kernels or make the host wait for the device."""

from __future__ import annotations

import statistics
import time
import traceback
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

from custom_nets.nets import deformable_attention
from custom_nets.nets.slice_sampling import slice_sampling_reference

__all__ = [
    "FusedSamplingLaunches",
    "OperatorCounter",
    "TensorMemoryTracker",
    "interleaved_seconds_per_call",
    "sampling_counted_as_on_cuda",
    "seconds_per_call",
    "timed",
]

# aten operators that allocate or read a scalar without a kernel of their own
NO_KERNEL_OPERATORS = frozenset({"empty", "empty_strided", "empty_like", "_local_scalar_dense", "lift_fresh", "set_"})
# operators whose result size or value the host needs: on a GPU each makes the host wait for the device
HOST_SYNC_OPERATORS = frozenset(
    {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_dim", "unique_consecutive"}
)


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


def interleaved_seconds_per_call(
    steps: Mapping[str, Callable[[], None]], device: torch.device, rounds: int, repeats: int, warmup: int
) -> dict[str, float]:
    """Per step: the median over ``rounds`` of :func:`seconds_per_call` (``repeats`` calls each), after ``warmup``
    calls of every step. The steps' rounds are interleaved with rotating order, so that a drift of the host's speed
    (another job, clock changes) hits every step alike and their ratio stays fair."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(seconds_per_call(steps[name], device, warmup=0, repeats=repeats))
    return {name: statistics.median(values) for name, values in seconds.items()}


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


class OperatorCounter(TorchDispatchMode):
    """Counts the aten operators run under this mode, on any device.

    * ``kernels``: the operators that launch a kernel (not views, not bare allocations): on a GPU each costs the host
      one launch, so a step whose small tensors leave the GPU idle is bound by this count;
    * ``host_syncs``: ``{(operator, call site): count}`` of the operators after which a GPU's host waits for the
      device: reading a value (``.item()``, ``bool()``, ``int()``), sizes that depend on values (``nonzero``, boolean
      mask indexing, ``masked_select``, ``unique``), and tensors made from Python data (``torch.tensor``: a
      synchronous copy to the device). The call site is the innermost frame in ``custom_nets``, after ``phase``
      when it is set. Copies of host tensors to the device are not seen on a CPU run.
    """

    def __init__(self) -> None:
        super().__init__()
        self.kernels = 0
        self.host_syncs: Counter[tuple[str, str]] = Counter()
        self.phase = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if not func.is_view and name not in NO_KERNEL_OPERATORS:
            self.kernels += 1
        boolean_index = name in ("index", "index_put", "index_put_") and any(
            _is_tensor(index) and index.dtype == torch.bool for index in (args[1] if len(args) > 1 else ()) or ()
        )
        if name in HOST_SYNC_OPERATORS or name == "lift_fresh" or boolean_index:
            site = f"{self.phase}: {_call_site()}" if self.phase else _call_site()
            self.host_syncs[(name + (" (boolean mask)" if boolean_index else ""), site)] += 1
        return func(*args, **kwargs)


def _call_site() -> str:
    frames = [frame for frame in traceback.extract_stack() if "custom_nets" in frame.filename]
    if not frames:
        return "outside custom_nets"
    frame = frames[-1]
    return f"{frame.filename.split('custom_nets')[-1].lstrip('/')}:{frame.lineno} ({frame.name})"


class FusedSamplingLaunches(torch.autograd.Function):
    """The slice sampling as a CPU count should see it: the launches of the fused Triton path that CUDA runs (one
    kernel forward; a zero fill and one kernel backward), with the values and gradients of the PyTorch reference,
    computed outside the count."""

    @staticmethod
    def forward(ctx, counter: OperatorCounter, values, sampling_parameters, slice_valid):
        with _disable_current_modes(), torch.enable_grad():
            inputs = [tensor.detach().requires_grad_() for tensor in (values, sampling_parameters)]
            output = slice_sampling_reference(inputs[0], *inputs[1].unbind(2), slice_valid)
        counter.kernels += 1
        ctx.counter = counter
        ctx.save_for_backward(*inputs, output)
        return output.detach()

    @staticmethod
    def backward(ctx, grad_output):
        *inputs, output = ctx.saved_tensors
        with _disable_current_modes():
            gradients = torch.autograd.grad(output, inputs, grad_output)
        ctx.counter.kernels += 2
        return None, *gradients, None


@contextmanager
def sampling_counted_as_on_cuda(counter: OperatorCounter) -> Iterator[None]:
    """Within this block, every :class:`custom_nets.nets.DeformableSliceAttention` samples through
    :class:`FusedSamplingLaunches`, so ``counter`` sees the launches of the CUDA path on any device."""
    original = deformable_attention.deformable_slice_sampling

    def fused_sampling(values, sampling_parameters, slice_valid=None, backend="auto"):
        return FusedSamplingLaunches.apply(counter, values, sampling_parameters, slice_valid)

    deformable_attention.deformable_slice_sampling = fused_sampling
    try:
        yield
    finally:
        deformable_attention.deformable_slice_sampling = original
