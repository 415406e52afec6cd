"""Evaluation and inference output of the nodule bundle: scored candidates (LUNA16 submission CSV) and, given the
annotations, the LUNA16 FROC / CPM report (arXiv 2212.01893, METHOD.md section 4).

:class:`LUNA16CPM` is the same FROC as an ignite metric: the CPM of the candidates scored in one evaluation run,
gathered across processes, for model selection (the validation key metric of the bundle).

:class:`NoduleReport` is an ignite handler for a MONAI ``SupervisedEvaluator``. At every iteration it reads each
candidate's nodule probability (the ``pred`` of the decollated output, after a sigmoid) and its ``seriesuid`` and world
coordinates (the decollated batch, which keeps the datalist's fields), and when the run completes it writes, each file
through a temporary name:

* ``<submission_name>``: ``seriesuid, coordX, coordY, coordZ, probability`` in the original world coordinates;
* with ``annotations``: ``froc.json`` (sensitivity at 1/8 ... 8 false positives per scan, CPM, bootstrap intervals,
  candidate AUC, counts, the curve), ``froc.png`` and ``summary.json`` (``metrics -> name -> mean``, the layout the
  label-efficiency runner :mod:`custom_nets.trials` reads: ``cpm``, ``auc`` and ``sensitivity_<rate>``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.utils import evenly_divisible_all_gather, string_list_all_gather

from custom_nets.metrics.froc import luna16_froc, read_findings, save_froc_figure, write_json, write_submission

__all__ = ["LUNA16CPM", "NoduleReport", "froc_summary", "scored_candidates"]

logger = logging.getLogger(__name__)

_FIELDS = ("seriesuid", "coordX", "coordY", "coordZ")


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().reshape(-1)[0].item()
    if isinstance(value, (list, tuple)):
        return _scalar(value[0])
    return value


def scored_candidates(batch: Sequence[Mapping], output: Sequence[Mapping], pred_key: str = "pred") -> list[dict]:
    """Rows ``seriesuid, coordX, coordY, coordZ, probability`` of one evaluator iteration, from the decollated batch
    (the datalist's fields) and the decollated output (``pred_key``: the probability, ``(1,)``)."""
    rows = []
    for item, result in zip(batch, output, strict=True):
        missing = [f for f in _FIELDS if f not in item]
        if missing:
            raise KeyError(f"the batch items lack {missing}: keep them in the datalist entries of the candidates.")
        row = {field: _scalar(item[field]) for field in _FIELDS}
        row["seriesuid"] = str(row["seriesuid"])
        row["probability"] = float(_scalar(result[pred_key]))
        rows.append(row)
    return rows


class LUNA16CPM(Metric):
    """LUNA16 CPM (mean sensitivity at 1/8 ... 8 false positives per scan) of the candidates scored in an evaluation
    run, as an ignite metric for a MONAI evaluator's ``key_val_metric`` (checkpoint selection by CPM).

    It reads the engine's decollated batch and output itself (:func:`scored_candidates`), gathers the candidates of
    every process, and computes :func:`custom_nets.metrics.froc.luna16_froc` without bootstrap.

    Args:
        annotations: ``annotations.csv``.
        annotations_excluded: ``annotations_excluded.csv`` or ``None``.
        seriesuids: the evaluated scans (scans without candidates count in false positives per scan).
        pred_key: key of the probability in the decollated output.
    """

    def __init__(
        self,
        annotations: str | os.PathLike,
        annotations_excluded: str | os.PathLike | None = None,
        seriesuids: Sequence[str] | None = None,
        pred_key: str = "pred",
    ) -> None:
        self.findings = read_findings(annotations)
        self.excluded = read_findings(annotations_excluded) if annotations_excluded else []
        self.seriesuids = None if seriesuids is None else list(seriesuids)
        self.pred_key = pred_key
        self.rows: list[dict[str, Any]] = []
        super().__init__()

    def reset(self) -> None:
        self.rows = []

    def iteration_completed(self, engine: Engine) -> None:
        self.update((engine.state.batch, engine.state.output))

    def update(self, output: tuple[Sequence[Mapping], Sequence[Mapping]]) -> None:
        self.rows += scored_candidates(output[0], output[1], self.pred_key)

    def compute(self) -> float:
        import ignite.distributed as idist

        rows = self.rows
        if idist.get_world_size() > 1:
            values = torch.tensor(
                [[r["coordX"], r["coordY"], r["coordZ"], r["probability"]] for r in rows], dtype=torch.float64
            ).reshape(-1, 4)
            # a process without candidates sends an empty string; seriesuids are never empty
            uids = [uid for uid in string_list_all_gather([r["seriesuid"] for r in rows]) if uid]
            gathered = evenly_divisible_all_gather(values, concat=True).tolist()
            keys = ("coordX", "coordY", "coordZ", "probability")
            rows = [
                {"seriesuid": uid, **dict(zip(keys, v, strict=True))} for uid, v in zip(uids, gathered, strict=True)
            ]
        return luna16_froc(rows, self.findings, self.excluded, self.seriesuids, bootstrap_samples=0)["cpm"]


def froc_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The FROC result in the evaluation-summary layout of the other bundles (``metrics -> name -> mean``).

    CPM, AUC and the sensitivities are single values over the whole test set (not means over cases): ``mean`` holds
    the value, ``ci`` the bootstrap interval where there is one."""
    metrics: dict[str, dict[str, Any]] = {"cpm": {"mean": result["cpm"], "ci": result["cpm_ci"]}}
    if result["auc"] is not None:
        metrics["auc"] = {"mean": result["auc"], "ci": None}
    intervals = result["sensitivity_ci"] or {}
    for rate, value in result["sensitivity"].items():
        metrics[f"sensitivity_{rate}"] = {"mean": value, "ci": intervals.get(rate)}
    counts = ("num_scans", "num_nodules", "num_candidates", "num_false_positives", "num_ignored")
    return {**{key: result[key] for key in counts}, "metrics": metrics}


class NoduleReport:
    """Collect scored candidates during an evaluation; write the submission CSV and, with annotations, the FROC.

    Args:
        output_dir: folder of the outputs.
        annotations: ``annotations.csv`` (``None``: scores only, as in inference).
        annotations_excluded: ``annotations_excluded.csv`` or ``None``.
        seriesuids: the evaluated scans (all of the test folds, those without candidates included); default: the
            scans of the scored candidates.
        bootstrap_samples, confidence, seed: the bootstrap interval (0 samples: none).
        submission_name: file name of the scored candidates.
        pred_key: key of the probability in the decollated output (``(1,)`` after the sigmoid).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        annotations: str | os.PathLike | None = None,
        annotations_excluded: str | os.PathLike | None = None,
        seriesuids: Sequence[str] | None = None,
        bootstrap_samples: int = 1000,
        confidence: float = 0.95,
        seed: int = 0,
        submission_name: str = "submission.csv",
        pred_key: str = "pred",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.annotations = annotations
        self.annotations_excluded = annotations_excluded
        self.seriesuids = None if seriesuids is None else list(seriesuids)
        self.bootstrap_samples = bootstrap_samples
        self.confidence = confidence
        self.seed = seed
        self.submission_name = submission_name
        self.pred_key = pred_key
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, engine: Engine) -> None:
        self.rows = []

    def _iteration_completed(self, engine: Engine) -> None:
        self.rows += scored_candidates(engine.state.batch, engine.state.output, self.pred_key)

    def _completed(self, engine: Engine) -> None:
        write_submission(self.output_dir / self.submission_name, self.rows)
        logger.info("wrote %d scored candidates to %s", len(self.rows), self.output_dir / self.submission_name)
        if self.annotations is None:
            return
        excluded = read_findings(self.annotations_excluded) if self.annotations_excluded else []
        result = luna16_froc(
            self.rows,
            read_findings(self.annotations),
            excluded,
            self.seriesuids,
            bootstrap_samples=self.bootstrap_samples,
            confidence=self.confidence,
            seed=self.seed,
        )
        write_json(self.output_dir / "froc.json", result)
        write_json(self.output_dir / "summary.json", froc_summary(result))
        save_froc_figure(result, self.output_dir / "froc.png")
        interval = result["cpm_ci"]
        logger.info(
            "LUNA16 CPM %.4f%s over %d nodules in %d scans, candidate AUC %s",
            result["cpm"],
            "" if interval is None else f" ({result['confidence']:.0%} CI {interval[0]:.4f}-{interval[1]:.4f})",
            result["num_nodules"],
            result["num_scans"],
            "n/a" if result["auc"] is None else f"{result['auc']:.4f}",
        )
