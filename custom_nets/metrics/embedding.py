"""How well embeddings separate known classes (k-means NMI, leave-one-out kNN accuracy, a 2D projection plot) and how
many dimensions they use (RankMe effective rank)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import normalized_mutual_info_score

from custom_nets.metrics.figures import pyplot, save_figure

__all__ = [
    "effective_rank",
    "embedding_separation",
    "knn_accuracy",
    "kmeans_nmi",
    "linear_probe_accuracy",
    "plot_effective_rank",
    "plot_embeddings",
]


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


def linear_probe_accuracy(embeddings: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Mean held-out accuracy of an L2-regularised logistic regression on frozen embeddings ``(M, d)``.

    Stratified ``folds``-fold cross-validation (fewer folds when the smallest class has fewer items); the features are
    standardised inside each training fold. The linear probe is the usual readout of self-supervised features beside
    kNN: it asks whether the classes are linearly separable, not whether neighbours agree.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    smallest = int(np.unique(labels, return_counts=True)[1].min())
    if smallest < 2:
        raise ValueError("the linear probe needs at least two items of every class.")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    splits = StratifiedKFold(n_splits=min(folds, smallest), shuffle=True, random_state=seed)
    return float(cross_val_score(probe, np.asarray(embeddings, dtype=np.float64), labels, cv=splits).mean())


def embedding_separation(embeddings: np.ndarray, labels: np.ndarray, k: int = 5, seed: int = 0) -> dict[str, float]:
    """``{"nmi", "knn_accuracy", "linear_probe_accuracy", "effective_rank", "count"}`` for embeddings ``(M, d)`` and
    integer labels ``(M,)``; the effective rank is that of the centred embeddings (how many directions the items
    differ along, see :func:`effective_rank`)."""
    return {
        "nmi": kmeans_nmi(embeddings, labels, seed),
        "knn_accuracy": knn_accuracy(embeddings, labels, k),
        "linear_probe_accuracy": linear_probe_accuracy(embeddings, labels, seed=seed),
        "effective_rank": effective_rank(embeddings, center=True),
        "count": int(len(labels)),
    }


def effective_rank(features: torch.Tensor | np.ndarray, eps: float = 1e-7, center: bool = False) -> float:
    """RankMe effective rank (Garrido et al., ICML 2023) of features ``(n, d)``, computed in float64.

    With ``s`` the singular values of the feature matrix and ``p_k = s_k / sum(s) + eps``, the rank is
    ``exp(-sum_k p_k log p_k)``: 1 when every row lies on one line (total collapse), ``min(n, d)`` when the singular
    values are equal (isotropic features), 0 for an all-zero matrix. Dimensional collapse shows as a falling rank.

    As in RankMe the raw matrix is used, not centred (``center=False``): a direction shared by every row counts as one
    used dimension, and ranks stay comparable with the published ones. ``center=True`` subtracts the column means first,
    measuring only how the rows differ (for features that share a large constant offset).

    Raises:
        ValueError: for an input that is not 2D, has fewer than 2 rows or no column, or holds NaN/inf.
    """
    matrix = torch.as_tensor(features).detach().to(device="cpu", dtype=torch.float64)
    if matrix.ndim != 2 or matrix.shape[1] < 1:
        raise ValueError(f"effective_rank expects features (n, d) with d >= 1, got shape {tuple(matrix.shape)}.")
    if matrix.shape[0] < 2:
        raise ValueError(f"effective_rank needs at least 2 rows, got {matrix.shape[0]}.")
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError("effective_rank: the features hold NaN or inf values.")
    if center:
        matrix = matrix - matrix.mean(dim=0, keepdim=True)
    singular_values = torch.linalg.svdvals(matrix)
    total = singular_values.sum()
    if total == 0:
        return 0.0
    p = singular_values / total + eps
    return float(torch.exp(-(p * p.log()).sum()))


def plot_embeddings(
    panels: dict[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    columns: int = 2,
    title: str = "",
    class_names: Sequence[str] | None = None,
) -> Path:
    """Save a PNG with one PCA scatter per panel ``name -> (embeddings (M, d), labels (M,))``, coloured by label, with
    a legend naming each label (``class_names[label]`` when given)."""
    plt = pyplot()

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
    return save_figure(figure, path)


def plot_effective_rank(
    history: Sequence[dict], path: str | Path, names: Sequence[str] = ("intra", "inter"), title: str = ""
) -> Path:
    """PNG of effective ranks against training iteration from records ``{"iteration", <name>: rank, ...}`` (the
    history of :class:`custom_nets.engines.handlers.EffectiveRankMonitor`); a name missing from a record is skipped."""
    plt = pyplot()

    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for name in names:
        points = [(record["iteration"], record[name]) for record in history if name in record]
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", label=name)
    axis.set_xlabel("training iteration")
    axis.set_ylabel("effective rank (RankMe)")
    axis.grid(alpha=0.3)
    axis.legend()
    if title:
        axis.set_title(title, fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)
