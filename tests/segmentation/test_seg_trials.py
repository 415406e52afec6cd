"""Trials runner: aggregation against hand values, and a 2-seed label-fraction run of the heart bundle."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from custom_nets import trials
from custom_nets.datasets import mmwhs

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "finetune_heart"


def test_aggregate_and_table_hand_values():
    rows = trials.aggregate_trials({1.0: {0: 0.8, 1: 0.6}, 0.1: {3: 0.5, 1: 0.3, 2: 0.4}})
    assert [r["label_fraction"] for r in rows] == [0.1, 1.0]
    assert rows[0]["mean"] == pytest.approx(0.4) and rows[0]["std"] == pytest.approx(0.1)
    assert rows[0]["values"] == [0.3, 0.4, 0.5]  # ordered by seed
    assert rows[1]["mean"] == pytest.approx(0.7) and rows[1]["std"] == pytest.approx(math.sqrt(0.02))
    table = trials.format_table(rows, "iou_mean")
    assert "| 10 % | 40.00 +- 10.00 | 3 |" in table and "| 100 % | 70.00 +- 14.14 | 2 |" in table


@pytest.mark.slow
def test_two_seeds_on_half_the_labels_then_resume(tmp_path, seg_data, monkeypatch):
    raw = seg_data.make_heart_folder(tmp_path / "raw")
    mmwhs.prepare(str(raw), str(tmp_path / "data"), split="random", val_fraction=0.25, test_fraction=0.25)
    tiny = {"encoder_depth": 18, "decoder_channels": [16, 16, 8, 8, 8], "image_size": [32, 32], "num_workers": 0}
    run_kwargs = {
        "bundle_root": str(BUNDLE),
        "output_dir": str(tmp_path / "trials"),
        "seeds": (0, 1),
        "label_fractions": (0.5,),
        "in_process": True,
        "dataset_dir": str(tmp_path / "data"),
        "epochs": 1,
        "batch_size": 1,
        "slices_per_volume": 2,
        "val_interval": 1,
        **tiny,
    }
    rows = trials.run_trials(**run_kwargs)
    assert len(rows) == 1 and rows[0]["trials"] == 2 and rows[0]["label_fraction"] == 0.5
    for seed in (0, 1):
        trial = tmp_path / "trials" / "fraction_0.5" / f"seed_{seed}"
        checkpoint = torch.load(trial / "checkpoints" / "checkpoint_final.pt", weights_only=True)
        assert checkpoint["trainer"]["iteration"] == 1  # 1 of the 2 labelled training volumes
        assert (trial / "models" / "model.pt").is_file() and (trial / "eval" / "cases.csv").is_file()
    assert not (BUNDLE / "models").exists()  # trials never write into the bundle
    saved = json.loads((tmp_path / "trials" / "trials.json").read_text())
    assert saved["rows"][0]["mean"] == pytest.approx(rows[0]["mean"])

    def must_not_run(*args, **kwargs):
        raise AssertionError("finished trials must be reused")

    monkeypatch.setattr(trials, "_run_bundle", must_not_run)
    assert trials.run_trials(**run_kwargs)[0]["values"] == rows[0]["values"]
