"""DeepCluster-v2: spherical k-means, memory bank keyed by global ids, loss against a hand-written reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from custom_nets.losses import DeepClusterV2Loss, spherical_kmeans


def _blobs(num_clusters: int, per_cluster: int, dim: int = 16, noise: float = 0.05, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_clusters, dim, generator=generator), dim=1)
    labels = torch.arange(num_clusters).repeat_interleave(per_cluster)
    points = F.normalize(centres[labels] + noise * torch.randn(len(labels), dim, generator=generator), dim=1)
    return points, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_planted_clusters(seed):
    points, labels = _blobs(num_clusters=6, per_cluster=40, seed=seed)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    centroids, assignments = spherical_kmeans(points[order], 6, iterations=10, seed=seed, chunk_size=50)
    assert normalized_mutual_info_score(labels[order].numpy(), assignments.numpy()) >= 0.95
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(assignments, (points[order] @ centroids.t()).argmax(dim=1))


def test_kmeans_is_deterministic_and_validates_inputs():
    points, _ = _blobs(4, 10)
    first = spherical_kmeans(points, 4, seed=3, init="random")
    second = spherical_kmeans(points, 4, seed=3, init="random")
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    with pytest.raises(ValueError, match="fewer prototypes"):
        spherical_kmeans(points, 41)
    with pytest.raises(ValueError, match="init"):
        spherical_kmeans(points, 4, init="farthest")


def _scores(projections, layers):
    return [[p @ layer.weight.t() for p in projections] for layer in layers]


def test_loss_matches_hand_written_reference():
    generator = torch.Generator().manual_seed(0)
    loss_fn = DeepClusterV2Loss(num_items=30, embedding_dim=8, num_heads=2, temperature=0.1)
    loss_fn.assignments.copy_(torch.randint(0, 5, (2, 30), generator=generator))
    loss_fn.assignments[0, 7] = -1  # an item without cluster is ignored
    index = torch.tensor([7, 3, 29, 11, 0, 18])
    projections = [F.normalize(torch.randn(m, 8, generator=generator), dim=1) for m in (6, 6, 2)]
    weights = [torch.randn(5, 8, generator=generator) for _ in range(2)]
    scores = [[p @ w.t() for p in projections] for w in weights]

    head_losses = []
    for head in range(2):
        terms = []
        for view_scores in scores[head]:
            for item in range(view_scores.shape[0]):
                target = int(loss_fn.assignments[head, index[item]])
                if target >= 0:
                    log_p = torch.log_softmax(view_scores[item] / 0.1, dim=0)
                    terms.append(-log_p[target])
        head_losses.append(sum(terms) / len(terms))
    expected = sum(head_losses) / 2
    torch.testing.assert_close(loss_fn(projections, scores, index), expected, atol=1e-5, rtol=1e-5)


def test_empty_bank_gives_zero_loss_with_a_graph_and_first_update_is_skipped():
    layers = nn.ModuleList([nn.Linear(8, 3, bias=False) for _ in range(2)])
    loss_fn = DeepClusterV2Loss(num_items=10, embedding_dim=8, num_heads=2)
    before = [layer.weight.detach().clone() for layer in layers]
    assert loss_fn.update_clusters(layers) == []
    projections = [F.normalize(torch.randn(4, 8), dim=1) for _ in range(2)]
    loss = loss_fn(projections, _scores(projections, layers), torch.arange(4))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    for layer, weight in zip(layers, before, strict=True):
        assert torch.equal(layer.weight.grad, torch.zeros_like(weight)) and torch.equal(layer.weight, weight)
    assert bool(loss_fn.bank_fresh[:4].all()) and not bool(loss_fn.bank_fresh[4:].any())


def test_update_clusters_writes_prototypes_and_targets_and_survives_state_dict():
    points, labels = _blobs(num_clusters=3, per_cluster=8, dim=8)
    layers = nn.ModuleList([nn.Linear(8, 3, bias=False) for _ in range(3)])
    loss_fn = DeepClusterV2Loss(num_items=30, embedding_dim=8, num_heads=3)
    ids = torch.arange(24) + 3  # ids 0-2 and 27-29 are never seen
    with torch.no_grad():
        loss_fn([points, points], _scores([points, points], layers), ids)
    centroids = loss_fn.update_clusters(layers, seed=5)
    assert len(centroids) == 3
    for head, layer in enumerate(layers):
        torch.testing.assert_close(layer.weight, centroids[head])
        targets = loss_fn.assignments[head, ids]
        assert normalized_mutual_info_score(labels.numpy(), targets.numpy()) >= 0.95
    assert (loss_fn.assignments[:, :3] == -1).all() and (loss_fn.assignments[:, 27:] == -1).all()
    assert not bool(loss_fn.bank_fresh.any()) and int(loss_fn.bank_valid.sum()) == 24

    restored = DeepClusterV2Loss(num_items=30, embedding_dim=8, num_heads=3)
    restored.load_state_dict(loss_fn.state_dict())
    assert torch.equal(restored.assignments, loss_fn.assignments) and torch.equal(restored.bank, loss_fn.bank)

    projections = [points[:5], points[:5]]
    loss = loss_fn(projections, _scores(projections, layers), ids[:5])
    # prototypes are the centroids and targets the nearest centroid: the loss is below chance level log K
    assert 0.0 < float(loss.detach()) < math.log(3)


class _PlantedDataset(Dataset):
    """Items of one dataset: each local index ``j`` lies near ``centres[j % 2]``."""

    def __init__(self, centres: torch.Tensor, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(size) % 2
        self.points = F.normalize(
            centres[self.labels] + 0.05 * torch.randn(size, centres.shape[1], generator=generator)
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, local_index: int):
        return self.points[local_index], local_index


class _GlobalIndex(Dataset):
    """Pairs each item of a (concatenated) dataset with its global position, as the project's datalists do."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        point, local_index = self.dataset[index]
        return point, local_index, index


def test_concatenated_datasets_keep_distinct_assignments():
    """Regression test for the public code, which keyed the bank by per-dataset local index."""
    centres = torch.eye(8)[:4]
    first, second = _PlantedDataset(centres[:2], 12, seed=0), _PlantedDataset(centres[2:], 12, seed=1)
    concatenated = ConcatDataset([first, second])
    planted = torch.cat([first.labels, second.labels + 2])
    layers = nn.ModuleList([nn.Linear(8, 4, bias=False)])
    loss_fn = DeepClusterV2Loss(num_items=len(concatenated), embedding_dim=8, num_heads=1)
    loader = DataLoader(_GlobalIndex(concatenated), batch_size=5, shuffle=True, generator=torch.Generator())
    with torch.no_grad():
        for points, local_index, global_index in loader:
            assert local_index.max() < 12  # local ids collide between the two datasets
            loss_fn([points, points], _scores([points, points], layers), global_index)
    loss_fn.update_clusters(layers, seed=0)

    assignments = loss_fn.assignments[0]
    assert (assignments >= 0).all()
    assert normalized_mutual_info_score(planted.numpy(), assignments.numpy()) >= 0.95
    assert set(assignments[:12].tolist()).isdisjoint(assignments[12:].tolist())


def test_invalid_ids_and_shapes_are_rejected():
    loss_fn = DeepClusterV2Loss(num_items=5, embedding_dim=4, num_heads=1)
    projections = [F.normalize(torch.randn(3, 4), dim=1) for _ in range(2)]
    scores = [[p @ torch.randn(4, 2) for p in projections]]
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\), got \[0, 5\]"):
        loss_fn(projections, scores, torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match=r"got \[-1, 2\]"):
        loss_fn(projections, scores, torch.tensor([2, -1, 1]))
    with pytest.raises(ValueError, match="global item ids"):
        loss_fn(projections, scores, None)
    with pytest.raises(ValueError, match="global item ids"):
        loss_fn(projections, scores, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_heads"):
        loss_fn(projections, scores * 2, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="embedding_dim"):
        DeepClusterV2Loss(num_items=5, embedding_dim=6, num_heads=1)(projections, scores, torch.tensor([0, 1, 2]))
