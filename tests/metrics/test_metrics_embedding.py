"""Embedding separation measures of the demo report (kNN accuracy, k-means NMI, the PCA plot) and the effective rank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from custom_nets.metrics.embedding import (
    effective_rank,
    embedding_separation,
    kmeans_nmi,
    knn_accuracy,
    linear_probe_accuracy,
    plot_effective_rank,
    plot_embeddings,
)


def two_directions(per_class: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Class 0 near the x axis, class 1 near the y axis (cosine geometry), with small spread."""
    rng = np.random.default_rng(0)
    first = np.array([1.0, 0.0, 0.0]) + 0.05 * rng.standard_normal((per_class, 3))
    second = np.array([0.0, 1.0, 0.0]) + 0.05 * rng.standard_normal((per_class, 3))
    return np.concatenate([first, second]), np.array([0] * per_class + [1] * per_class)


def test_separated_classes_score_one() -> None:
    embeddings, labels = two_directions()
    assert knn_accuracy(embeddings, labels, k=3) == 1.0
    assert kmeans_nmi(embeddings, labels) == pytest.approx(1.0)
    # cosine: scaling a row changes nothing
    scaled = embeddings * np.arange(1, 9)[:, None]
    scores = embedding_separation(scaled, labels, k=3)
    assert scores["nmi"] == pytest.approx(1.0) and scores["knn_accuracy"] == 1.0 and scores["count"] == 8
    assert scores["linear_probe_accuracy"] == 1.0
    assert 1.0 <= scores["effective_rank"] <= 3.0


def test_linear_probe_separates_linear_classes_and_not_shuffled_ones() -> None:
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((60, 5))
    labels = (embeddings[:, 0] + 0.5 * embeddings[:, 1] > 0).astype(int)  # a linear boundary
    assert linear_probe_accuracy(embeddings, labels) >= 0.9
    shuffled = rng.permutation(labels)
    assert linear_probe_accuracy(embeddings, shuffled) <= 0.75  # no boundary to find: near chance
    with pytest.raises(ValueError, match="two items of every class"):
        linear_probe_accuracy(embeddings[:3], np.array([0, 0, 1]))


def test_knn_accuracy_by_hand() -> None:
    # points on a line of angles; the single nearest other point decides
    angles = np.array([0.0, 0.1, 0.25, 1.0, 1.1, 1.5])
    embeddings = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    labels = np.array([0, 0, 1, 1, 1, 0])
    # nearest others: 0->1 (ok), 1->0 (ok), 2->1 (0 for 1: wrong), 3->4 (ok), 4->3 (ok), 5->4 (1 for 0: wrong)
    assert knn_accuracy(embeddings, labels, k=1) == pytest.approx(4 / 6)


def test_knn_needs_two_items() -> None:
    with pytest.raises(ValueError, match="at least two"):
        knn_accuracy(np.ones((1, 3)), np.array([0]))


def test_plot_writes_a_png_with_one_panel_per_entry(tmp_path: Path) -> None:
    embeddings, labels = two_directions()
    path = plot_embeddings(
        {"random": (embeddings, labels), "pretrained": (embeddings[::-1], labels[::-1]), "third": (embeddings, labels)},
        tmp_path / "plots" / "embeddings.png",
        title="demo",
        class_names=("head", "limb"),
    )
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 0


def test_effective_rank_of_collapsed_features_is_one() -> None:
    direction = np.random.default_rng(0).standard_normal(16)
    features = np.linspace(-3.0, 5.0, 40)[:, None] * direction  # every row a multiple of one vector
    assert effective_rank(features) == pytest.approx(1.0, abs=1e-3)
    assert effective_rank(torch.from_numpy(features).float()) == pytest.approx(1.0, abs=1e-3)


def test_effective_rank_of_isotropic_features_is_the_dimension() -> None:
    orthogonal, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((12, 12)))
    assert effective_rank(orthogonal) == pytest.approx(12.0, rel=1e-4)
    assert effective_rank(5.0 * torch.eye(8)) == pytest.approx(8.0, rel=1e-4)


def test_effective_rank_of_gaussian_features_is_close_to_the_dimension() -> None:
    d = 32
    features = torch.randn(10 * d, d, generator=torch.Generator().manual_seed(2))
    assert 0.8 * d < effective_rank(features) <= d


def test_effective_rank_by_hand() -> None:
    p = np.array([0.75, 0.25])  # singular values 3 and 1
    assert effective_rank(np.diag([3.0, 1.0])) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-5)
    assert effective_rank(np.zeros((4, 3))) == 0.0


def test_effective_rank_centering_removes_a_shared_offset() -> None:
    rows = np.concatenate([np.eye(4), -np.eye(4)])  # isotropic around the origin
    shifted = rows + np.array([100.0, 0.0, 0.0, 0.0])
    assert effective_rank(shifted) < 2.0  # dominated by the shared offset, as RankMe measures it
    assert effective_rank(shifted, center=True) == pytest.approx(4.0, rel=1e-4)


@pytest.mark.parametrize(
    "features, message",
    [(np.ones(5), "shape"), (np.ones((2, 3, 4)), "shape"), (np.ones((4, 0)), "shape"), (np.ones((1, 3)), "2 rows")],
)
def test_effective_rank_rejects_bad_shapes(features: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        effective_rank(features)


def test_effective_rank_rejects_non_finite_values() -> None:
    features = np.ones((4, 3))
    features[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        effective_rank(features)


def test_effective_rank_plot_skips_missing_names(tmp_path: Path) -> None:
    history = [{"iteration": 16, "intra": 20.0}, {"iteration": 32, "intra": 18.5, "inter": 9.0}]
    path = plot_effective_rank(history, tmp_path / "rank.png")
    with Image.open(path) as image:
        assert image.size[0] > 200
