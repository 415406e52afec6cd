"""The end of a ``torch.distributed`` run (torchrun with the bundles' ``multi_gpu_train.json``)."""

from __future__ import annotations

import gc

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["shutdown_distributed"]

DDP_STATE = ("reducer", "logger")  # the DistributedDataParallel attributes that hold the process group in C++


def shutdown_distributed(*networks: nn.Module) -> None:
    """Wait for every rank, release the ``DistributedDataParallel`` state of ``networks``, destroy the process group.

    A ``DistributedDataParallel`` module keeps a C++ reducer that holds the process group. A bundle's config parser and
    trainer keep the module alive to the end of the process, so the reducer is destroyed at interpreter exit, after
    the process group, and that can abort the process ("terminate called without an active exception", SIGABRT):
    torchrun then reports a failed run although every output was written. Measured with gloo on 2 CPU processes, one
    DDP step then ``destroy_process_group``: 9 aborts in 40 runs; with the reducer released first, as here, none in
    40 (nor in 40 runs without DDP). The module itself stays usable as a plain module through ``.module``.

    Does nothing when no process group is initialised (a single-process run).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    for network in networks:
        if isinstance(network, DistributedDataParallel):
            for name in DDP_STATE:
                if hasattr(network, name):
                    delattr(network, name)
    gc.collect()  # reducers that only reference cycles still hold
    dist.destroy_process_group()
