"""End-to-end finetune_nodule: prepare_luna16 on generated .mhd/.raw scans with planted nodules -> train 2 iterations
from a pretrain_joint export -> evaluate (FROC JSON / PNG, submission CSV) -> infer one scan from its candidate CSV,
all through ``monai.bundle.run``; plus the ConfigWorkflow properties and metadata checks."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow, run, verify_net_in_out

from custom_nets.command_line import USER_ERROR_EXIT
from custom_nets.datasets import luna16
from custom_nets.nets import JointSSLNet
from custom_nets.weights import export_pretrained

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
NET = {"encoder_depth": 18, "embed_dim": 32, "transformer_layers": 1, "num_heads": 4, "ffn_dim": 40}
CUBE = {"num_slices": 8, "image_size": [32, 32], "spacing_mm": [2.0, 1.0, 1.0]}
TINY = {**NET, **CUBE, "num_workers": 0, "batch_size": 2}
FOLDS = {"train_subsets": [0, 1], "val_subsets": [2], "test_subsets": [3]}


def _copy_bundle(tmp_path: Path) -> Path:
    root = tmp_path / "finetune_nodule"
    shutil.copytree(BUNDLES / "finetune_nodule", root, ignore=shutil.ignore_patterns("models", "outputs"))
    return root


def _prepare(tmp_path: Path, luna_data):
    raw = luna_data.make_luna_folder(tmp_path / "raw", num_scans=4)
    cube = [CUBE["num_slices"], *CUBE["image_size"]]
    luna16.prepare(str(raw.root), str(tmp_path / "data"), cube_size=cube, spacing_mm=CUBE["spacing_mm"])
    return raw, tmp_path / "data"


def _run(root: Path, configs: list[str], **overrides) -> None:
    run(
        config_file=[str(root / "configs" / c) for c in configs],
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=str(root / "configs" / "logging.conf"),
        bundle_root=str(root),
        **overrides,
    )


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_train_evaluate_infer(tmp_path, luna_data):
    root = _copy_bundle(tmp_path)
    raw, dataset_dir = _prepare(tmp_path, luna_data)
    pretraining = JointSSLNet(**NET, projection_hidden_dim=32, projection_dim=16, intra_prototypes=(8,),
                              inter_prototypes=(4,))  # fmt: skip
    torch.save({"model": pretraining.state_dict()}, tmp_path / "checkpoint.pt")
    export = export_pretrained(tmp_path / "checkpoint.pt", tmp_path / "pretrained.pt")
    common = {"dataset_dir": str(dataset_dir), **TINY, **FOLDS}

    _run(root, ["train.json"], epochs=1, samples_per_epoch=4, pretrained_ckpt=str(export), **common)
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert state["head.1.weight"].shape == (1, 32)
    assert not torch.equal(state["slice_encoder.trunk.conv1.weight"], pretraining.slice_encoder.trunk.conv1.weight)
    checkpoint = torch.load(root / "outputs" / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 2  # 4 balanced draws, batch 2

    _run(root, ["train.json", "evaluate.json"], bootstrap_samples=20, **common)
    eval_dir = root / "outputs" / "eval"
    result = json.loads((eval_dir / "froc.json").read_text())
    assert (result["num_scans"], result["num_nodules"], result["num_candidates"]) == (1, 1, 5)
    assert 0.0 <= result["cpm"] <= 1.0 and list(result["sensitivity"]) == ["0.125", "0.25", "0.5", "1", "2", "4", "8"]
    assert result["auc"] is not None and (eval_dir / "froc.png").stat().st_size > 1000
    submission = _read_csv(eval_dir / "submission.csv")
    test_uid = raw.uids[3]
    candidates = [r for r in _read_csv(raw.root / "candidates_V2.csv") if r["seriesuid"] == test_uid]
    assert [r["seriesuid"] for r in submission] == [test_uid] * 5
    for scored, candidate in zip(submission, candidates, strict=True):  # original world coordinates
        assert [float(scored[k]) for k in ("coordX", "coordY", "coordZ")] == pytest.approx(
            [float(candidate[k]) for k in ("coordX", "coordY", "coordZ")], abs=1e-5
        )

    scan = raw.root / "subset3" / f"{test_uid}.mhd"
    _run(root, ["inference.json"], scan=str(scan), candidates_csv=str(raw.root / "candidates_V2.csv"), **TINY)
    inferred = _read_csv(root / "outputs" / "inference" / f"{test_uid}_scored.csv")
    assert len(inferred) == 5
    for a, b in zip(inferred, submission, strict=True):  # same model, same cubes (cached ones rounded to int16 HU)
        assert float(a["probability"]) == pytest.approx(float(b["probability"]), abs=1e-3)


def test_workflow_properties_and_metadata(tmp_path, luna_data):
    root = _copy_bundle(tmp_path)
    raw, dataset_dir = _prepare(tmp_path, luna_data)
    meta = str(root / "configs" / "metadata.json")
    scan = raw.root / "subset0" / f"{raw.uids[0]}.mhd"
    for configs, workflow_type in (
        (["train.json"], "train"),
        (["train.json", "evaluate.json"], "train"),
        (["inference.json"], "inference"),
    ):
        workflow = ConfigWorkflow(
            config_file=[str(root / "configs" / c) for c in configs],
            meta_file=meta,
            logging_file=str(root / "configs" / "logging.conf"),
            workflow_type=workflow_type,
            bundle_root=str(root),
            dataset_dir=str(dataset_dir),
            scan=str(scan),
            candidates_csv=str(raw.root / "candidates_V2.csv"),
            **NET,
            **CUBE,
            **FOLDS,
        )
        workflow.initialize()
        assert workflow.check_properties() == [], configs
    assert '"%' not in (root / "configs" / "inference.json").read_text()
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=str(root / "configs" / "inference.json"),
                      bundle_root=str(root), **NET)  # fmt: skip
    metadata = json.loads(Path(meta).read_text())
    schema = json.loads((BUNDLES / "metadata_schema.json").read_text())
    assert set(schema.get("required", [])) <= set(metadata)
    assert metadata["version"] in metadata["changelog"]
    assert "custom_nets" in metadata["required_packages_version"]
    config = json.loads((root / "configs" / "train.json").read_text())
    vocabulary = ["bundle_root", "dataset_dir", "datalist", "output_dir", "device", "epochs", "batch_size",
                  "num_workers", "amp", "num_slices", "image_size", "pretrained_ckpt", "resume", "seed"]  # fmt: skip
    assert list(config)[1 : 1 + len(vocabulary)] == vocabulary
    for name in ("LICENSE", "large_files.yml", "docs/README.md", "docs/data_license.txt", "configs/logging.conf"):
        assert (root / name).is_file(), name
    assert not (BUNDLES / "finetune_nodule" / "models" / "model.pt").exists()


@pytest.mark.slow
def test_label_efficiency_trials_read_the_cpm(tmp_path, luna_data):
    from custom_nets import trials

    _, dataset_dir = _prepare(tmp_path, luna_data)
    rows = trials.run_trials(
        bundle_root=str(BUNDLES / "finetune_nodule"),
        output_dir=str(tmp_path / "trials"),
        seeds=(0,),
        label_fractions=(0.5,),
        metric="cpm",
        in_process=True,
        dataset_dir=str(dataset_dir),
        epochs=1,
        samples_per_epoch=2,
        bootstrap_samples=0,
        **TINY,
        **FOLDS,
    )
    assert len(rows) == 1 and rows[0]["label_fraction"] == 0.5 and 0.0 <= rows[0]["mean"] <= 1.0
    trial = tmp_path / "trials" / "fraction_0.5" / "seed_0"
    summary = json.loads((trial / "eval" / "summary.json").read_text())
    assert summary["metrics"]["cpm"]["mean"] == rows[0]["mean"] and summary["num_nodules"] == 1
    assert not (BUNDLES / "finetune_nodule" / "models").exists()  # trials never write into the bundle


@pytest.mark.flaky(reruns=1, only_rerun=["SIGABRT", "Signal 6", "ChildFailedError"])  # see pyproject.toml
@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2], ids=["one_node", "two_nodes"])
def test_multi_gpu_overlay_trains_with_two_cpu_processes(tmp_path, luna_data, bundle_checks, nodes):
    """torchrun with 2 processes on the gloo backend, on one "node" or as two one-process nodes (c10d rendezvous on
    127.0.0.1): DistributedWeightedRandomSampler, DDP, rank-0 checkpoints."""
    root = _copy_bundle(tmp_path)
    _, dataset_dir = _prepare(tmp_path, luna_data)
    configs = json.dumps([str(root / "configs" / c) for c in ("train.json", "multi_gpu_train.json")])
    bundle = ["-m", "monai.bundle", "run", "--config_file", configs]
    bundle += ["--meta_file", str(root / "configs" / "metadata.json")]
    bundle += ["--logging_file", str(root / "configs" / "logging.conf"), "--bundle_root", str(root)]
    bundle += ["--dataset_dir", str(dataset_dir), "--epochs", "1", "--samples_per_epoch", "4"]
    for key, value in {**TINY, **FOLDS}.items():
        bundle += [f"--{key}", json.dumps(value)]
    bundle_checks.train_on_nodes(bundle, nodes, "finetune_nodule_two_nodes", tmp_path, root, "Epoch: 1/1, Iter: 1/1")
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert "head.1.weight" in state  # DDP's "module." prefix is not saved
    checkpoint = torch.load(root / "outputs" / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 1  # 4 draws shared by 2 processes, batch 2


def _workflow(root: Path, dataset_dir: Path, **overrides) -> ConfigWorkflow:
    """The training workflow of the bundle copy ``root`` on tiny cubes, initialised (start-up check included), its
    trainer built first in every run (construction order decides the initial weights)."""
    workflow = ConfigWorkflow(
        config_file=str(root / "configs" / "train.json"),
        workflow_type="train",
        bundle_root=str(root),
        dataset_dir=str(dataset_dir),
        samples_per_epoch=4,
        **{**TINY, **FOLDS, **overrides},
    )
    workflow.initialize()
    assert workflow.trainer is not None
    return workflow


@pytest.mark.slow
def test_start_up_check_refuses_a_candidate_outside_its_scan_unless_turned_off(tmp_path, luna_data):
    root = _copy_bundle(tmp_path)
    _, dataset_dir = _prepare(tmp_path, luna_data)
    datalist = dataset_dir / "datalist.json"
    content = json.loads(datalist.read_text())
    moved = content["subset1"][2]
    moved["coordZ"] += 500.0  # far above the scan: a datalist edited by hand, or coordinates of another scan
    datalist.write_text(json.dumps(content))
    with pytest.raises(RuntimeError) as stopped:  # MONAI wraps errors of the config's "initialize"
        _workflow(root, dataset_dir, epochs=1)
    message = str(stopped.value.__cause__)
    assert f"{dataset_dir / moved['image']}: the candidate (item 2) lies outside its scan" in message
    assert "fix or drop the row of the candidates CSV" in message and message.count("\n") == 1  # one problem
    workflow = _workflow(root, dataset_dir, epochs=1, validate_data=False)  # the check is on by default, not forced
    workflow.run()
    assert workflow.trainer.state.iteration == 2


@pytest.mark.slow
def test_nan_policy_stop_keeps_the_last_good_checkpoint(tmp_path, luna_data, bundle_checks):
    root = _copy_bundle(tmp_path)
    _, dataset_dir = _prepare(tmp_path, luna_data)
    loss = bundle_checks.NaNAt(torch.nn.BCEWithLogitsLoss(), call=3)  # epoch 2, first step
    workflow = _workflow(root, dataset_dir, epochs=2, loss=loss)
    assert workflow.parser.get_parsed_content("nan_policy") == "stop"  # the default
    with pytest.raises(RuntimeError) as stopped:
        workflow.run()
    assert isinstance(stopped.value.__cause__, FloatingPointError)
    assert "iteration 3 (epoch 2); nan_policy 'stop'" in str(stopped.value.__cause__)
    checkpoints = root / "outputs" / "checkpoints"
    assert torch.load(checkpoints / "checkpoint_epoch=1.pt", weights_only=True)["trainer"]["iteration"] == 2
    for path in [*checkpoints.glob("*.pt"), root / "models" / "model.pt"]:
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state.get("model", state).values() if v.is_floating_point()), path


@pytest.mark.slow
def test_resume_from_an_epoch_checkpoint_ends_with_the_uninterrupted_weights(tmp_path, luna_data, bundle_checks):
    _, dataset_dir = _prepare(tmp_path, luna_data)
    reference_root = _copy_bundle(tmp_path / "reference")
    _workflow(reference_root, dataset_dir, epochs=2).run()
    root = _copy_bundle(tmp_path / "interrupted")
    interrupted = _workflow(root, dataset_dir, epochs=2)
    bundle_checks.terminate_after_epoch(interrupted, 1)
    interrupted.run()
    checkpoints = root / "outputs" / "checkpoints"
    assert "random_state" in torch.load(checkpoints / "checkpoint_epoch=1.pt", weights_only=True)
    resumed = _workflow(root, dataset_dir, epochs=2, resume=str(checkpoints / "checkpoint_epoch=1.pt"))
    resumed.run()
    bundle_checks.assert_same_final_checkpoint(root, reference_root, 4)


@pytest.mark.slow
def test_sigkill_mid_epoch_leaves_loadable_checkpoints_and_resumes_exactly(tmp_path, luna_data, bundle_checks):
    """``python -m monai.bundle run`` killed with SIGKILL after iteration 3 (epoch 2 of 2 iterations): the epoch-1
    checkpoint is whole, no temporary file remains, and resuming from it ends with the uninterrupted weights."""
    _, dataset_dir = _prepare(tmp_path, luna_data)
    reference_root = _copy_bundle(tmp_path / "reference")
    _workflow(reference_root, dataset_dir, epochs=2).run()
    root = _copy_bundle(tmp_path / "killed")
    settings = {"bundle_root": str(root), "dataset_dir": str(dataset_dir), "samples_per_epoch": 4, **TINY, **FOLDS}
    bundle_checks.train_until_sigkill([root / "configs" / "train.json"], {**settings, "epochs": 2}, 3, tmp_path)
    left = bundle_checks.assert_one_whole_checkpoint_left(root, iteration=2)
    assert left.name == "checkpoint_epoch=1.pt"
    _workflow(root, dataset_dir, epochs=2, resume=str(left)).run()
    bundle_checks.assert_same_final_checkpoint(root, reference_root, 4)


def _dicom_luna_folder(root: Path, luna_data, stamp_identifiers):
    """The generated LUNA16 folder with every scan as a CT DICOM series full of patient identifiers (axial, identity
    direction) in place of its .mhd, the CSV coordinates moved to the series' world space."""
    import csv

    import numpy as np

    raw = luna_data.make_luna_folder(root, num_scans=4)
    dicom = luna16.ScanGeometry(
        np.asarray(luna_data.ORIGIN, float), np.asarray(luna_data.SPACING, float), np.eye(3), luna_data.SIZE
    )
    geometries = {}
    for subset, uid in enumerate(raw.uids):
        scan = root / f"subset{subset}" / f"{uid}.mhd"
        array, geometries[uid] = luna16.read_scan(scan)
        scan.unlink()
        scan.with_suffix(".raw").unlink()
        series = luna_data.write_dicom_series(root / f"subset{subset}" / f"series{subset}", array, uid)
        stamp_identifiers(sorted(series.iterdir()))
    for name in ("candidates_V2.csv", "annotations.csv", "annotations_excluded.csv"):
        with open(root / name, newline="") as handle:
            reader = csv.DictReader(handle)
            fields, rows = reader.fieldnames, list(reader)
        for row in rows:
            world = np.array([float(row[k]) for k in ("coordX", "coordY", "coordZ")])
            moved = luna16.voxel_to_world(luna16.world_to_voxel(world, geometries[row["seriesuid"]]), dicom)
            row.update(zip(("coordX", "coordY", "coordZ"), moved.tolist(), strict=True))
        with open(root / name, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    return raw


@pytest.mark.slow
def test_dicom_identifiers_never_reach_the_outputs(tmp_path, luna_data, bundle_checks, capfd, monkeypatch):
    """prepare -> train -> evaluate -> infer on DICOM series full of patient identifiers: none of them in any output
    (prepared cubes and datalist, checkpoints, TensorBoard events, CSV / JSON / PNG reports, file names, logs).
    Training and evaluation run from the repository's bundle folder and an empty working directory, with `output_dir`
    and `ckpt_dir` in a temporary folder: nothing is written anywhere else."""
    raw = _dicom_luna_folder(tmp_path / "raw", luna_data, bundle_checks.stamp_identifiers)
    cube = [CUBE["num_slices"], *CUBE["image_size"]]
    dataset_dir = tmp_path / "data"
    luna16.prepare(str(raw.root), str(dataset_dir), cube_size=cube, spacing_mm=CUBE["spacing_mm"])
    outputs, cwd = tmp_path / "outputs", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    watched = (BUNDLES / "finetune_nodule", raw.root, dataset_dir, cwd)
    before = bundle_checks.snapshot(*watched)
    common = {"dataset_dir": str(dataset_dir), "output_dir": str(outputs), "ckpt_dir": str(outputs / "models")}
    common.update(TINY, **FOLDS)
    with bundle_checks.log_to(outputs / "run.log"):
        _run(BUNDLES / "finetune_nodule", ["train.json"], epochs=1, samples_per_epoch=4, **common)
        _run(BUNDLES / "finetune_nodule", ["train.json", "evaluate.json"], bootstrap_samples=5, **common)
    bundle_checks.assert_confined(before, bundle_checks.snapshot(*watched), outputs)
    assert (outputs / "eval" / "froc.json").is_file() and any((outputs / "tensorboard").iterdir())

    root = _copy_bundle(tmp_path)  # inference reads <bundle_root>/models/model.pt
    (root / "models").mkdir()
    shutil.copy(outputs / "models" / "model.pt", root / "models" / "model.pt")
    scan = raw.root / "subset3" / "series3"
    with bundle_checks.log_to(outputs / "inference.log"):
        _run(root, ["inference.json"], scan=str(scan), candidates_csv=str(raw.root / "candidates_V2.csv"), **TINY)
    assert len(_read_csv(root / "outputs" / "inference" / f"{raw.uids[3]}_scored.csv")) == 5  # the series was read
    assert bundle_checks.leaked_identifiers(bundle_checks.output_bytes(scan))  # the search finds the input's
    captured = capfd.readouterr()
    everything = b"\n".join(
        [captured.out.encode(), captured.err.encode(), *map(bundle_checks.output_bytes, (dataset_dir, outputs, root))]
    )
    assert b"tfevents" in everything and b"froc" in everything
    assert bundle_checks.leaked_identifiers(everything) == []


@pytest.mark.slow
def test_skip_bad_trains_past_a_candidate_outside_its_scan_and_lists_it(tmp_path, luna_data):
    """``skip_bad``: the candidate the start-up check refuses is left out, listed in ``skipped_items.json`` and when
    training ends; training goes on with the other candidates."""
    root = _copy_bundle(tmp_path)
    _, dataset_dir = _prepare(tmp_path, luna_data)
    datalist = dataset_dir / "datalist.json"
    content = json.loads(datalist.read_text())
    moved = content["subset1"][2]
    moved["coordZ"] += 500.0
    datalist.write_text(json.dumps(content))
    workflow = _workflow(root, dataset_dir, epochs=1, skip_bad=True)
    kept = [item["image"] for item in workflow.parser.get_parsed_content("train#data")]
    assert (
        str(dataset_dir / moved["image"]) not in kept
        and len(kept) == len(content["subset0"]) + len(content["subset1"]) - 1
    )
    workflow.run()
    assert workflow.trainer.state.iteration == 2
    (skipped,) = json.loads((root / "outputs" / "skipped_items.json").read_text())["skipped"]
    assert (skipped["key"], skipped["position"], skipped["item"]) == ("subset1", 2, moved)
    assert f"{dataset_dir / moved['image']}: the candidate (item 2) lies outside its scan" in skipped["problem"]
    (at_the_end,) = workflow.finalize()
    assert at_the_end == [f"[subset1] item 2: {skipped['problem']}"]


def _one_scan(folder: Path, luna_data) -> tuple[Path, Path, list[dict[str, str]]]:
    """One generated scan with its five candidates: ``(scan, candidates CSV, its rows)``."""
    raw = luna_data.make_luna_folder(folder, num_scans=1)
    return (
        raw.root / "subset0" / f"{raw.uids[0]}.mhd",
        raw.root / "candidates_V2.csv",
        _read_csv(raw.root / "candidates_V2.csv"),
    )


def _add_row_outside(table: Path, rows: list[dict[str, str]]) -> dict[str, str]:
    """Append a copy of the first candidate moved 500 mm above its scan (coordinates of another scan, or a typo)."""
    outside = {**rows[0], "coordZ": str(float(rows[0]["coordZ"]) + 500.0)}
    with open(table, "a", newline="") as handle:
        csv.DictWriter(handle, fieldnames=list(outside)).writerow(outside)
    return outside


def _missing_scan(scan: Path, table: Path, rows, luna_data) -> tuple[dict, str]:
    gone = scan.with_name("gone.mhd")
    return {"scan": str(gone)}, f"{gone}: scan not found; fix scan"


def _nan_scan(scan: Path, table: Path, rows, luna_data) -> tuple[dict, str]:
    array = luna_data.planted_scan([(8, 14, 6)], np.random.default_rng(0)).astype(np.float32)
    array[3, 4, 5] = np.nan
    luna_data.write_scan(scan, array)
    return {}, f"{scan}: NaN or infinite voxel values; re-export the scan"


def _candidate_outside(scan: Path, table: Path, rows, luna_data) -> tuple[dict, str]:
    _add_row_outside(table, rows)
    return {}, f"{table}: row {len(rows)} lies outside its scan"


def _no_row_of_the_scan(scan: Path, table: Path, rows, luna_data) -> tuple[dict, str]:
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerow({**rows[0], "seriesuid": "1.2.3"})
    return {}, f"{table}: no row with seriesuid {rows[0]['seriesuid']}, the seriesuid of the scan {scan}"


INFERENCE_CASES = {
    "missing_scan": (_missing_scan, "fix scan"),
    "nan_scan": (_nan_scan, "re-export the scan"),
    "candidate_outside_its_scan": (_candidate_outside, "fix or drop the row"),
    "no_row_of_the_scan": (_no_row_of_the_scan, "give the candidates of this scan"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(INFERENCE_CASES))
def test_a_bad_input_stops_inference_with_one_line(case, tmp_path, luna_data, bundle_checks):
    """``python -m monai.bundle run`` of inference.json on a bad scan or candidates CSV: exit status 1 and one line
    naming the file, the problem and the fix, no traceback (the check runs before any weight is loaded)."""
    scan, table, rows = _one_scan(tmp_path / "raw", luna_data)
    make, fix = INFERENCE_CASES[case]
    overrides, expected = make(scan, table, rows, luna_data)
    settings = {"scan": str(scan), "candidates_csv": str(table), "output_dir": str(tmp_path / "out"), **TINY}
    root = BUNDLES / "finetune_nodule"
    result = bundle_checks.monai_bundle_run(
        [root / "configs" / "inference.json"], {"bundle_root": str(root), **settings, **overrides}, tmp_path
    )
    assert result.returncode == USER_ERROR_EXIT, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("error:"))
    (problem,) = [line.strip() for line in lines[header + 1 :]]
    assert problem.startswith(expected) and fix in problem, (problem, expected)
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.slow
def test_inference_skip_bad_scores_the_candidates_inside_and_lists_the_one_outside(tmp_path, luna_data, bundle_checks):
    """``skip_bad``: a candidate outside its scan is left out, listed in ``skipped_items.json`` and when the run ends;
    the scan's other candidates are scored. Without ``skip_bad`` the same input stops the run at start-up."""
    root = _copy_bundle(tmp_path)
    scan, table, rows = _one_scan(tmp_path / "raw", luna_data)
    outside = _add_row_outside(table, rows)
    workflow, skipped = bundle_checks.inference_stops_then_skips(
        root, f"{table}: row {len(rows)} lies outside its scan", scan=str(scan), candidates_csv=str(table), **TINY
    )
    scored = _read_csv(root / "outputs" / "inference" / f"{rows[0]['seriesuid']}_scored.csv")
    assert [float(r["coordZ"]) for r in scored] == pytest.approx([float(r["coordZ"]) for r in rows])
    assert skipped["position"] == len(rows) and skipped["item"]["row"] == len(rows)
    assert skipped["item"]["coordZ"] == pytest.approx(float(outside["coordZ"]))
    assert skipped["problem"].startswith(f"{table}: row {len(rows)} lies outside its scan")
    (at_the_end,) = workflow.finalize()
    assert at_the_end == [f"[inference] item {len(rows)}: {skipped['problem']}"]
