"""LUNA16 FROC / CPM against hand-computed cases: a nodule hit by two candidates, a missed-then-late nodule, a scan
with no nodule, a scan with no candidate, an excluded finding."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from custom_nets.metrics import froc

ANNOTATIONS = [
    {"seriesuid": "a", "coordX": 0.0, "coordY": 0.0, "coordZ": 0.0, "diameter_mm": 10.0},
    {"seriesuid": "a", "coordX": 50.0, "coordY": 0.0, "coordZ": 0.0, "diameter_mm": 6.0},
]
EXCLUDED = [{"seriesuid": "a", "coordX": -30.0, "coordY": 1.0, "coordZ": 0.0, "diameter_mm": -1.0}]  # -1: 10 mm


def _candidate(uid, x, y, z, probability):
    return {"seriesuid": uid, "coordX": x, "coordY": y, "coordZ": z, "probability": probability}


PREDICTIONS = [
    _candidate("a", 1.0, 0.0, 0.0, 0.9),  # nodule 1
    _candidate("a", 0.0, 2.0, 0.0, 0.6),  # nodule 1 again: counted once (best probability 0.9)
    _candidate("a", 50.0, 0.0, 2.0, 0.65),  # nodule 2
    _candidate("a", 20.0, 0.0, 0.0, 0.8),  # false positive
    _candidate("a", -30.0, 0.0, 0.0, 0.95),  # on the excluded finding
    _candidate("b", 0.0, 0.0, 0.0, 0.7),  # false positive on a scan with no nodule
]
SCANS = ["a", "b", "c"]  # scan c has no candidate and no nodule: it still counts per scan


def test_froc_hand_computed_with_excluded_finding():
    result = froc.luna16_froc(PREDICTIONS, ANNOTATIONS, EXCLUDED, SCANS, bootstrap_samples=0)
    # operating points (fps/scan, sensitivity): thresholds 0.9 -> (0, .5), 0.8 -> (1/3, .5), 0.65 -> (2/3, 1)
    np.testing.assert_allclose(result["curve"]["fps_per_scan"], [0.0, 1 / 3, 2 / 3])
    np.testing.assert_allclose(result["curve"]["sensitivity"], [0.5, 0.5, 1.0])
    expected = [0.5, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]  # 1/2 FP/scan: halfway between 1/3 and 2/3
    assert list(result["sensitivity"].values()) == pytest.approx(expected)
    assert list(result["sensitivity"]) == ["0.125", "0.25", "0.5", "1", "2", "4", "8"]
    assert result["cpm"] == pytest.approx(5.75 / 7)
    assert (result["num_nodules"], result["num_false_positives"], result["num_ignored"]) == (2, 2, 1)
    # candidate AUC: positives 0.9, 0.6, 0.65 against negatives 0.8, 0.7 -> 2 of 6 pairs ordered
    assert result["auc"] == pytest.approx(2 / 6)


def test_froc_without_excluded_file_counts_the_finding_as_false_positive():
    result = froc.luna16_froc(PREDICTIONS, ANNOTATIONS, (), SCANS, bootstrap_samples=0)
    np.testing.assert_allclose(result["curve"]["fps_per_scan"], [0.0, 1 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(result["curve"]["sensitivity"], [0.0, 0.5, 0.5, 1.0])
    assert list(result["sensitivity"].values()) == pytest.approx([0.1875, 0.375, 0.5, 1.0, 1.0, 1.0, 1.0])
    assert result["cpm"] == pytest.approx(5.0625 / 7)


def test_hit_is_strictly_inside_the_radius_and_missed_nodules_count():
    on_the_boundary = [_candidate("a", 5.0, 0.0, 0.0, 0.9), _candidate("a", 50.0, 0.0, 0.0, 0.5)]
    result = froc.luna16_froc(on_the_boundary, ANNOTATIONS, seriesuids=["a"], bootstrap_samples=0)
    assert result["num_detected_nodules"] == 1 and result["num_false_positives"] == 1
    assert max(result["sensitivity"].values()) == pytest.approx(0.5)  # never above the one nodule found of two


def test_predictions_of_scans_outside_the_evaluation_are_an_error():
    with pytest.raises(ValueError, match="outside the evaluated"):
        froc.luna16_froc(PREDICTIONS, ANNOTATIONS, seriesuids=["a"])


def test_bootstrap_interval_and_outputs(tmp_path):
    result = froc.luna16_froc(PREDICTIONS, ANNOTATIONS, EXCLUDED, SCANS, bootstrap_samples=200, seed=3)
    again = froc.luna16_froc(PREDICTIONS, ANNOTATIONS, EXCLUDED, SCANS, bootstrap_samples=200, seed=3)
    assert result["cpm_ci"] == again["cpm_ci"]  # seeded
    low, high = result["cpm_ci"]
    assert 0.0 <= low <= high <= 1.0 and low < high
    assert 0 < result["bootstrap_samples_used"] <= 200  # resamples without scan "a" hold no nodule: skipped
    assert froc.save_froc_figure(result, tmp_path / "froc.png").stat().st_size > 1000
    path = froc.write_submission(tmp_path / "submission.csv", PREDICTIONS)
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    assert float(rows[4]["coordX"]) == -30.0 and float(rows[4]["probability"]) == pytest.approx(0.95)


def test_read_findings_names_the_file(tmp_path):
    path = tmp_path / "annotations.csv"
    path.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\na,1,2,x,4\n")
    with pytest.raises(ValueError, match="annotations.csv"):
        froc.read_findings(path)


def test_curve_matches_monai_helper_on_random_scores():
    from monai.metrics.froc import compute_froc_curve_data

    rng = np.random.default_rng(0)
    fp = np.round(rng.random(300), 2)  # ties between candidates
    tp = np.where(rng.random(40) < 0.2, -np.inf, np.round(rng.random(40), 2))  # some nodules missed
    rates, sensitivity = froc.froc_curve(fp, tp, num_scans=7, num_nodules=40)
    # MONAI's helper skips the lowest distinct probability as a threshold: a -inf false positive is that one
    monai_fps, monai_sens = compute_froc_curve_data(np.append(fp, -np.inf), tp, 40, 7)
    expected = {}
    for rate, sens in zip(monai_fps.tolist(), monai_sens.tolist(), strict=True):
        expected[rate] = max(expected.get(rate, 0.0), sens)
    np.testing.assert_allclose(rates, sorted(expected))
    np.testing.assert_allclose(sensitivity, [expected[r] for r in sorted(expected)])


def _write_findings(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_cpm_metric_reads_batch_and_output_of_an_engine(tmp_path):
    """The validation key metric: decollated batch (datalist fields) + decollated output (probabilities)."""
    import torch
    from ignite.engine import Engine

    from custom_nets.metrics.nodule_report import LUNA16CPM

    def step(engine, batch):
        engine.state.batch = [{k: torch.tensor(p[k]) if k != "seriesuid" else p[k] for k in p} for p in batch]
        return [{"pred": torch.tensor([p["probability"]])} for p in batch]

    metric = LUNA16CPM(
        _write_findings(tmp_path / "annotations.csv", ANNOTATIONS),
        _write_findings(tmp_path / "excluded.csv", EXCLUDED),
        seriesuids=SCANS,
    )
    engine = Engine(step)
    metric.attach(engine, "val_cpm")
    engine.run([PREDICTIONS[:4], PREDICTIONS[4:]])
    assert engine.state.metrics["val_cpm"] == pytest.approx(5.75 / 7)
    engine.run([PREDICTIONS])  # reset between runs
    assert engine.state.metrics["val_cpm"] == pytest.approx(5.75 / 7)
