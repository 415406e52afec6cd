"""How well embeddings separate known classes: k-means NMI, leave-one-out kNN accuracy and a 2D projection plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import normalized_mutual_info_score

__all__ = ["embedding_separation", "knn_accuracy", "kmeans_nmi", "plot_embeddings"]


def _unit_rows(embeddings: np.ndarray) -> np.ndarray:
    embeddings = np.asarray(embeddings, dtype=np.float64)
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)


def knn_accuracy(embeddings: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Leave-one-out accuracy of a majority vote among the ``k`` most cosine-similar other items ``(M, d)``."""
    labels = np.asarray(labels)
    if len(labels) < 2:
        raise ValueError("kNN accuracy needs at least two embeddings.")
    unit = _unit_rows(embeddings)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    k = min(k, len(labels) - 1)
    neighbours = np.argsort(-similarity, axis=1)[:, :k]
    classes = np.unique(labels)
    votes = (labels[neighbours][..., None] == classes).sum(axis=1)  # (M, num_classes); ties -> lowest class
    prediction = classes[votes.argmax(axis=1)]
    return float((prediction == labels).mean())


def kmeans_nmi(embeddings: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """NMI between k-means clusters (k = number of classes, on unit-norm embeddings) and the labels."""
    labels = np.asarray(labels)
    num_classes = len(np.unique(labels))
    clusters = KMeans(n_clusters=num_classes, n_init=10, random_state=seed).fit_predict(_unit_rows(embeddings))
    return float(normalized_mutual_info_score(labels, clusters))


def embedding_separation(embeddings: np.ndarray, labels: np.ndarray, k: int = 5, seed: int = 0) -> dict[str, float]:
    """``{"nmi": ..., "knn_accuracy": ..., "count": ...}`` for embeddings ``(M, d)`` and integer labels ``(M,)``."""
    return {
        "nmi": kmeans_nmi(embeddings, labels, seed),
        "knn_accuracy": knn_accuracy(embeddings, labels, k),
        "count": int(len(labels)),
    }


def plot_embeddings(
    panels: dict[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    columns: int = 2,
    title: str = "",
    class_names: Sequence[str] | None = None,
) -> Path:
    """Save a PNG with one PCA scatter per panel ``name -> (embeddings (M, d), labels (M,))``, coloured by label, with
    a legend naming each label (``class_names[label]`` when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 4.2 * rows), squeeze=False)
    for axis in axes.flat[len(panels) :]:
        axis.set_visible(False)
    colours = plt.get_cmap("tab10")
    for axis, (name, (embeddings, labels)) in zip(axes.flat, panels.items(), strict=False):
        points = PCA(n_components=2, random_state=0).fit_transform(_unit_rows(embeddings))
        labels = np.asarray(labels)
        for label in np.unique(labels):
            chosen = labels == label
            text = class_names[int(label)] if class_names is not None else str(label)
            axis.scatter(points[chosen, 0], points[chosen, 1], color=colours(int(label) % 10), s=30, label=text)
        axis.set_title(name, fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
    legend: dict[str, object] = {}  # every label of every panel, once
    for axis in axes.flat[: len(panels)]:
        for handle, name in zip(*axis.get_legend_handles_labels(), strict=True):
            legend.setdefault(name, handle)
    figure.legend(list(legend.values()), list(legend), loc="lower center", ncol=len(legend), title="hidden class")
    if title:
        figure.suptitle(title)
    figure.tight_layout(rect=(0.0, 0.08, 1.0, 0.96 if title else 1.0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
