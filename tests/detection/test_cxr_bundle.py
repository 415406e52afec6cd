"""End to end through ``monai.bundle.run``: prepare_vindr_cxr -> train (2 iterations) -> evaluate -> infer for
finetune_cxr on generated DICOMs full of patient identifiers, none of which may reach an output; plus the
ConfigWorkflow properties and the metadata."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, run
from PIL import Image

from custom_nets.datasets import vindr_cxr
from custom_nets.nets.slice_encoder import SliceEncoder

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "finetune_cxr"
TINY = {
    "encoder_depth": 18,
    "fpn_channels": 16,
    "image_size": [64, 64],
    "anchor_sizes": [[8], [16], [32], [64]],
    "anchor_aspect_ratios": [1.0],
    "num_workers": 0,
    "score_threshold": 0.0,
}


def _copy_bundle(tmp_path: Path) -> Path:
    root = tmp_path / "finetune_cxr"
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("models", "outputs"))
    return root


def _run(root: Path, configs: list[str], **overrides) -> None:
    run(
        config_file=[str(root / "configs" / c) for c in configs],
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=str(root / "configs" / "logging.conf"),
        bundle_root=str(root),
        **overrides,
    )


@pytest.mark.slow
def test_prepare_train_evaluate_infer_without_identifier_leaks(cxr, tmp_path, capfd, bundle_checks):
    folder = cxr.make_vindr_folder(tmp_path / "raw", num_images=8, identifiers=cxr.PATIENT_IDENTIFIERS)
    dataset_dir = tmp_path / "data"
    vindr_cxr.prepare(str(folder.images), str(folder.csv), str(dataset_dir), image_size=64)
    root = _copy_bundle(tmp_path)
    encoder = SliceEncoder(depth=18, embed_dim=16)
    torch.save({f"slice_encoder.{k}": v for k, v in encoder.state_dict().items()}, tmp_path / "export.pt")

    common = {"dataset_dir": str(dataset_dir), **TINY}
    _run(root, ["train.json"], epochs=1, batch_size=3, pretrained_ckpt=str(tmp_path / "export.pt"), **common)
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert state["classification_head.cls_logits.weight"].shape[0] == 14  # 1 anchor x 14 findings
    assert not torch.equal(state["feature_extractor.body.conv1.weight"], encoder.trunk.conv1.weight)  # it trained
    checkpoint = torch.load(root / "outputs" / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 2  # 6 training images, batch 3, 1 epoch

    _run(root, ["train.json", "evaluate.json"], **common)
    metrics = json.loads((root / "outputs" / "eval" / "metrics.json").read_text())
    (test_entry,) = json.loads((dataset_dir / "datalist.json").read_text())["testing"]
    assert metrics["num_images"] == 1 and [i["image_id"] for i in metrics["images"]] == [test_entry["image_id"]]
    assert set(metrics) >= {"map50", "coco_map", "ap50_per_class", "coco_ap_per_class", "image_auc"}
    assert len(metrics["ap50_per_class"]) == 14
    scored = {n for n, v in metrics["ap50_per_class"].items() if v is not None}
    true_names = {vindr_cxr.VINDR_CLASS_NAMES[c] for c in test_entry["label"]}
    assert scored == true_names and (metrics["map50"] is None) == (not true_names)
    figures = list((root / "outputs" / "eval" / "figures").glob("*.png"))
    assert [f.stem for f in figures] == [test_entry["image_id"]]

    infer_dir = tmp_path / "infer_in"
    infer_dir.mkdir()
    dicom = sorted(folder.images.iterdir())[0]
    shutil.copy(dicom, infer_dir / dicom.name)
    ramp = np.tile(np.arange(70, dtype=np.uint8), (50, 1))  # 70 wide, 50 high; not constant (the check refuses that)
    Image.fromarray(ramp).save(infer_dir / "plain.png")
    _run(root, ["inference.json"], **{**common, "dataset_dir": str(infer_dir)})
    results = {p.stem: json.loads(p.read_text()) for p in (root / "outputs" / "inference").glob("*.json")}
    assert set(results) == {dicom.stem, "plain"}
    for name, size in ((dicom.stem, [cxr.COLS, cxr.ROWS]), ("plain", [70, 50])):
        result = results[name]
        assert result["original_size"] == size and result["box_mode"] == "xyxy" and result["boxes"]
        boxes = np.array([[b[k] for k in ("x_min", "y_min", "x_max", "y_max")] for b in result["boxes"]])
        assert (boxes >= 0).all() and (boxes[:, 2] <= size[0]).all() and (boxes[:, 3] <= size[1]).all()
        assert {b["class_name"] for b in result["boxes"]} <= set(vindr_cxr.VINDR_CLASS_NAMES)

    captured = capfd.readouterr()
    everything = b"\n".join(
        [captured.out.encode(), captured.err.encode(), *map(bundle_checks.output_bytes, (dataset_dir, root))]
    )
    assert len(everything) > 100_000 and b"tfevents" in everything  # events, checkpoints, reports, figures, logs
    assert bundle_checks.leaked_identifiers(everything, cxr.PATIENT_IDENTIFIERS) == []
    # the check itself can fail: the raw DICOMs do hold the identifiers
    assert len(bundle_checks.leaked_identifiers(dicom.read_bytes(), cxr.PATIENT_IDENTIFIERS)) >= 6


def test_workflow_properties_and_metadata(cxr, tmp_path):
    folder = cxr.make_vindr_folder(tmp_path / "raw", num_images=8)
    dataset_dir = tmp_path / "data"
    vindr_cxr.prepare(str(folder.images), str(folder.csv), str(dataset_dir), image_size=64)
    root = _copy_bundle(tmp_path)
    meta = str(root / "configs" / "metadata.json")
    for configs, workflow_type in (
        (["train.json"], "train"),
        (["train.json", "evaluate.json"], "train"),
        (["inference.json"], "inference"),  # self-contained: MONAI Label reads this file alone
    ):
        workflow = ConfigWorkflow(
            config_file=[str(root / "configs" / c) for c in configs],
            meta_file=meta,
            logging_file=str(root / "configs" / "logging.conf"),
            workflow_type=workflow_type,
            bundle_root=str(root),
            dataset_dir=str(dataset_dir),
            datalist=str(dataset_dir / "datalist.json"),  # inference from the datalist's testing split
            **TINY,
        )
        workflow.initialize()
        assert workflow.check_properties() == [], configs
    assert '"%' not in (root / "configs" / "inference.json").read_text()  # no macro pulling another file
    # the way MONAI Label's BundleInferTask runs a detection bundle: inference.json alone, `detector` and
    # `detector_ops` parsed, preprocessing applied, then detector(batched image, use_inferer=True) in eval mode
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser.update({"bundle_root": str(root), **TINY})
    detector = parser.get_parsed_content("detector")
    parser.get_parsed_content("detector_ops")
    image_path = str(dataset_dir / json.loads((dataset_dir / "datalist.json").read_text())["testing"][0]["image"])
    item = parser.get_parsed_content("preprocessing")({"image": image_path})
    detector.network = parser.get_parsed_content("network_def").eval()
    detector.eval()
    with torch.no_grad():
        (detections,) = detector(item["image"][None], use_inferer=True)
    assert set(detections) == {"box", "label", "label_scores"} and detections["box"].shape[1] == 4
    metadata = json.loads(Path(meta).read_text())
    schema = json.loads((BUNDLE.parent / "metadata_schema.json").read_text())
    assert set(schema.get("required", [])) <= set(metadata)
    assert metadata["version"] in metadata["changelog"]
    assert "custom_nets" in metadata["required_packages_version"]
    channels = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert list(channels.values()) == list(vindr_cxr.VINDR_CLASS_NAMES)
    config = json.loads((root / "configs" / "train.json").read_text())
    assert config["class_names"] == list(vindr_cxr.VINDR_CLASS_NAMES)
    vocabulary = ["bundle_root", "dataset_dir", "datalist", "output_dir", "device", "epochs", "batch_size",
                  "num_workers", "amp", "image_size", "pretrained_ckpt", "resume", "seed"]  # fmt: skip
    assert list(config)[1 : 1 + len(vocabulary)] == vocabulary
    for name in ("LICENSE", "large_files.yml", "docs/README.md", "docs/data_license.txt", "configs/logging.conf"):
        assert (root / name).is_file(), name
    assert not (BUNDLE / "models" / "model.pt").exists()  # no faked weights in the repository


@pytest.mark.flaky(reruns=1, only_rerun=["SIGABRT", "Signal 6", "ChildFailedError"])  # see pyproject.toml
@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2], ids=["one_node", "two_nodes"])
def test_multi_gpu_overlay_trains_with_two_cpu_processes(cxr, tmp_path, bundle_checks, nodes):
    """torchrun with 2 processes on the gloo backend, on one "node" or as two one-process nodes (c10d rendezvous on
    127.0.0.1): DistributedSampler, DDP around the RetinaNet, the validation mAP gathered over both processes, rank-0
    checkpoints."""
    folder = cxr.make_vindr_folder(tmp_path / "raw", num_images=12)
    vindr_cxr.prepare(str(folder.images), str(folder.csv), str(tmp_path / "data"), 64, val_fraction=0.2)
    root = _copy_bundle(tmp_path)
    configs = json.dumps([str(root / "configs" / c) for c in ("train.json", "multi_gpu_train.json")])
    bundle = ["-m", "monai.bundle", "run", "--config_file", configs]
    bundle += ["--meta_file", str(root / "configs" / "metadata.json"), "--bundle_root", str(root)]
    bundle += ["--logging_file", str(root / "configs" / "logging.conf"), "--dataset_dir", str(tmp_path / "data")]
    bundle += ["--epochs", "1", "--batch_size", "2"]
    for key, value in TINY.items():
        bundle += [f"--{key}", json.dumps(value)]
    logs = bundle_checks.train_on_nodes(
        bundle, nodes, "finetune_cxr_two_nodes", tmp_path, root, "Epoch: 1/1, Iter: 2/2"
    )
    assert "val_map50" in logs
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert "classification_head.cls_logits.weight" in state  # saved without DDP's "module." prefix
    checkpoint = torch.load(root / "outputs" / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 2  # 7 training images padded to 8, over 2 processes, batch 2


def _prepared(cxr, tmp_path: Path) -> Path:
    folder = cxr.make_vindr_folder(tmp_path / "raw", num_images=8)
    vindr_cxr.prepare(str(folder.images), str(folder.csv), str(tmp_path / "data"), image_size=64)
    return tmp_path / "data"


def _workflow(root: Path, dataset_dir: Path, **overrides) -> ConfigWorkflow:
    """The training workflow of the bundle copy ``root`` (6 training images, batch 3), initialised (start-up check
    included), its trainer built first in every run (construction order decides the initial weights)."""
    workflow = ConfigWorkflow(
        config_file=str(root / "configs" / "train.json"),
        workflow_type="train",
        bundle_root=str(root),
        dataset_dir=str(dataset_dir),
        batch_size=3,
        **{**TINY, **overrides},
    )
    workflow.initialize()
    assert workflow.trainer is not None
    return workflow


@pytest.mark.slow
def test_start_up_check_refuses_a_box_outside_its_image_unless_turned_off(cxr, tmp_path):
    dataset_dir = _prepared(cxr, tmp_path)
    root = _copy_bundle(tmp_path)
    datalist = dataset_dir / "datalist.json"
    content = json.loads(datalist.read_text())
    entry = next(item for item in content["training"] if item["box"])
    entry["box"][0][2] = 90.0  # x_max beyond the 64 px width of the prepared image
    datalist.write_text(json.dumps(content))
    with pytest.raises(RuntimeError) as stopped:  # MONAI wraps errors of the config's "initialize"
        _workflow(root, dataset_dir, epochs=1)
    message = str(stopped.value.__cause__)
    assert f"{dataset_dir / entry['image']}: image {entry['image_id']}: box" in message
    assert "outside the image of width 64 and height 64" in message and message.count("\n") == 1  # one problem
    workflow = _workflow(root, dataset_dir, epochs=1, validate_data=False)  # on by default, not forced
    workflow.run()  # training clips boxes to the image (ClipBoxToImaged)
    assert workflow.trainer.state.iteration == 2


@pytest.mark.slow
def test_nan_policy_skip_drops_the_bad_step_and_keeps_training(cxr, tmp_path, bundle_checks):
    from custom_nets.engines.detection import DetectionLoss

    dataset_dir = _prepared(cxr, tmp_path)
    root = _copy_bundle(tmp_path)
    loss = bundle_checks.NaNAt(DetectionLoss(), call=2)
    workflow = _workflow(root, dataset_dir, epochs=1, nan_policy="skip", loss=loss)
    before = {k: v.clone() for k, v in workflow.parser.get_parsed_content("network_def").state_dict().items()}
    workflow.run()
    assert loss.calls == 2 and workflow.trainer.state.iteration == 2
    (guard,) = [h for h in workflow.parser.get_parsed_content("train#handlers") if hasattr(h, "skipped")]
    assert guard.skipped == [2]
    state = torch.load(root / "outputs" / "checkpoints" / "checkpoint_final.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    head = "classification_head.cls_logits.weight"
    assert not torch.equal(state[head], before[head])  # the other step was applied


@pytest.mark.slow
def test_resume_from_an_epoch_checkpoint_ends_with_the_uninterrupted_weights(cxr, tmp_path, bundle_checks):
    dataset_dir = _prepared(cxr, tmp_path)
    reference_root = _copy_bundle(tmp_path / "reference")
    _workflow(reference_root, dataset_dir, epochs=2).run()
    root = _copy_bundle(tmp_path / "interrupted")
    interrupted = _workflow(root, dataset_dir, epochs=2)
    bundle_checks.terminate_after_epoch(interrupted, 1)
    interrupted.run()
    checkpoints = root / "outputs" / "checkpoints"
    resumed = _workflow(root, dataset_dir, epochs=2, resume=str(checkpoints / "checkpoint_epoch=1.pt"))
    resumed.run()
    bundle_checks.assert_same_final_checkpoint(root, reference_root, 4)


@pytest.mark.slow
def test_sigkill_mid_epoch_leaves_loadable_checkpoints_and_resumes_exactly(cxr, tmp_path, bundle_checks):
    """``python -m monai.bundle run`` killed with SIGKILL after iteration 3 (epoch 2 of 2 iterations): the epoch-1
    checkpoint is whole, no temporary file remains, and resuming from it ends with the uninterrupted weights."""
    dataset_dir = _prepared(cxr, tmp_path)
    reference_root = _copy_bundle(tmp_path / "reference")
    _workflow(reference_root, dataset_dir, epochs=2).run()
    root = _copy_bundle(tmp_path / "killed")
    settings = {"bundle_root": str(root), "dataset_dir": str(dataset_dir), "batch_size": 3, **TINY, "epochs": 2}
    bundle_checks.train_until_sigkill([root / "configs" / "train.json"], settings, 3, tmp_path)
    left = bundle_checks.assert_one_whole_checkpoint_left(root, iteration=2)
    assert left.name == "checkpoint_epoch=1.pt"
    _workflow(root, dataset_dir, epochs=2, resume=str(left)).run()
    bundle_checks.assert_same_final_checkpoint(root, reference_root, 4)


@pytest.mark.slow
def test_skip_bad_trains_past_an_unreadable_image_and_lists_it(cxr, tmp_path):
    """``skip_bad``: an unreadable training image is left out, listed in ``skipped_items.json`` and when training
    ends; training goes on with the other images."""
    dataset_dir = _prepared(cxr, tmp_path)
    root = _copy_bundle(tmp_path)
    content = json.loads((dataset_dir / "datalist.json").read_text())
    bad = content["training"][1]
    (dataset_dir / bad["image"]).write_bytes(b"not an image")
    workflow = _workflow(root, dataset_dir, epochs=1, skip_bad=True)
    images = [item["image"] for item in workflow.parser.get_parsed_content("train#data")]
    assert images == [str(dataset_dir / item["image"]) for item in content["training"] if item is not bad]
    workflow.run()
    assert workflow.trainer.state.iteration > 0
    (skipped,) = json.loads((root / "outputs" / "skipped_items.json").read_text())["skipped"]
    assert (skipped["key"], skipped["position"], skipped["item"]) == ("training", 1, bad)
    assert f"{dataset_dir / bad['image']}: cannot read it as a radiograph" in skipped["problem"]
    (at_the_end,) = workflow.finalize()
    assert at_the_end == [f"[training] item 1: {skipped['problem']}"]


@pytest.mark.slow
def test_train_and_evaluate_write_only_under_output_dir(cxr, tmp_path, bundle_checks, monkeypatch):
    """Train + evaluate run from the repository's bundle folder and an empty working directory, with ``output_dir``
    and ``ckpt_dir`` in another folder: nothing is written elsewhere (bundle, raw, dataset and working directory
    untouched)."""
    dataset_dir = _prepared(cxr, tmp_path)
    outputs, cwd = tmp_path / "outputs", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    watched = (BUNDLE, tmp_path / "raw", dataset_dir, cwd)
    before = bundle_checks.snapshot(*watched)
    common = {"dataset_dir": str(dataset_dir), "output_dir": str(outputs), "ckpt_dir": str(outputs / "models"), **TINY}
    with bundle_checks.log_to(outputs / "run.log"):
        _run(BUNDLE, ["train.json"], epochs=1, batch_size=3, **common)
        _run(BUNDLE, ["train.json", "evaluate.json"], **common)
    bundle_checks.assert_confined(before, bundle_checks.snapshot(*watched), outputs)
    written = {p.relative_to(outputs).parts[0] for p in outputs.rglob("*") if p.is_file()}
    assert written >= {"models", "checkpoints", "tensorboard", "eval", "run.log"}


@pytest.mark.slow
def test_inference_skip_bad_detects_on_the_good_images_and_lists_the_bad_one(tmp_path, bundle_checks):
    """``skip_bad`` at inference: of three radiographs, a text file named ``.png`` is left out, listed in
    ``skipped_items.json`` and when the run ends; the other two get their detections. Without ``skip_bad`` the
    start-up check stops the run on it."""
    root = _copy_bundle(tmp_path)
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "c"):
        Image.fromarray(rng.integers(0, 255, (48, 40), dtype=np.uint8)).save(folder / f"{name}.png")
    bad = folder / "b.png"
    bad.write_text("not an image")
    workflow, skipped = bundle_checks.inference_stops_then_skips(
        root, f"{bad}: cannot read it as a radiograph", dataset_dir=str(folder), **TINY
    )
    output = root / "outputs" / "inference"
    assert sorted(p.name for p in output.glob("*.json")) == ["a.json", "c.json", "skipped_items.json"]
    assert skipped["item"] == {"image": str(bad)} and skipped["problem"].startswith(f"{bad}: cannot read it")
    (at_the_end,) = workflow.finalize()
    assert at_the_end == [f"[inference] item 1: {skipped['problem']}"]
