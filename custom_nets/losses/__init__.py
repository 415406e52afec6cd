"""Self-supervised objectives of arXiv 2212.01893: SwAV / DeepCluster-v2 clustering and masked slice prediction, and
an optional dense clustering term."""

from custom_nets.losses.clustering import ClusteringLoss, prototype_layers
from custom_nets.losses.deepcluster import DeepClusterV2Loss, spherical_kmeans
from custom_nets.losses.dense_swav import DenseSwAVLoss, match_locations
from custom_nets.losses.joint import JointLoss
from custom_nets.losses.masked_slices import MaskedSlicePredictionLoss
from custom_nets.losses.sinkhorn import sinkhorn_knopp
from custom_nets.losses.swav import SwAVLoss

__all__ = [
    "ClusteringLoss",
    "DeepClusterV2Loss",
    "DenseSwAVLoss",
    "JointLoss",
    "MaskedSlicePredictionLoss",
    "SwAVLoss",
    "match_locations",
    "prototype_layers",
    "sinkhorn_knopp",
    "spherical_kmeans",
]
