"""Embedding separation measures of the demo report: kNN accuracy, k-means NMI and the PCA plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from custom_nets.metrics.embedding import embedding_separation, kmeans_nmi, knn_accuracy, plot_embeddings


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
    assert embedding_separation(scaled, labels, k=3) == {"nmi": pytest.approx(1.0), "knn_accuracy": 1.0, "count": 8}


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
