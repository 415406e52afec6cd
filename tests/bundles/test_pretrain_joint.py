"""End-to-end runs of the pretrain_joint bundle on tiny generated data: train (mixed, 2D only, 3D only, SwAV and
DeepCluster-v2), resume, 2-process DDP, embedding inference, export, and the bundle checks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import create_workflow

from custom_nets.data import make_demo_corpus
from custom_nets.nets import SliceEncoder, SliceTransformer
from custom_nets.weights import export_pretrained, load_slice_encoder_weights, load_slice_transformer_weights

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "pretrain_joint"
TRAIN = str(BUNDLE / "configs" / "train.json")
INFERENCE = str(BUNDLE / "configs" / "inference.json")
PRESETS = BUNDLE / "configs" / "presets"
TINY = {
    "encoder_depth": 18,
    "embed_dim": 32,
    "projection_dim": 16,
    "image_size": 32,
    "volume_size": 32,
    "small_crop_size": 16,
    "num_small_crops": 1,
    "num_slices": 8,
    "images_per_batch": 2,
    "volumes_per_batch": 2,
    "num_workers": 0,
    "intra_prototypes": [8],
    "inter_prototypes": [4],
    "freeze_prototypes_iterations": 1,
    "warmup_epochs": 0,
    "epochs": 1,
    "amp": False,
    "train#trainer#epoch_length": 2,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_corpus(tmp_path_factory.mktemp("corpus"), num_per_class=1, in_plane=32, image_size=32)


def train(corpus: Path, output_dir: Path, config_files: list[str] | None = None, **overrides: object):
    settings = {"dataset_dir": str(corpus.parent), "datalist": str(corpus), **TINY, **overrides}
    workflow = create_workflow(
        config_file=config_files or [TRAIN],
        workflow_type="train",
        bundle_root=str(BUNDLE),
        output_dir=str(output_dir),
        **settings,
    )
    assert workflow.check_properties() == []
    workflow.run()
    workflow.finalize()
    return workflow


def loss_history(workflow) -> list[dict]:
    handlers = workflow.parser.get_parsed_content("train#handlers")
    return next(h for h in handlers if type(h).__name__ == "LossTermsHandler").history


@pytest.mark.slow
def test_mixed_swav_run_saves_checkpoint_and_logs(corpus: Path, tmp_path: Path) -> None:
    workflow = train(corpus, tmp_path)
    assert workflow.trainer.state.iteration == 2
    terms = loss_history(workflow)[-1]
    assert all(math.isfinite(terms[name]) and terms[name] > 0 for name in ("intra", "inter", "mask", "total"))
    checkpoint = torch.load(tmp_path / "model_final.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "trainer", "loss"} <= set(checkpoint)
    assert checkpoint["trainer"]["iteration"] == 2
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("images_per_batch", "volumes_per_batch", "present"),
    [(2, 0, {"intra"}), (0, 2, {"intra", "inter", "mask"})],
    ids=["2d-only", "3d-only"],
)
def test_single_kind_batches(corpus, tmp_path, images_per_batch, volumes_per_batch, present) -> None:
    workflow = train(corpus, tmp_path, images_per_batch=images_per_batch, volumes_per_batch=volumes_per_batch)
    terms = loss_history(workflow)[-1]
    assert {name for name in ("intra", "inter", "mask") if terms[name] > 0} == present


@pytest.mark.slow
def test_deepcluster_runs_kmeans_and_trains(corpus: Path, tmp_path: Path) -> None:
    workflow = train(
        corpus,
        tmp_path,
        config_files=[TRAIN, str(PRESETS / "deepcluster.json")],
        intra_prototypes=[6, 5],
        inter_prototypes=[2],
        epochs=2,
    )
    history = loss_history(workflow)
    assert history[0]["intra"] == 0.0  # the memory bank is empty until the first k-means (epoch 2 start)
    assert history[1]["intra"] > 0 and history[1]["inter"] > 0  # targets exist once k-means has run


@pytest.mark.slow
def test_resume_continues_from_saved_iteration(corpus: Path, tmp_path: Path) -> None:
    train(corpus, tmp_path)
    resumed = train(corpus, tmp_path, epochs=2, resume=True)
    assert resumed.trainer.state.epoch == 2
    assert resumed.trainer.state.iteration == 4


def test_resume_without_checkpoint_is_a_clear_error(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as raised:
        train(corpus, tmp_path / "empty", resume=True)
    causes, error = [], raised.value
    while error is not None:
        causes.append(str(error))
        error = error.__cause__
    assert any("holds no checkpoint" in message and "empty" in message for message in causes)


@pytest.mark.slow
def test_inference_and_export(corpus: Path, tmp_path: Path) -> None:
    train(corpus, tmp_path / "run")
    exported = export_pretrained(tmp_path / "run" / "model_final.pt", tmp_path / "model.pt", {"preset": "tiny"})
    provenance = json.loads(exported.with_suffix(".json").read_text())
    assert provenance["iteration"] == 2 and provenance["preset"] == "tiny"
    encoder_report = load_slice_encoder_weights(SliceEncoder(depth=18, embed_dim=32), exported)
    transformer_report = load_slice_transformer_weights(SliceTransformer(embed_dim=32), exported)
    assert encoder_report.missing == [] and transformer_report.missing == []

    workflow = create_workflow(
        config_file=INFERENCE,
        workflow_type="inference",
        bundle_root=str(BUNDLE),
        dataset_dir=str(corpus.parent),
        datalist=str(corpus),
        output_dir=str(tmp_path / "embeddings"),
        ckpt_path=str(exported),
        encoder_depth=18,
        embed_dim=32,
        image_size=32,
        volume_size=32,
        num_workers=0,
        per_slice=True,
    )
    assert workflow.check_properties() == []
    workflow.run()
    embeddings = np.load(tmp_path / "embeddings" / "embeddings.npy")
    rows = (tmp_path / "embeddings" / "embeddings.csv").read_text().splitlines()
    items = json.loads(corpus.read_text())["training"]
    assert embeddings.shape == (len(items), 32) and len(rows) == len(items) + 1
    assert rows[0] == "row,source_image,global_index,kind,modality,class_label"
    volumes = [i for i, line in enumerate(rows[1:]) if ",volume," in line]
    per_slice = np.load(tmp_path / "embeddings" / "slice_embeddings" / f"{volumes[0]}.npy")
    assert per_slice.ndim == 2 and per_slice.shape[1] == 32
    np.testing.assert_allclose(np.linalg.norm(embeddings[volumes], axis=1), 1.0, rtol=1e-5)


def run_module(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_metadata_and_network_io_verify() -> None:
    meta = str(BUNDLE / "configs" / "metadata.json")
    schema = str(REPO / "bundles" / "metadata_schema.json")
    verified = run_module("monai.bundle", "verify_metadata", "--meta_file", meta, "--filepath", schema)
    assert verified.returncode == 0, verified.stderr[-2000:]
    net_io = run_module(
        "monai.bundle",
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        meta,
        "--config_file",
        INFERENCE,
        "--encoder_depth",
        "18",
    )
    assert net_io.returncode == 0, net_io.stderr[-2000:]


@pytest.fixture
def tiny_args(tmp_path: Path, corpus: Path) -> Path:
    args = {**TINY, "dataset_dir": str(corpus.parent), "datalist": str(corpus), "bundle_root": str(BUNDLE)}
    path = tmp_path / "tiny_args.json"
    path.write_text(json.dumps(args))
    return path


@pytest.mark.slow
def test_bundle_run_command_line(tmp_path: Path, tiny_args: Path) -> None:
    result = run_module(
        "monai.bundle",
        "run",
        "--config_file",
        TRAIN,
        "--args_file",
        str(tiny_args),
        "--output_dir",
        str(tmp_path / "cli_run"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "cli_run" / "model_final.pt").is_file()


@pytest.mark.slow
def test_two_process_ddp_trains_saves_once_logs_once(tmp_path: Path, tiny_args: Path) -> None:
    output_dir = tmp_path / "ddp"
    config = f"['{TRAIN}','{BUNDLE / 'configs' / 'multi_gpu_train.json'}']"
    result = run_module(
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        config,
        "--args_file",
        str(tiny_args),
        "--output_dir",
        str(output_dir),
        timeout=900,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert (output_dir / "model_final.pt").is_file()
    assert len(list((output_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert log.count("Epoch: 1/1, Iter: 1/2") == 1  # StatsHandler on rank 0 only
    checkpoint = torch.load(output_dir / "model_final.pt", map_location="cpu", weights_only=True)
    assert not any(key.startswith("module.") for key in checkpoint["model"])


@pytest.mark.slow
def test_skip_bad_trains_past_a_corrupt_item_and_lists_it(corpus: Path, tmp_path: Path) -> None:
    content = json.loads(corpus.read_text())
    items = [{**item, "image": str(corpus.parent / item["image"])} for item in content["training"]]
    (tmp_path / "broken.nii.gz").write_bytes(b"truncated")
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({**content, "training": [*items, {"image": str(tmp_path / "broken.nii.gz")}]}))
    with pytest.raises(Exception) as stopped:  # the start-up check stops a run by default
        train(corpus, tmp_path / "strict", datalist=str(datalist))
    assert "broken.nii.gz: unreadable NIfTI header" in str(stopped.value.__cause__ or stopped.value)
    workflow = train(corpus, tmp_path / "lenient", datalist=str(datalist), skip_bad=True)
    assert workflow.trainer.state.iteration == 2
    skipped = json.loads((tmp_path / "lenient" / "skipped_items.json").read_text())["skipped"]
    assert [entry["item"]["image"] for entry in skipped] == [str(tmp_path / "broken.nii.gz")]


IDENTIFIERS = {
    "PatientName": "Doe^Janet",
    "PatientID": "PID-98765",
    "PatientBirthDate": "19610203",
    "AccessionNumber": "ACC-55555",
    "InstitutionName": "St Example Hospital",
}


def _outputs_text(folder: Path) -> bytes:
    """Every byte under ``folder``: files as stored, gzip members decompressed, checkpoint zips' members read."""
    import gzip
    import zipfile

    chunks = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        chunks.append(str(path.relative_to(folder)).encode())
        data = path.read_bytes()
        chunks.append(data)
        if data[:2] == b"\x1f\x8b":
            chunks.append(gzip.decompress(data))
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                chunks.extend(archive.read(name) for name in archive.namelist())
    return b"\n".join(chunks)


@pytest.mark.slow
def test_dicom_identifiers_never_reach_the_outputs(corpus: Path, tmp_path: Path) -> None:
    """A DICOM series full of patient identifiers goes through pretraining, export and embedding inference; no
    identifier appears in any output file, file name, log line or checkpoint."""
    import logging

    import pydicom

    from custom_nets.data.demo import _write_dicom_series

    series = tmp_path / "data" / "series"
    volume = (np.random.default_rng(0).random((32, 32, 10)) * 1000).astype(np.int16)
    _write_dicom_series(series, volume, (1.0, 1.0, 2.0), "CT", "identified")
    for path in series.iterdir():
        dataset = pydicom.dcmread(path)
        for tag, value in IDENTIFIERS.items():
            setattr(dataset, tag, value)
        dataset.save_as(path, enforce_file_format=True)
    content = json.loads(corpus.read_text())
    items = [{**item, "image": str(corpus.parent / item["image"])} for item in content["training"]]
    first_volume = next(i for i, item in enumerate(items) if item["kind"] == "volume")
    items[first_volume] = {**items[first_volume], "image": str(series)}
    datalist = tmp_path / "data" / "datalist.json"
    datalist.write_text(json.dumps({**content, "training": items}))

    log_file = tmp_path / "outputs" / "run.log"
    log_file.parent.mkdir()
    handler = logging.FileHandler(log_file)
    logging.getLogger().addHandler(handler)
    try:
        train(corpus, tmp_path / "outputs" / "run", datalist=str(datalist))
        exported = export_pretrained(tmp_path / "outputs" / "run" / "model_final.pt", tmp_path / "outputs" / "model.pt")
        workflow = create_workflow(
            config_file=INFERENCE,
            workflow_type="inference",
            bundle_root=str(BUNDLE),
            dataset_dir=str(tmp_path / "data"),
            datalist=str(datalist),
            output_dir=str(tmp_path / "outputs" / "embeddings"),
            ckpt_path=str(exported),
            encoder_depth=18,
            embed_dim=32,
            image_size=32,
            volume_size=32,
            num_workers=0,
            per_slice=True,
        )
        workflow.run()
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert str(series) in (tmp_path / "outputs" / "embeddings" / "embeddings.csv").read_text()  # the series was read
    assert IDENTIFIERS["PatientID"].encode() in _outputs_text(tmp_path / "data")  # the search finds them in the input
    everything = _outputs_text(tmp_path / "outputs")
    for tag, value in IDENTIFIERS.items():
        for form in {value, value.replace("^", " ")}:
            assert form.encode() not in everything, (tag, form)
