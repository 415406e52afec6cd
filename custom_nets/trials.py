"""Repeated fine-tuning trials: train + evaluate a fine-tune bundle over seeds and label fractions.

The paper reports the mean +- standard deviation of 5 trials (arXiv 2212.01893, METHOD.md section 4), and label
efficiency is studied by training on 10 / 25 / 50 / 100 % of the labelled volumes. For every (label fraction, seed)
this runs ``configs/train.json`` and then ``configs/train.json + configs/evaluate.json`` of a bundle (each trial in its
own folder), reads the metric from the evaluation's ``summary.json``, and writes ``trials.json`` and ``trials.md``
(mean +- sample std over seeds per label fraction). Finished trials are skipped when the runner is started again.

CLI (fire; any further ``--key value`` is a bundle override)::

    python -m custom_nets.trials --bundle_root bundles/finetune_heart --output_dir runs/heart_trials \
        --seeds "[0,1,2,3,4]" --label_fractions "[0.1,0.25,0.5,1.0]" --dataset_dir /data/mmwhs_ct_prepared
    python -m custom_nets.trials --bundle_root bundles/finetune_nodule --output_dir runs/nodule_trials \
        --metric cpm --label_fractions "[0.1,1.0]" --dataset_dir /data/luna16_prepared
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from custom_nets.atomic_files import atomic_write_json, atomic_write_text
from custom_nets.metrics.label_efficiency import seed_summary

__all__ = ["aggregate_trials", "format_table", "run_trial", "run_trials", "trial_metric"]


def aggregate_trials(results: Mapping[float, Mapping[int, float]]) -> list[dict[str, Any]]:
    """Mean +- sample std over seeds for each label fraction: ``{fraction: {seed: value}}`` -> table rows."""
    return [{"label_fraction": fraction, **seed_summary(results[fraction])} for fraction in sorted(results)]


def format_table(rows: Sequence[Mapping[str, Any]], metric: str, scale: float = 100.0) -> str:
    """Markdown table of aggregated rows, values multiplied by ``scale`` (percent by default)."""
    lines = [f"| labelled volumes | {metric} (mean +- std) | trials |", "|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['label_fraction'] * 100:g} % | {row['mean'] * scale:.2f} +- {row['std'] * scale:.2f} "
            f"| {row['trials']} |"
        )
    return "\n".join(lines) + "\n"


def _run_bundle(bundle_root: Path, configs: list[str], overrides: Mapping[str, Any], in_process: bool) -> None:
    config_files = [str(bundle_root / "configs" / c) for c in configs]
    meta_file = str(bundle_root / "configs" / "metadata.json")
    logging_file = str(bundle_root / "configs" / "logging.conf")
    if in_process:
        from monai.bundle import run

        run(config_file=config_files, meta_file=meta_file, logging_file=logging_file, **overrides)
        return
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(config_files)]
    command += ["--meta_file", meta_file, "--logging_file", logging_file]
    for key, value in overrides.items():
        command += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    subprocess.run(command, check=True)


def run_trial(
    bundle_root: str | os.PathLike,
    trial_dir: str | os.PathLike,
    seed: int,
    label_fraction: float,
    presets: Sequence[str] = (),
    in_process: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Train then evaluate one trial of a fine-tune bundle (skipped when its summary exists); returns the summary.

    Args:
        bundle_root: bundle folder with ``configs/train.json`` and ``configs/evaluate.json``.
        trial_dir: the trial's ``output_dir``; its weights go to ``<trial_dir>/models``, the evaluation summary to
            ``<trial_dir>/eval/summary.json``.
        seed: the bundle's ``seed`` (initialisation, sampling and label subset).
        label_fraction: fraction of the training volumes that keep their labels.
        presets: config files under ``configs/`` merged last, over ``train.json`` (and ``evaluate.json``), e.g.
            ``presets/cpu_demo.json``.
        in_process: run the bundles in this process instead of one subprocess per run.
        overrides: further bundle overrides.
    """
    root, trial = Path(bundle_root).resolve(), Path(trial_dir).resolve()
    summary_path = trial / "eval" / "summary.json"
    if not summary_path.is_file():
        trial_overrides = {
            **overrides,
            "bundle_root": str(root),
            "seed": int(seed),
            "label_fraction": float(label_fraction),
            "output_dir": str(trial),
            "ckpt_dir": str(trial / "models"),
        }
        _run_bundle(root, ["train.json", *presets], trial_overrides, in_process)
        _run_bundle(root, ["train.json", "evaluate.json", *presets], trial_overrides, in_process)
    return json.loads(summary_path.read_text())


def trial_metric(summary: Mapping[str, Any], metric: str, source: str = "summary") -> float:
    """The mean over test volumes of ``metric`` in an evaluation summary, with an error naming what is there."""
    if metric not in summary["metrics"]:
        raise KeyError(f"{source} has no metric '{metric}' (available: {sorted(summary['metrics'])}).")
    return summary["metrics"][metric]["mean"]


def run_trials(
    bundle_root: str,
    output_dir: str,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    label_fractions: Sequence[float] = (1.0,),
    metric: str = "iou_mean",
    in_process: bool = False,
    presets: Sequence[str] = (),
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Train and evaluate ``bundle_root`` for every label fraction and seed; return and save the aggregated rows.

    Args:
        bundle_root: bundle folder with ``configs/train.json`` and ``configs/evaluate.json``.
        output_dir: trials go to ``<output_dir>/fraction_<f>/seed_<s>/`` (their ``output_dir`` and ``ckpt_dir``);
            the tables to ``<output_dir>/trials.json`` and ``trials.md``.
        seeds: one trial per seed (the bundle's ``seed``: initialisation, sampling and label subset).
        label_fractions: fractions of the training volumes that keep their labels (the bundle's ``label_fraction``).
        metric: column of the evaluation summary to aggregate (``iou_mean`` = the paper's 3D IoU per volume;
            ``cpm`` for finetune_nodule).
        in_process: run the bundles in this process (faster start) instead of one subprocess per run.
        presets: config files under ``configs/`` merged after ``train.json``.
        overrides: further bundle overrides, e.g. ``dataset_dir``, ``encoder_depth``, ``pretrained_ckpt``.
    """
    root, out = Path(bundle_root).resolve(), Path(output_dir).resolve()
    if not (root / "configs" / "evaluate.json").is_file():
        raise FileNotFoundError(f"{root} has no configs/evaluate.json: is it a fine-tune bundle folder?")
    results: dict[float, dict[int, float]] = {}
    for fraction in label_fractions:
        for seed in seeds:
            trial = out / f"fraction_{fraction:g}" / f"seed_{seed}"
            summary = run_trial(root, trial, seed, fraction, presets, in_process, **overrides)
            value = trial_metric(summary, metric, str(trial / "eval" / "summary.json"))
            results.setdefault(float(fraction), {})[int(seed)] = value
    rows = aggregate_trials(results)
    atomic_write_json(out / "trials.json", {"bundle": str(root), "metric": metric, "rows": rows})
    atomic_write_text(out / "trials.md", format_table(rows, metric))
    return rows


if __name__ == "__main__":
    from custom_nets.command_line import fire_command

    fire_command(run_trials)
