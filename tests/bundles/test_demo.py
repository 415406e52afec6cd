"""The README's main command path: the embedded demo end to end on tiny corpora (one pretraining epoch, one
fine-tuning epoch per trial), and the pieces of its downstream yardstick."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from custom_nets import pretraining_demo
from custom_nets.pretraining_demo import INITS, SEGMENTATION_CLASSES, run_demo, write_trial_datalist


def test_trial_datalists_are_stratified_nested_and_never_hold_test_volumes(tmp_path: Path) -> None:
    pool = [{"image": f"pool/{c}_{i}.nii.gz", "class_label": c} for c in range(3) for i in range(4)]
    corpora = {
        "pool": pool,
        "test": [{"image": f"test/{c}.nii.gz", "class_label": c} for c in range(3)],
        "validation": [{"image": f"val/{c}.nii.gz", "class_label": c} for c in range(3)],
    }
    small = json.loads(write_trial_datalist(tmp_path / "a.json", corpora, 3, seed=1, split="testing").read_text())
    large = json.loads(write_trial_datalist(tmp_path / "b.json", corpora, 6, seed=1, split="testing").read_text())
    assert sorted(item["class_label"] for item in small["training"]) == [0, 1, 2]
    assert sorted(item["class_label"] for item in large["training"]) == [0, 0, 1, 1, 2, 2]
    assert all(item in large["training"] for item in small["training"])
    assert small["testing"] == corpora["test"] and small["scored_split"] == "testing"
    tuning = json.loads(write_trial_datalist(tmp_path / "c.json", corpora, 3, seed=1, split="validation").read_text())
    assert tuning["testing"] == corpora["validation"]
    with pytest.raises(ValueError, match="split"):
        write_trial_datalist(tmp_path / "d.json", corpora, 3, seed=1, split="train")


def _corpora(volumes_per_class: int) -> dict[str, list]:
    """Datalist entries of the three labelled corpora, 3 classes (no files: ``trial_calls`` runs no trial)."""
    return {
        name: [
            {"image": f"{name}/{c}_{i}.nii.gz", "class_label": c} for c in range(3) for i in range(volumes_per_class)
        ]
        for name in ("pool", "test", "validation")
    }


@pytest.fixture
def trial_calls(monkeypatch) -> list[dict]:
    """The keyword arguments of every ``run_trial`` call that ``run_label_efficiency`` makes; no trial runs."""
    calls: list[dict] = []
    monkeypatch.setattr(pretraining_demo, "run_trial", lambda *args, **kwargs: calls.append(kwargs) or {})
    monkeypatch.setattr(pretraining_demo, "trial_metric", lambda *args: 0.5)
    return calls


def test_validation_split_trials_turn_off_only_the_duplicate_check(tmp_path: Path, trial_calls: list) -> None:
    """Tuning scores the validation corpus, whose first volume per class is also each trial's end-of-training
    validation volume: the fine-tune bundle's start-up check would refuse those duplicates, so validation-split trials
    run without it; testing-split trials keep it (their lists are disjoint)."""
    corpora = _corpora(volumes_per_class=2)
    for split in ("validation", "testing"):
        pretraining_demo.run_label_efficiency(tmp_path, corpora, tmp_path / "w.pt", [3], [0], 6, 18, split=split)
    assert [call.get("validate_data", True) for call in trial_calls] == [False, False, True, True]  # 2 inits a split


def test_every_budget_takes_steps_of_the_same_slice_count(tmp_path: Path, trial_calls: list) -> None:
    """The bundle batches volumes, each giving ``slices_per_volume`` slices: 18 slices per epoch are 6 of each of 3
    volumes (one volume per step) or 2 of each of 9 (three volumes per step), so both budgets take 3 steps of 6."""
    pretraining_demo.run_label_efficiency(
        tmp_path, _corpora(volumes_per_class=3), tmp_path / "w.pt", [3, 9], [0], 18, 18
    )
    shapes = [(call["slices_per_volume"], call["batch_size"]) for call in trial_calls]
    assert shapes == [(6, 1), (6, 1), (2, 3), (2, 3)]
    assert {volumes * slices for slices, volumes in shapes} == {pretraining_demo.SLICES_PER_STEP}


def test_frozen_protocol_trains_longer_unless_overridden(tmp_path: Path, trial_calls: list) -> None:
    """The decoder alone on a fixed encoder gets 120 epochs, end to end keeps the preset's (no ``epochs`` override);
    an explicit ``epochs`` override wins over both."""
    corpora = _corpora(volumes_per_class=1)
    for protocol in ("frozen", "end_to_end"):
        pretraining_demo.run_label_efficiency(tmp_path, corpora, tmp_path / "w.pt", [3], [0], 6, 18, protocol=protocol)
    pretraining_demo.run_label_efficiency(tmp_path, corpora, tmp_path / "w.pt", [3], [0], 6, 18, "frozen", epochs=2)
    assert [(call["freeze_encoder"], call.get("epochs")) for call in trial_calls] == [
        (True, 120),
        (True, 120),
        (False, None),
        (False, None),
        (True, 2),
        (True, 2),
    ]


def test_frozen_then_end_to_end_trials_start_from_the_frozen_trials(tmp_path: Path, trial_calls: list) -> None:
    """LP-FT: each trial of ``frozen_then_end_to_end`` starts from the whole U-Net of the ``frozen`` trial with the same
    init, budget and seed (``init_ckpt``, no separate encoder file) and trains the encoder; without those trials it
    stops with an error that names the missing file and the protocol to run first."""
    corpora = _corpora(volumes_per_class=1)
    protocol = "frozen_then_end_to_end"
    with pytest.raises(FileNotFoundError, match="frozen protocol's trials"):
        pretraining_demo.run_label_efficiency(tmp_path, corpora, tmp_path / "w.pt", [3], [0, 1], 6, 18, protocol)
    starts = {}
    for init in INITS:
        for seed in (0, 1):
            model = pretraining_demo.trial_dir(tmp_path, "frozen", init, 3, seed) / "models" / "model.pt"
            model.parent.mkdir(parents=True)
            model.touch()
            starts[(init, seed)] = str(model)
    pretraining_demo.run_label_efficiency(tmp_path, corpora, tmp_path / "w.pt", [3], [0, 1], 6, 18, protocol)
    assert [(call["init_ckpt"], call["pretrained_ckpt"], call["freeze_encoder"]) for call in trial_calls] == [
        (starts[(init, seed)], None, False) for seed in (0, 1) for init in INITS
    ]
    assert all(Path(call["trial_dir"]).is_relative_to(tmp_path / "finetune" / protocol) for call in trial_calls)


def test_protocols_run_after_the_protocol_they_start_from() -> None:
    ordered = pretraining_demo.ordered_protocols(["frozen_then_end_to_end", "end_to_end", "frozen"])
    assert ordered == ["end_to_end", "frozen", "frozen_then_end_to_end"]
    with pytest.raises(ValueError, match="starts from the trials of 'frozen'"):
        pretraining_demo.ordered_protocols(["frozen_then_end_to_end"])
    with pytest.raises(ValueError, match="unknown fine-tuning protocols"):
        pretraining_demo.ordered_protocols(["frozen", "linear"])


@pytest.mark.slow
def test_demo_writes_report_plots_embeddings_and_label_efficiency(tmp_path: Path) -> None:
    report = run_demo(
        tmp_path,
        epochs=1,
        num_per_class=1,
        eval_per_class=2,
        num_workers=0,
        labelled_volumes=(3,),
        finetune_seeds=(0, 1),
        pool_per_class=1,
        test_per_class=1,
        protocols=("frozen_then_end_to_end", "frozen"),
        finetune_overrides={"epochs": 1, "decoder_channels": [16, 16, 8, 8, 8]},
    )
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["iterations"] == report["iterations"] > 0
    assert {"intra", "inter", "mask", "total"} <= set(saved["loss_terms"][0])
    assert {"intra", "inter"} <= set(saved["training_rank"])
    for phase in ("random_init", "pretrained"):
        for kind in ("image", "volume"):
            scores = saved[phase][kind]
            assert 0.0 <= scores["nmi"] <= 1.0 and 0.0 <= scores["linear_probe_accuracy"] <= 1.0
            assert scores["count"] == 8 and 1.0 <= scores["effective_rank"] <= 8
    downstream = saved["downstream"]
    assert downstream["test_volumes"] == len(SEGMENTATION_CLASSES) and downstream["scored_split"] == "testing"
    assert list(downstream["protocols"]) == ["frozen", "frozen_then_end_to_end"]  # the start runs first
    for protocol, result in downstream["protocols"].items():
        for metric in ("dice_mean", "iou_mean"):
            rows = result["rows"][metric]
            assert {(row["init"], row["labelled_volumes"]) for row in rows} == {(init, 3) for init in INITS}
            assert all(row["trials"] == 2 and 0.0 <= row["mean"] <= 1.0 for row in rows)
        gain = result["gain_at_smallest_budget"]["dice_mean"]
        assert gain["clear"] == (gain["gain"] > gain["larger_std"])
        for init in INITS:
            trial = tmp_path / "finetune" / protocol / init / "labelled_3" / "seed_0"
            assert (trial / "eval" / "summary.json").is_file() and (trial / "models" / "model.pt").is_file()
    exported = torch.load(tmp_path / "model.pt", weights_only=True)
    for protocol, unchanged in (("frozen", True), ("frozen_then_end_to_end", False)):
        trial = tmp_path / "finetune" / protocol / "pretrained" / "labelled_3" / "seed_0"
        tuned = torch.load(trial / "models" / "model.pt", weights_only=True)
        same = torch.equal(
            tuned["encoder.trunk.layer1.0.conv1.weight"], exported["slice_encoder.trunk.layer1.0.conv1.weight"]
        )
        assert same == unchanged  # the frozen protocol trains the decoder only; then end to end trains the encoder too
    datalist = json.loads((tmp_path / "finetune" / "datalists" / "labelled_3_seed_0.json").read_text())
    assert all(item["image"].startswith("seg_pool/") for item in datalist["training"])
    assert all(item["image"].startswith("seg_test/") for item in datalist["testing"])
    assert set(saved["stage_seconds"]) >= {"pretrain", "fine-tune", "total"}
    change = saved["weight_change"]
    assert set(change["pretraining"]) == {"stem", "layer1", "layer2", "layer3", "layer4"}
    assert all(value >= 0 for value in change["pretraining"].values())  # 0 here: one warm-up iteration at lr 0
    tuned_change = change["fine_tuning"]
    assert change["fine_tuning_protocol"] == "frozen_then_end_to_end"
    assert set(tuned_change) == {"3"} and all(value > 0 for value in tuned_change["3"].values())
    assert saved["training_rank_history"] and saved["training_rank_history"][-1] == saved["training_rank"]
    for plot in ("label_efficiency.png", "embeddings.png", "effective_rank.png"):
        assert (tmp_path / plot).stat().st_size > 0
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "model.json").is_file()
    random_rows = np.load(tmp_path / "embeddings_random" / "embeddings.npy")
    pretrained_rows = np.load(tmp_path / "embeddings_pretrained" / "embeddings.npy")
    assert random_rows.shape == pretrained_rows.shape == (16, 128)
    assert not np.allclose(random_rows, pretrained_rows)
    with open(tmp_path / "embeddings_pretrained" / "embeddings.csv", newline="") as handle:
        sources = [Path(record["source_image"]) for record in csv.DictReader(handle)]
    assert all((tmp_path / "eval_corpus") in source.parents for source in sources)  # scored on held-out items only


def test_jobs_run_in_order_in_workers_with_the_cores_shared_out() -> None:
    """Results come back in job order; each spawned worker runs torch with cores // workers threads (at least one)."""
    jobs = [{"index": index, "name": f"job {index}"} for index in range(5)]
    assert pretraining_demo.run_in_workers(dict, jobs, workers=2) == jobs
    assert pretraining_demo.run_in_workers(dict, jobs, workers=1) == jobs
    threads = pretraining_demo.run_in_workers(torch.get_num_threads, [{}, {}], workers=2)
    assert threads == [pretraining_demo.threads_per_worker(2)] * 2
    assert pretraining_demo.threads_per_worker(2) == max(1, len(os.sched_getaffinity(0)) // 2)
