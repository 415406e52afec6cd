"""End-to-end: prepare -> train (2 iterations) -> evaluate -> infer for finetune_heart and finetune_brainseg.

Runs ``monai.bundle.run`` in-process on tiny generated volumes whose affine is not RAS, so the predictions must be
reoriented back (Invertd) to keep the input geometry. Also checks the ConfigWorkflow properties (MONAI Label reads
inference.json alone) and the metadata fields.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, run, verify_net_in_out

from custom_nets.command_line import input_error_in
from custom_nets.datasets import brats, mmwhs
from custom_nets.nets.slice_encoder import SliceEncoder

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
TINY = {
    "encoder_depth": 18,
    "decoder_channels": [16, 16, 8, 8, 8],
    "image_size": [32, 32],
    "num_workers": 0,
    "sw_batch_size": 8,
}
CASES = {
    "heart": {"bundle": "finetune_heart", "overrides": {}, "out_channels": 8},
    "brain_multimodal_2p5d": {
        "bundle": "finetune_brainseg",
        "overrides": {"modalities": ["flair", "t1ce"], "num_slices": 3},
        "out_channels": 2,
    },
    "brain_regions": {"bundle": "finetune_brainseg", "overrides": {"label_mode": "regions"}, "out_channels": 3},
}


def _copy_bundle(name: str, tmp_path: Path) -> Path:
    root = tmp_path / name
    shutil.copytree(BUNDLES / name, root, ignore=shutil.ignore_patterns("models", "outputs"))
    return root


def _one_epoch_workflow(root: Path, dataset_dir: Path, **overrides) -> ConfigWorkflow:
    """The training workflow of the bundle copy ``root``: one epoch of 2 slices per volume, batch 1, tiny network."""
    return ConfigWorkflow(
        config_file=str(root / "configs" / "train.json"),
        workflow_type="train",
        bundle_root=str(root),
        dataset_dir=str(dataset_dir),
        epochs=1,
        batch_size=1,
        slices_per_volume=2,
        **{**TINY, **overrides},
    )


def _prepare(case: str, tmp_path: Path, seg_data) -> tuple[Path, Path]:
    """Returns (prepared dataset_dir, raw folder holding the test case's image)."""
    if case == "heart":
        raw = seg_data.make_heart_folder(tmp_path / "raw")
        mmwhs.prepare(str(raw), str(tmp_path / "data"), split="random", val_fraction=0.25, test_fraction=0.25)
    else:
        raw = seg_data.make_brats_folder(tmp_path / "raw")
        modalities = CASES[case]["overrides"].get("modalities", ["flair"])
        brats.prepare(str(raw), str(tmp_path / "data"), modalities=modalities, val_fraction=0.25, test_fraction=0.25)
    return tmp_path / "data", raw


def _run(root: Path, configs: list[str], **overrides) -> None:
    run(
        config_file=[str(root / "configs" / c) for c in configs],
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=str(root / "configs" / "logging.conf"),
        bundle_root=str(root),
        **overrides,
    )


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_train_evaluate_infer(case, tmp_path, seg_data):
    spec = CASES[case]
    root = _copy_bundle(spec["bundle"], tmp_path)
    dataset_dir, raw = _prepare(case, tmp_path, seg_data)
    common = {"dataset_dir": str(dataset_dir), **TINY, **spec["overrides"]}
    extra = {}
    if case == "heart":  # start from "pretrained" weights exported by pretrain_joint (flat slice_encoder.* keys)
        encoder = SliceEncoder(depth=18, embed_dim=16)
        torch.save({f"slice_encoder.{k}": v for k, v in encoder.state_dict().items()}, tmp_path / "export.pt")
        extra["pretrained_ckpt"] = str(tmp_path / "export.pt")

    _run(root, ["train.json"], epochs=1, batch_size=1, slices_per_volume=2, val_interval=1, **common, **extra)
    state = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert state["segmentation_head.0.weight"].shape[0] == spec["out_channels"]
    assert (root / "outputs" / "checkpoints" / "checkpoint_final.pt").is_file()
    if case == "heart":
        assert not torch.equal(state["encoder.trunk.conv1.weight"], encoder.trunk.conv1.weight)  # it trained
        final = root / "outputs" / "checkpoints" / "checkpoint_final.pt"
        checkpoint = torch.load(final, map_location="cpu", weights_only=True)
        assert checkpoint["trainer"]["iteration"] == 2  # 2 training volumes, batch 1, 1 epoch

    _run(root, ["train.json", "evaluate.json"], **common)
    eval_dir = root / "outputs" / "eval"
    with open(eval_dir / "cases.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and 0.0 <= float(rows[0]["iou_mean"]) <= 1.0
    summary = json.loads((eval_dir / "summary.json").read_text())
    assert summary["num_cases"] == 1 and "iou_mean" in summary["metrics"] and "hd95_mean" in summary["metrics"]
    assert len(list((eval_dir / "overlays").glob("*.png"))) == 1
    test_entry = json.loads((dataset_dir / "datalist.json").read_text())["testing"][0]
    test_image = dataset_dir / (test_entry["image"] if case == "heart" else test_entry["image"][0])
    (prediction,) = (eval_dir / "predictions").glob("*.nii.gz")
    _assert_same_geometry(prediction, test_image, spec["out_channels"], regions=case == "brain_regions")

    infer_dir = tmp_path / "infer_in"
    infer_dir.mkdir()
    if case == "brain_multimodal_2p5d":  # one multi-channel file, as MONAI Label sends it
        channels = [nib.load(str(dataset_dir / p)).get_fdata() for p in test_entry["image"]]
        nib.save(nib.Nifti1Image(np.stack(channels, -1).astype(np.float32), seg_data.AFFINE), infer_dir / "x.nii.gz")
    else:
        shutil.copy(test_image, infer_dir / "x.nii.gz")
    _run(root, ["inference.json"], dataset_dir=str(infer_dir), image_pattern="*.nii.gz", **TINY, **spec["overrides"])
    _assert_same_geometry(
        root / "outputs" / "inference" / "x_seg.nii.gz", test_image, spec["out_channels"], case == "brain_regions"
    )


def _assert_same_geometry(prediction: Path, image: Path, out_channels: int, regions: bool) -> None:
    pred, reference = nib.load(str(prediction)), nib.load(str(image))
    assert np.allclose(pred.affine, reference.affine)
    values = np.unique(np.asarray(pred.dataobj))
    if regions:
        assert pred.shape == (*reference.shape, 3) and set(values.tolist()) <= {0, 1}
    else:
        assert pred.shape == reference.shape and values.min() >= 0 and values.max() < out_channels


@pytest.mark.parametrize("bundle", ["finetune_heart", "finetune_brainseg"])
def test_workflow_properties_and_metadata(bundle, tmp_path, seg_data):
    root = _copy_bundle(bundle, tmp_path)  # instantiating handlers creates their output folders
    dataset_dir, _ = _prepare("heart" if bundle == "finetune_heart" else "brain_regions", tmp_path, seg_data)
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
            datalist=str(dataset_dir / "datalist.json"),
            depth=18,
        )
        workflow.initialize()
        assert workflow.check_properties() == [], (bundle, configs)
    inference_text = (root / "configs" / "inference.json").read_text()
    assert '"%' not in inference_text  # no macro pulling content from another file
    verify_net_in_out(  # metadata's network_data_format matches the network (as MONAI Label and the zoo check it)
        net_id="network_def",
        meta_file=meta,
        config_file=str(root / "configs" / "inference.json"),
        bundle_root=str(root),
        depth=18,
    )
    metadata = json.loads(Path(meta).read_text())
    schema = json.loads((BUNDLES / "metadata_schema.json").read_text())
    assert set(schema.get("required", [])) <= set(metadata)
    assert metadata["version"] in metadata["changelog"]
    assert "custom_nets" in metadata["required_packages_version"]
    config = json.loads((root / "configs" / "train.json").read_text())
    vocabulary = ["bundle_root", "dataset_dir", "datalist", "output_dir", "device", "epochs", "batch_size",
                  "num_workers", "amp", "num_slices", "image_size", "pretrained_ckpt", "resume", "init_ckpt",
                  "seed"]  # fmt: skip
    assert list(config)[1 : 1 + len(vocabulary)] == vocabulary
    for name in ("LICENSE", "large_files.yml", "docs/README.md", "docs/data_license.txt", "configs/logging.conf"):
        assert (root / name).is_file(), name
    assert not (BUNDLES / bundle / "models" / "model.pt").exists()  # no faked weights in the repository


@pytest.mark.flaky(reruns=1, only_rerun=["SIGABRT", "Signal 6", "ChildFailedError"])  # see pyproject.toml
@pytest.mark.slow
def test_multi_gpu_overlay_trains_with_two_cpu_processes(tmp_path, seg_data, bundle_checks):
    """torchrun with 2 processes on the gloo backend: DistributedSampler, DDP, rank-0 checkpoints; ``init_ckpt`` is
    loaded on every process (at learning rate 0 the saved weights are the file's)."""
    root = _copy_bundle("finetune_heart", tmp_path)
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "train.json"))
    parser.update(TINY)
    start = {name: value + 0.5 for name, value in parser.get_parsed_content("network_def").state_dict().items()}
    torch.save(start, tmp_path / "start.pt")
    raw = seg_data.make_heart_folder(tmp_path / "raw", case_ids=tuple(range(1001, 1007)))
    mmwhs.prepare(str(raw), str(tmp_path / "data"), split="random", val_fraction=0.3, test_fraction=0.3)
    configs = json.dumps([str(root / "configs" / c) for c in ("train.json", "multi_gpu_train.json")])
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
    ]
    command += ["--config_file", configs, "--meta_file", str(root / "configs" / "metadata.json")]
    command += ["--logging_file", str(root / "configs" / "logging.conf"), "--bundle_root", str(root)]
    command += ["--dataset_dir", str(tmp_path / "data"), "--epochs", "1", "--batch_size", "1", "--val_interval", "1"]
    command += ["--slices_per_volume", "2", "--init_ckpt", str(tmp_path / "start.pt"), "--learning_rate", "0.0"]
    for key, value in TINY.items():
        command += [f"--{key}", json.dumps(value)]
    cpu_only = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # two CPU processes also on a machine with one GPU
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=cpu_only)
    assert result.returncode == 0, bundle_checks.torchrun_failure(result.stderr)
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert "encoder.trunk.conv1.weight" in state  # DDP's "module." prefix is not saved
    parameters = [name for name in start if "running_" not in name and "num_batches_tracked" not in name]
    assert len(parameters) == len(list(parser.get_parsed_content("network_def").parameters()))
    assert all(torch.equal(state[name], start[name]) for name in parameters)
    checkpoint = torch.load(root / "outputs" / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 1  # 2 training volumes shared by 2 processes


@pytest.mark.slow
def test_skip_bad_trains_past_a_bad_pair_and_lists_it(tmp_path, seg_data):
    """``skip_bad``: a training pair whose label holds a value out of range is left out, listed in the log, in
    ``skipped_items.json`` and again when training ends; the run trains on the others."""
    root = _copy_bundle("finetune_heart", tmp_path)
    dataset_dir, _ = _prepare("heart", tmp_path, seg_data)
    datalist = json.loads((dataset_dir / "datalist.json").read_text())
    bad, good = datalist["training"][:2]
    label = nib.load(dataset_dir / bad["label"])
    values = np.asarray(label.dataobj).copy()
    values[0, 0, 0] = 42  # not a class index of the 8 heart classes
    nib.save(nib.Nifti1Image(values, label.affine), str(dataset_dir / bad["label"]))
    workflow = _one_epoch_workflow(root, dataset_dir, skip_bad=True)
    workflow.initialize()
    assert [item["label"] for item in workflow.parser.get_parsed_content("train#data")] == [
        str(dataset_dir / good["label"])
    ]
    workflow.run()
    assert workflow.trainer.state.iteration > 0
    report = json.loads((root / "outputs" / "skipped_items.json").read_text())
    (skipped,) = report["skipped"]
    assert (skipped["key"], skipped["position"], skipped["item"]) == ("training", 0, bad)
    assert f"{dataset_dir / bad['label']}" in skipped["problem"] and "42" in skipped["problem"]
    (at_the_end,) = workflow.finalize()
    assert at_the_end == [f"[training] item 0: {skipped['problem']}"]


@pytest.mark.flaky(reruns=1, only_rerun=["SIGABRT", "Signal 6", "ChildFailedError"])  # see pyproject.toml
@pytest.mark.slow
def test_multi_gpu_overlay_skips_a_bad_pair_on_every_process(tmp_path, seg_data, bundle_checks):
    """torchrun with 2 processes and ``skip_bad``: every process checks and trains on the same usable datalist, rank
    0 lists the skipped pair when training ends."""
    root = _copy_bundle("finetune_heart", tmp_path)
    raw = seg_data.make_heart_folder(tmp_path / "raw", case_ids=tuple(range(1001, 1007)))
    mmwhs.prepare(str(raw), str(tmp_path / "data"), split="random", val_fraction=0.3, test_fraction=0.3)
    bad = json.loads((tmp_path / "data" / "datalist.json").read_text())["training"][0]
    (tmp_path / "data" / bad["image"]).write_bytes(b"truncated")
    configs = json.dumps([str(root / "configs" / c) for c in ("train.json", "multi_gpu_train.json")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "monai.bundle", "run", "--config_file", configs]
    command += ["--meta_file", str(root / "configs" / "metadata.json"), "--bundle_root", str(root)]
    command += ["--logging_file", str(root / "configs" / "logging.conf"), "--dataset_dir", str(tmp_path / "data")]
    command += ["--epochs", "1", "--batch_size", "1", "--val_interval", "1", "--slices_per_volume", "2"]
    command += ["--skip_bad", "true"]
    for key, value in TINY.items():
        command += [f"--{key}", json.dumps(value)]
    cpu_only = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=cpu_only)
    assert result.returncode == 0, bundle_checks.torchrun_failure(result.stderr)
    (skipped,) = json.loads((root / "outputs" / "skipped_items.json").read_text())["skipped"]
    assert skipped["item"] == bad and f"{tmp_path / 'data' / bad['image']}" in skipped["problem"]
    assert (result.stdout + result.stderr).count("were left out of this run") == 1  # rank 0, at the end
    checkpoint = torch.load(root / "outputs" / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 1  # 1 usable training volume, padded to 2 for 2 processes


@pytest.mark.slow
def test_start_up_check_refuses_stretched_axial_pixels_unless_turned_off(tmp_path, seg_data):
    """The heart bundle's data_expectations are checked at start-up by default: a training pair whose axial pixels are
    0.5 x 2 mm (ratio 4 > max_inplane_anisotropy 3) stops the run with one problem naming the image;
    ``validate_data false`` turns the check off and the same data trains."""
    from custom_nets.data import DatalistError

    root = _copy_bundle("finetune_heart", tmp_path)
    dataset_dir, _ = _prepare("heart", tmp_path, seg_data)
    item = json.loads((dataset_dir / "datalist.json").read_text())["training"][0]
    stretched = np.diag([0.5, 2.0, 2.5, 1.0])
    for key in ("image", "label"):
        path = dataset_dir / item[key]
        nib.save(nib.Nifti1Image(np.asarray(nib.load(path).dataobj), stretched), str(path))

    with pytest.raises(RuntimeError) as error:  # MONAI wraps what a config expression raises
        _one_epoch_workflow(root, dataset_dir).initialize()
    cause = error.value.__cause__
    assert isinstance(cause, DatalistError), error.value
    (problem,) = cause.problems
    assert str(dataset_dir / item["image"]) in problem and "axial pixels of 0.5 x 2 mm (ratio 4 > 3" in problem
    unchecked = _one_epoch_workflow(root, dataset_dir, validate_data=False)
    unchecked.initialize()
    unchecked.run()
    assert unchecked.trainer.state.iteration > 0


@pytest.mark.slow
@pytest.mark.parametrize("bundle, suffix", [("finetune_heart", ""), ("finetune_brainseg", "_flair")])
def test_inference_skip_bad_segments_the_good_images_and_lists_the_bad_one(bundle, suffix, tmp_path, bundle_checks):
    """``skip_bad`` at inference: of three images, the one with a NaN voxel is left out, listed in
    ``skipped_items.json`` and when the run ends; the other two are segmented. Without ``skip_bad`` the start-up
    check stops the run on it."""
    root = _copy_bundle(bundle, tmp_path)
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    volumes = {name: rng.random((32, 32, 4), dtype=np.float32) for name in ("a", "b", "c")}
    volumes["b"][3, 3, 1] = np.nan
    for name, volume in volumes.items():
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(folder / f"{name}{suffix}.nii.gz"))
    bad = folder / f"b{suffix}.nii.gz"
    workflow, skipped = bundle_checks.inference_stops_then_skips(
        root, f"{bad}: NaN or infinite voxel values", dataset_dir=str(folder), **TINY
    )
    output = root / "outputs" / "inference"
    assert sorted(p.name for p in output.glob("*_seg.nii.gz")) == [f"a{suffix}_seg.nii.gz", f"c{suffix}_seg.nii.gz"]
    assert skipped["item"] == {"image": str(bad)} and skipped["problem"].startswith(f"{bad}: NaN or infinite")
    (at_the_end,) = workflow.finalize()
    assert at_the_end == [f"[inference] item 1: {skipped['problem']}"]


@pytest.mark.parametrize("bundle", ["finetune_heart", "finetune_brainseg"])
def test_fused_optimizer_switch_gives_the_same_update_up_to_rounding(bundle):
    """``fused_optimizer`` (default true) builds AdamW with torch's fused kernel; false builds the per-parameter loop.
    One step from the same weights and gradients lands on the same weights up to rounding."""
    updated = {}
    for fused in (True, False):
        parser = ConfigParser()
        parser.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
        parser.update({"encoder_depth": 18, "decoder_channels": [16, 16, 8, 8, 8], "fused_optimizer": fused})
        torch.manual_seed(0)
        network = parser.get_parsed_content("network_def")
        optimizer = parser.get_parsed_content("optimizer")  # over the parameters of `network` (parsed once)
        assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {
            id(p) for p in network.parameters()
        }
        assert optimizer.defaults["fused"] is (True if fused else None)
        generator = torch.Generator().manual_seed(1)
        for parameter in network.parameters():
            parameter.grad = torch.randn(parameter.shape, generator=generator)
        for _ in range(3):
            optimizer.step()
        updated[fused] = [parameter.detach().clone() for parameter in network.parameters()]
    for fused_value, loop_value in zip(updated[True], updated[False], strict=True):
        torch.testing.assert_close(fused_value, loop_value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["heart", "brain_regions"])
def test_init_ckpt_starts_training_from_a_whole_network_file(case, tmp_path, seg_data):
    """``init_ckpt`` loads a whole U-Net (e.g. a fine-tuned ``models/model.pt``, encoder and decoder) before the
    first iteration. With a learning rate of 0 the weights stay those of the file to the last bit. An encoder-only
    pretraining export given there is refused with the key to use instead."""
    spec = CASES[case]
    root = _copy_bundle(spec["bundle"], tmp_path)
    dataset_dir, _ = _prepare(case, tmp_path, seg_data)
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "train.json"))
    parser.update({**TINY, **spec["overrides"]})
    start = {name: value + 0.5 for name, value in parser.get_parsed_content("network_def").state_dict().items()}
    torch.save(start, tmp_path / "start.pt")

    export = {f"slice_encoder.{k}": v for k, v in SliceEncoder(depth=18, embed_dim=16).state_dict().items()}
    torch.save(export, tmp_path / "export.pt")
    wrong = _one_epoch_workflow(root, dataset_dir, init_ckpt=str(tmp_path / "export.pt"), **spec["overrides"])
    wrong.initialize()
    with pytest.raises(RuntimeError) as refused:  # before the first iteration; MONAI wraps the check's error
        wrong.run()
    problem = str(input_error_in(refused.value))  # what the command line prints, without a traceback
    assert "export.pt is a pretraining export" in problem and "give it as pretrained_ckpt" in problem

    workflow = _one_epoch_workflow(
        root, dataset_dir, init_ckpt=str(tmp_path / "start.pt"), learning_rate=0.0, **spec["overrides"]
    )
    workflow.initialize()
    workflow.run()
    trained = dict(workflow.parser.get_parsed_content("network").named_parameters())
    assert trained and all(torch.equal(trained[name].detach().cpu(), start[name]) for name in trained)
    workflow.finalize()


def test_train_slices_drop_meta_data_after_the_cache_and_stay_the_same(tmp_path, seg_data):
    """The random slice transforms run on plain tensors (``EnsureTyped(track_meta=False)`` first, cached with the
    volume): about a third less loading time per slice in the demo, and the same slices, bit for bit, as the pipeline
    that carries the meta data through."""
    dataset_dir, _ = _prepare("heart", tmp_path, seg_data)
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "finetune_heart" / "configs" / "train.json"))
    parser.update({**TINY, "dataset_dir": str(dataset_dir), "slices_per_volume": 3})
    first, *rest = parser["train#slice_transforms"]
    assert first["_target_"] == "EnsureTyped" and first["track_meta"] is False
    drawn = {}
    for name, slice_transforms in (("plain", [first, *rest]), ("meta", rest)):
        parser["train#slice_transforms"] = slice_transforms
        dataset = parser.get_parsed_content("train#dataset", lazy=False)
        dataset.transform.set_random_state(seed=0)
        drawn[name] = [sample for index in range(len(dataset)) for _ in range(4) for sample in dataset[index]]
    assert len(drawn["plain"]) == len(drawn["meta"]) > 0
    for plain, meta in zip(drawn["plain"], drawn["meta"], strict=True):
        for key in ("image", "label"):
            assert torch.equal(plain[key], meta[key])
