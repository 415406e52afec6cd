"""Ignite / MONAI handlers of the self-supervised objectives: prototype upkeep, k-means, collapse monitoring."""

from custom_nets.engines.handlers.collapse import ClusterCollapseMonitor, assignment_statistics
from custom_nets.engines.handlers.kmeans import DeepClusterKMeansHandler
from custom_nets.engines.handlers.prototypes import PrototypeHandler

__all__ = ["ClusterCollapseMonitor", "DeepClusterKMeansHandler", "PrototypeHandler", "assignment_statistics"]
