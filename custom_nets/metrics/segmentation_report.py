"""Evaluation report for slice-wise 3D segmentation (arXiv 2212.01893, section 4 of METHOD.md).

:class:`SegmentationReport` is an ignite handler for a MONAI ``SupervisedEvaluator``. It reads the per-case values
that MONAI metric handlers keep in ``engine.state.metric_details`` (``save_details=True``), names every row after the
case's label file, and writes, when the evaluation completes:

* ``cases.csv``: one row per volume, one column per metric and class, plus ``<metric>_mean`` (mean over classes,
  NaNs skipped) - ``iou_mean`` is the paper's per-volume 3D IoU;
* ``summary.json``: mean / std / count / skipped of every column over the volumes, and ``absent_classes``: the classes
  that no label of the evaluation holds. Those keep their own columns but are left out of every ``<metric>_mean``
  (the rule and its reason are in ``absent_class_rule`` and :mod:`custom_nets.metrics.segmentation`): a class never
  labelled would otherwise score a perfect 1 in every case and inflate the mean;
* ``overlays/<case>.png``: for the first ``num_overlays`` cases, the axial slice with the most labelled voxels with
  the label (left) and the prediction (right) drawn over the image.

Files are written to a temporary name and renamed, so an earlier report is never left half-overwritten.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.utils import ImageMetaKey, string_list_all_gather

from custom_nets.atomic_files import atomic_path, atomic_write_text
from custom_nets.metrics.figures import pyplot, save_figure
from custom_nets.metrics.segmentation import summarise

__all__ = ["ABSENT_CLASS_RULE", "SegmentationReport", "case_name", "save_overlay"]

ABSENT_CLASS_RULE = (
    "a class with no labelled voxel in any case of this evaluation is listed in absent_classes and left out of every "
    "<metric>_mean: without ground truth its empty-vs-empty score of 1 (or 0 for a stray prediction) says nothing "
    "about the network. Its own columns are kept. A class absent from some cases only is scored per case (IoU/Dice 1 "
    "when the prediction is empty too, 0 otherwise)."
)

logger = logging.getLogger(__name__)

_NIFTI_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")


def case_name(filename: str | Sequence[str]) -> str:
    """Case identifier from a file name: the base name without its image suffix (first file of a list)."""
    if not isinstance(filename, str):
        filename = str(filename[0])
    name = os.path.basename(filename)
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def save_overlay(
    image: np.ndarray, label: np.ndarray, pred: np.ndarray, path: str | os.PathLike, first_class: int = 1
) -> int:
    """Draw label and prediction contours over the axial slice with the most labelled voxels and save a PNG.

    Args:
        image: ``(H, W, D)`` intensities (one channel).
        label: ``(C, H, W, D)`` binary one-hot or multi-label ground truth.
        pred: ``(C, H, W, D)`` binary prediction of the same shape.
        path: output PNG path.
        first_class: first channel to draw (1 skips a background channel).

    Returns:
        The index of the slice drawn (along the last axis).
    """
    plt = pyplot()

    foreground = label[first_class:].sum(axis=tuple(range(label.ndim - 1)))
    if foreground.max() == 0:
        foreground = pred[first_class:].sum(axis=tuple(range(pred.ndim - 1)))
    index = int(np.argmax(foreground)) if foreground.max() > 0 else image.shape[-1] // 2
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, masks, title in ((axes[0], label, "label"), (axes[1], pred, "prediction")):
        ax.imshow(image[..., index].T, cmap="gray", origin="lower")
        for channel in range(first_class, masks.shape[0]):
            mask = masks[channel, ..., index].T
            if mask.any() and not mask.all():
                ax.contour(mask, levels=[0.5], colors=[colours((channel - first_class) % 10)], linewidths=1)
        ax.set_title(f"{title} (slice {index})")
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=80)
    return index


class SegmentationReport:
    """Per-case CSV, summary JSON and PNG overlays from a MONAI evaluator's metric details.

    Args:
        output_dir: folder for ``cases.csv``, ``summary.json`` and ``overlays/``.
        metric_names: mapping ``column prefix -> metric handler name`` (the key of ``engine.state.metric_details``),
            e.g. ``{"dice": "val_dice", "iou": "val_iou", "hd95": "val_hd95"}``. Each detail is ``(N, C)``.
        class_names: names of the scored channels, in order (their count must match each detail's ``C``).
        label_key, pred_key, image_key: keys of the decollated evaluator output items (one-hot ``(C, H, W, D)``
            label and prediction, ``(C_in, H, W, D)`` image).
        num_overlays: how many cases (first seen on each process) get a PNG overlay; 0 disables them.
        overlay_first_class: first channel drawn in overlays (1 for softmax outputs, 0 for multi-label).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        metric_names: dict[str, str],
        class_names: Sequence[str],
        label_key: str = "label",
        pred_key: str = "pred",
        image_key: str = "image",
        num_overlays: int = 4,
        overlay_first_class: int = 1,
    ) -> None:
        if not metric_names:
            raise ValueError("SegmentationReport needs at least one metric in `metric_names`.")
        self.output_dir = Path(output_dir)
        self.metric_names = dict(metric_names)
        self.class_names = list(class_names)
        self.label_key, self.pred_key, self.image_key = label_key, pred_key, image_key
        self.num_overlays = num_overlays
        self.overlay_first_class = overlay_first_class
        self._cases: list[str] = []
        self._labelled_cases = torch.zeros(len(self.class_names), dtype=torch.float64)  # cases holding each class

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, engine: Engine) -> None:
        self._cases = []
        self._labelled_cases.zero_()
        (self.output_dir / "overlays").mkdir(parents=True, exist_ok=True)

    def _iteration_completed(self, engine: Engine) -> None:
        for item in engine.state.output:
            label = item[self.label_key]
            name = case_name(label.meta.get(ImageMetaKey.FILENAME_OR_OBJ, f"case_{len(self._cases)}"))
            scored = torch.as_tensor(label)[label.shape[0] - len(self.class_names) :]  # the channels of class_names
            self._labelled_cases += scored.reshape(scored.shape[0], -1).bool().any(dim=1).cpu().double()
            if len(self._cases) < self.num_overlays:
                image = item[self.image_key]
                centre_channel = image.shape[0] // 2  # the centre slice when neighbouring slices are channels
                save_overlay(
                    image=_numpy(image[centre_channel]),
                    label=_numpy(label),
                    pred=_numpy(item[self.pred_key]),
                    path=self.output_dir / "overlays" / f"{name}.png",
                    first_class=self.overlay_first_class,
                )
            self._cases.append(name)

    def _completed(self, engine: Engine) -> None:
        import ignite.distributed as idist

        distributed = idist.get_world_size() > 1
        cases = string_list_all_gather(self._cases) if distributed else self._cases
        labelled = idist.all_reduce(self._labelled_cases.clone()) if distributed else self._labelled_cases
        if idist.get_rank() != 0:
            return
        absent = [channel for channel, count in enumerate(labelled.tolist()) if count == 0]
        details = getattr(engine.state, "metric_details", {})
        columns: dict[str, list[float]] = {}
        for prefix, handler_name in self.metric_names.items():
            if handler_name not in details:
                raise KeyError(
                    f"metric '{handler_name}' has no per-case details; give its handler save_details=True "
                    f"(available: {sorted(details)})."
                )
            values = torch.as_tensor(details[handler_name]).float().reshape(len(cases), -1).cpu()
            if values.shape[1] != len(self.class_names):
                raise ValueError(
                    f"metric '{handler_name}' has {values.shape[1]} channels but class_names has "
                    f"{len(self.class_names)}: {self.class_names}."
                )
            for channel, class_name in enumerate(self.class_names):
                columns[f"{prefix}_{class_name}"] = values[:, channel].tolist()
            kept = [channel for channel in range(values.shape[1]) if channel not in absent]
            columns[f"{prefix}_mean"] = [_nanmean(row) for row in values[:, kept].tolist()]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        header = ["case", *columns]
        rows = [[case, *(columns[c][i] for c in columns)] for i, case in enumerate(cases)]
        with atomic_path(self.output_dir / "cases.csv") as temporary, open(temporary, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        summary = {
            "num_cases": len(cases),
            "empty_policy": "IoU/Dice of a class empty in both label and prediction = 1, empty in one only = 0; "
            "HD95 = NaN when either is empty (skipped in the summary).",
            "absent_classes": [self.class_names[channel] for channel in absent],
            "absent_class_rule": ABSENT_CLASS_RULE,
            "metrics": {name: summarise(values) for name, values in columns.items()},
        }
        if absent:
            logger.warning(
                "classes %s have no labelled voxel in any of the %d evaluated cases: flagged in %s and left out of "
                "the means",
                summary["absent_classes"],
                len(cases),
                self.output_dir / "summary.json",
            )
        atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2))


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")
