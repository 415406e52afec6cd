"""MONAI engine pieces for joint image-volume pretraining: batch preparation, embedding inference, checkpoints,
mixed precision, the optimiser."""

from custom_nets.engines.amp import autocast_dtype
from custom_nets.engines.checkpoints import AtomicCheckpointSaver, AtomicDiskSaver, atomic_torch_save, latest_checkpoint
from custom_nets.engines.distributed import shutdown_distributed
from custom_nets.engines.embedding import EmbeddingInferer, EmbeddingPrepareBatch
from custom_nets.engines.optimizers import build_sgd
from custom_nets.engines.prepare_batch import JointItemIds, JointPrepareBatch, plain_prepare_batch

__all__ = [
    "AtomicCheckpointSaver",
    "AtomicDiskSaver",
    "EmbeddingInferer",
    "EmbeddingPrepareBatch",
    "JointItemIds",
    "JointPrepareBatch",
    "atomic_torch_save",
    "autocast_dtype",
    "build_sgd",
    "latest_checkpoint",
    "plain_prepare_batch",
    "shutdown_distributed",
]
