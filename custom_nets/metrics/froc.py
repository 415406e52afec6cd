"""LUNA16 FROC and CPM for nodule false-positive reduction (arXiv 2212.01893, METHOD.md section 4).

Matching follows the LUNA16 evaluation script (``noduleCADEvaluationLUNA16.py``): a candidate hits a nodule when its
world position is strictly closer than the nodule's radius (``diameter_mm / 2``) to the nodule centre; a nodule counts
once, with the highest probability among its hits; the other hits are neither true nor false positives; a candidate
that hits no nodule but an excluded finding (``annotations_excluded.csv``, where a negative diameter means 10 mm) is
ignored; every other candidate is a false positive. The FROC curve (sensitivity against false positives per scan, over
every probability threshold) gives the same points as MONAI's :func:`monai.metrics.froc.compute_froc_curve_data`, from
sorted counts (MONAI's helper is quadratic in the candidates); the CPM is the mean
sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 false positives per scan, linearly interpolated between the curve's
operating points (:func:`monai.metrics.froc.compute_froc_score`). The confidence interval resamples scans with
replacement (bootstrap); the AUC is the candidate-level ROC AUC (MONAI's ``compute_roc_auc``) over the scored
candidates that are not ignored.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_roc_auc
from monai.metrics.froc import compute_froc_score

from custom_nets.atomic_files import atomic_path, atomic_write_json
from custom_nets.metrics.figures import pyplot, save_figure

__all__ = [
    "LUNA16_FP_RATES",
    "CandidateMatches",
    "froc_curve",
    "luna16_froc",
    "match_candidates",
    "read_findings",
    "save_froc_figure",
    "write_json",
    "write_submission",
]

LUNA16_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
EXCLUDED_DEFAULT_DIAMETER_MM = 10.0  # LUNA16's script: a finding with a negative diameter is given 10 mm
SUBMISSION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
_COORDS = ("coordX", "coordY", "coordZ")


def read_findings(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of ``annotations.csv`` / ``annotations_excluded.csv``: seriesuid, coordX/Y/Z and diameter_mm as floats."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LUNA16 annotation file not found: {path}.")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    try:
        return [{"seriesuid": r["seriesuid"], **{k: float(r[k]) for k in (*_COORDS, "diameter_mm")}} for r in rows]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: needs seriesuid, coordX, coordY, coordZ, diameter_mm numbers ({error}).") from None


@dataclass
class CandidateMatches:
    """Outcome of matching scored candidates to the nodules of the evaluated scans.

    Attributes:
        fp_probs: probabilities of the false positives ``(F,)``, with their scans ``fp_scans`` ``(F,)``.
        tp_probs: per nodule ``(T,)``, the highest probability among its hits, ``-inf`` when missed; scans ``tp_scans``.
        ignored: candidates on excluded findings (and on no nodule): neither true nor false positives.
        seriesuids: the evaluated scans (each counts in "false positives per scan", with or without candidates).
        candidate_probs, candidate_labels: every non-ignored candidate's probability and whether it hits a nodule
            (every hit, not only the best one of each nodule: the candidate-level AUC reads these).
    """

    fp_probs: np.ndarray
    fp_scans: np.ndarray
    tp_probs: np.ndarray
    tp_scans: np.ndarray
    ignored: int
    seriesuids: list[str]
    candidate_probs: np.ndarray
    candidate_labels: np.ndarray


def _centres(rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    return np.array([[float(r[k]) for k in _COORDS] for r in rows], dtype=np.float64).reshape(-1, 3)


def _hits(candidates: np.ndarray, findings: Sequence[Mapping[str, Any]], default_diameter: float) -> np.ndarray:
    """``(C, F)`` bool: candidate strictly inside the finding's radius."""
    diameters = np.array([float(f["diameter_mm"]) for f in findings], dtype=np.float64)
    diameters = np.where(diameters < 0, default_diameter, diameters)
    squared = ((candidates[:, None, :] - _centres(findings)[None]) ** 2).sum(-1).reshape(len(candidates), len(findings))
    return squared < (diameters[None] / 2.0) ** 2


def _group(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row["seriesuid"]), []).append(row)
    return groups


def match_candidates(
    predictions: Sequence[Mapping[str, Any]],
    annotations: Sequence[Mapping[str, Any]],
    excluded: Sequence[Mapping[str, Any]] = (),
    seriesuids: Sequence[str] | None = None,
    excluded_default_diameter_mm: float = EXCLUDED_DEFAULT_DIAMETER_MM,
) -> CandidateMatches:
    """Match scored candidates (``seriesuid``, ``coordX/Y/Z`` mm, ``probability``) to nodules (``annotations``) and
    excluded findings, scan by scan, as LUNA16's evaluation does (module docstring).

    Args:
        seriesuids: the evaluated scans; default: the scans of the predictions. Predictions and nodules of other
            scans are an error (a prediction) or left out (a nodule).
    """
    scored, nodules, irrelevant = _group(predictions), _group(annotations), _group(excluded)
    scans = sorted(scored) if seriesuids is None else [str(s) for s in seriesuids]
    unknown = sorted(set(scored) - set(scans))
    if unknown:
        raise ValueError(f"predictions for {len(unknown)} scans outside the evaluated ones, e.g. {unknown[0]}.")
    fp_probs, fp_scans, tp_probs, tp_scans, probs, labels = [], [], [], [], [], []
    ignored = 0
    for uid in scans:
        rows, scan_nodules = scored.get(uid, []), nodules.get(uid, [])
        centres = _centres(rows)
        prob = np.array([float(r["probability"]) for r in rows], dtype=np.float64)
        on_nodule = _hits(centres, scan_nodules, EXCLUDED_DEFAULT_DIAMETER_MM)
        for column in range(on_nodule.shape[1]):  # a nodule counts once, with its best hit
            tp_probs.append(prob[on_nodule[:, column]].max() if on_nodule[:, column].any() else -np.inf)
            tp_scans.append(uid)
        hit = on_nodule.any(axis=1)
        skip = np.zeros(len(rows), dtype=bool)
        if uid in irrelevant:
            skip = ~hit & _hits(centres, irrelevant[uid], excluded_default_diameter_mm).any(axis=1)
        ignored += int(skip.sum())
        false = ~hit & ~skip
        fp_probs += prob[false].tolist()
        fp_scans += [uid] * int(false.sum())
        probs += prob[~skip].tolist()
        labels += hit[~skip].astype(int).tolist()
    return CandidateMatches(
        np.asarray(fp_probs, dtype=np.float64),
        np.asarray(fp_scans, dtype=object),
        np.asarray(tp_probs, dtype=np.float64),
        np.asarray(tp_scans, dtype=object),
        ignored,
        scans,
        np.asarray(probs, dtype=np.float64),
        np.asarray(labels, dtype=np.int64),
    )


def froc_curve(
    fp_probs: np.ndarray, tp_probs: np.ndarray, num_scans: int, num_nodules: int
) -> tuple[np.ndarray, np.ndarray]:
    """FROC operating points ``(fps_per_scan, sensitivity)`` over every probability threshold (a candidate counts when
    its probability is >= the threshold), ascending in false positives, one point per distinct false-positive count
    (its best sensitivity), starting at ``(0, 0)``. Missed nodules carry ``-inf`` and never count.

    The same points as MONAI's :func:`~monai.metrics.froc.compute_froc_curve_data` (a test checks it), from sorted
    counts: MONAI's helper compares every threshold with every candidate, quadratic in the number of candidates, which
    a LUNA16 test fold (~75,000 candidates) and its bootstrap cannot afford."""
    fp_sorted, tp_sorted = np.sort(fp_probs), np.sort(tp_probs)
    thresholds = np.unique(np.concatenate([fp_sorted, tp_sorted[np.isfinite(tp_sorted)]]))
    fps = np.append(len(fp_sorted) - np.searchsorted(fp_sorted, thresholds, side="left"), 0) / float(num_scans)
    sensitivity = np.append(len(tp_sorted) - np.searchsorted(tp_sorted, thresholds, side="left"), 0) / num_nodules
    rates, index = np.unique(fps, return_inverse=True)
    best = np.zeros(len(rates))
    np.maximum.at(best, index, sensitivity)
    return rates, best


def _froc_points(matches: CandidateMatches, rates: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fps, sens = froc_curve(matches.fp_probs, matches.tp_probs, len(matches.seriesuids), len(matches.tp_probs))
    at_rates = np.array([compute_froc_score(fps[::-1], sens[::-1], (rate,)) for rate in rates])
    return fps, sens, at_rates


def _bootstrap(matches: CandidateMatches, rates: Sequence[float], samples: int, seed: int) -> np.ndarray:
    """``(samples_used, len(rates))`` sensitivities of scan-level bootstrap resamples holding at least one nodule."""
    rng = np.random.default_rng(seed)
    scans = np.asarray(matches.seriesuids, dtype=object)
    fp_by_scan = {uid: matches.fp_probs[matches.fp_scans == uid] for uid in scans}
    tp_by_scan = {uid: matches.tp_probs[matches.tp_scans == uid] for uid in scans}
    rows = []
    for _ in range(samples):
        drawn = scans[rng.integers(0, len(scans), len(scans))]
        tp = np.concatenate([tp_by_scan[u] for u in drawn])
        if tp.size == 0:
            continue
        fp = np.concatenate([fp_by_scan[u] for u in drawn])
        fps, sens = froc_curve(fp, tp, len(drawn), tp.size)
        rows.append([compute_froc_score(fps[::-1], sens[::-1], (rate,)) for rate in rates])
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(rates))


def luna16_froc(
    predictions: Sequence[Mapping[str, Any]],
    annotations: Sequence[Mapping[str, Any]],
    excluded: Sequence[Mapping[str, Any]] = (),
    seriesuids: Sequence[str] | None = None,
    fp_rates: Sequence[float] = LUNA16_FP_RATES,
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """LUNA16 FROC, CPM, bootstrap confidence intervals and candidate AUC of scored candidates.

    Returns a JSON-ready dict: ``cpm``, ``sensitivity`` (per FP rate, keys like ``"0.125"``), ``cpm_ci`` and
    ``sensitivity_ci`` (``[low, high]`` percentile intervals at ``confidence``, ``None`` without bootstrap), ``auc``
    (``None`` unless both classes occur), ``curve`` (``fps_per_scan``, ``sensitivity``), counts (``num_scans``,
    ``num_nodules``, ``num_candidates``, ``num_false_positives``, ``num_ignored``, ``bootstrap_samples_used``).
    """
    matches = match_candidates(predictions, annotations, excluded, seriesuids)
    if len(matches.tp_probs) == 0:
        raise ValueError("the evaluated scans hold no nodule: the FROC is undefined.")
    fps, sens, at_rates = _froc_points(matches, fp_rates)
    result: dict[str, Any] = {
        "cpm": float(at_rates.mean()),
        "sensitivity": {f"{r:g}": float(s) for r, s in zip(fp_rates, at_rates, strict=True)},
        "cpm_ci": None,
        "sensitivity_ci": None,
        "confidence": confidence,
        "auc": None,
        "num_scans": len(matches.seriesuids),
        "num_nodules": len(matches.tp_probs),
        "num_detected_nodules": int(np.isfinite(matches.tp_probs).sum()),
        "num_candidates": len(predictions),
        "num_false_positives": len(matches.fp_probs),
        "num_ignored": matches.ignored,
        "bootstrap_samples_used": 0,
        "curve": {"fps_per_scan": fps.tolist(), "sensitivity": sens.tolist()},
    }
    if len(set(matches.candidate_labels.tolist())) == 2:
        y_pred = torch.as_tensor(matches.candidate_probs)
        result["auc"] = float(compute_roc_auc(y_pred, torch.as_tensor(matches.candidate_labels)))
    if bootstrap_samples > 0:
        samples = _bootstrap(matches, fp_rates, bootstrap_samples, seed)
        if len(samples):
            tail = (1.0 - confidence) / 2.0 * 100.0
            low, high = np.percentile(samples, [tail, 100.0 - tail], axis=0)
            cpm_low, cpm_high = np.percentile(samples.mean(axis=1), [tail, 100.0 - tail])
            result["cpm_ci"] = [float(cpm_low), float(cpm_high)]
            result["sensitivity_ci"] = {
                f"{r:g}": [float(a), float(b)] for r, a, b in zip(fp_rates, low, high, strict=True)
            }
            result["bootstrap_samples_used"] = len(samples)
    return result


def save_froc_figure(result: Mapping[str, Any], path: str | os.PathLike, title: str = "LUNA16 FROC") -> Path:
    """Plot the FROC curve (log false positives per scan) with the CPM operating points and CI band; atomic PNG."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 4.0))
    fps = np.asarray(result["curve"]["fps_per_scan"])
    sens = np.asarray(result["curve"]["sensitivity"])
    positive = fps > 0
    axis.plot(fps[positive], sens[positive], drawstyle="steps-post", color="C0", label="FROC")
    rates = [float(r) for r in result["sensitivity"]]
    axis.plot(rates, list(result["sensitivity"].values()), "o", color="C1", label=f"CPM = {result['cpm']:.3f}")
    if result.get("sensitivity_ci"):
        low, high = zip(*result["sensitivity_ci"].values(), strict=True)
        axis.fill_between(rates, low, high, color="C1", alpha=0.2, label=f"{result['confidence']:.0%} CI (bootstrap)")
    axis.set_xscale("log", base=2)
    axis.set_xlim(rates[0] / 1.5, rates[-1] * 1.5)
    axis.set_ylim(0.0, 1.02)
    axis.set_xlabel("false positives per scan")
    axis.set_ylabel("sensitivity")
    axis.set_title(f"{title} ({result['num_nodules']} nodules, {result['num_scans']} scans)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(loc="lower right")
    figure.tight_layout()
    return save_figure(figure, path)


def write_submission(path: str | os.PathLike, predictions: Sequence[Mapping[str, Any]]) -> Path:
    """Write scored candidates as a LUNA16 submission CSV (seriesuid, coordX, coordY, coordZ, probability)."""
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(SUBMISSION_COLUMNS)
        for row in predictions:
            writer.writerow(
                [row["seriesuid"], *(f"{float(row[k]):.6f}" for k in _COORDS), f"{float(row['probability']):.9f}"]
            )
    return Path(path)


def write_json(path: str | os.PathLike, content: Mapping[str, Any]) -> Path:
    """Write ``content`` as indented JSON, atomically."""
    return atomic_write_json(path, content)
