"""MONAI engine pieces for joint image-volume pretraining: batch preparation, embedding inference, checkpoints."""

from custom_nets.engines.checkpoints import AtomicCheckpointSaver, AtomicDiskSaver, atomic_torch_save, latest_checkpoint
from custom_nets.engines.embedding import EmbeddingInferer, EmbeddingPrepareBatch
from custom_nets.engines.prepare_batch import JointItemIds, JointPrepareBatch

__all__ = [
    "AtomicCheckpointSaver",
    "AtomicDiskSaver",
    "EmbeddingInferer",
    "EmbeddingPrepareBatch",
    "JointItemIds",
    "JointPrepareBatch",
    "atomic_torch_save",
    "latest_checkpoint",
]
