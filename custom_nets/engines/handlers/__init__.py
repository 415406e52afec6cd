"""Ignite / MONAI handlers: prototype upkeep, k-means, collapse and effective-rank monitoring, gradients, loss terms,
embeddings, detection boxes."""

from custom_nets.engines.handlers.collapse import ClusterCollapseMonitor, assignment_statistics
from custom_nets.engines.handlers.detection_writer import DetectionWriter
from custom_nets.engines.handlers.effective_rank import EffectiveRankMonitor
from custom_nets.engines.handlers.embedding_writer import EmbeddingWriter
from custom_nets.engines.handlers.engine_state import CheckpointEngineState
from custom_nets.engines.handlers.gradients import GradientControl, ratio_from_norms
from custom_nets.engines.handlers.kmeans import DeepClusterKMeansHandler
from custom_nets.engines.handlers.loss_terms import LossTermsHandler
from custom_nets.engines.handlers.nan_guard import NAN_POLICIES, NonFiniteLossGuard
from custom_nets.engines.handlers.prototypes import PrototypeHandler
from custom_nets.engines.handlers.random_state import RandomStateCheckpoint, random_transforms
from custom_nets.engines.handlers.sampler_epoch import SamplerEpochHandler

__all__ = [
    "NAN_POLICIES",
    "CheckpointEngineState",
    "ClusterCollapseMonitor",
    "DeepClusterKMeansHandler",
    "DetectionWriter",
    "EffectiveRankMonitor",
    "EmbeddingWriter",
    "GradientControl",
    "LossTermsHandler",
    "NonFiniteLossGuard",
    "PrototypeHandler",
    "RandomStateCheckpoint",
    "SamplerEpochHandler",
    "assignment_statistics",
    "random_transforms",
    "ratio_from_norms",
]
