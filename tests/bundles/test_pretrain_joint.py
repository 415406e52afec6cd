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
from ignite.engine import Events
from monai.bundle import create_workflow

from custom_nets.data import log_skipped_items, make_demo_corpus
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


def train(
    corpus: Path,
    output_dir: Path,
    config_files: list[str] | None = None,
    losses: list[float] | None = None,
    **overrides: object,
):
    """Run the TINY training with ``overrides``; ``losses``, when given, receives the loss of every iteration."""
    settings = {"dataset_dir": str(corpus.parent), "datalist": str(corpus), **TINY, **overrides}
    workflow = create_workflow(
        config_file=config_files or [TRAIN],
        workflow_type="train",
        bundle_root=str(BUNDLE),
        output_dir=str(output_dir),
        **settings,
    )
    assert workflow.check_properties() == []
    if losses is not None:
        workflow.trainer.add_event_handler(
            Events.ITERATION_COMPLETED, lambda engine: losses.append(engine.state.output["loss"].item())
        )
    workflow.run()
    workflow.finalize()
    return workflow


def embedding_workflow(datalist: Path, output_dir: Path, weights: Path | None, **overrides):
    """The inference bundle (per-slice embeddings) of the tiny network that ``train`` exports (random weights when
    ``weights`` is None), on ``datalist``."""
    return create_workflow(
        config_file=INFERENCE,
        workflow_type="inference",
        bundle_root=str(BUNDLE),
        dataset_dir=str(datalist.parent),
        datalist=str(datalist),
        output_dir=str(output_dir),
        ckpt_path=str(weights) if weights else "",
        encoder_depth=18,
        embed_dim=32,
        image_size=32,
        volume_size=32,
        num_workers=0,
        per_slice=True,
        **overrides,
    )


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
def test_dense_term_trains_and_is_logged(corpus: Path, tmp_path: Path) -> None:
    workflow = train(corpus, tmp_path, w_dense=0.5, dense_prototypes=6, dense_stage=3)
    terms = loss_history(workflow)[-1]
    assert math.isfinite(terms["dense"]) and terms["dense"] > 0
    network = workflow.parser.get_parsed_content("network_def")
    assert network.dense_prototypes[0].weight.shape == (6, TINY["projection_dim"])
    export = export_pretrained(tmp_path / "model_final.pt", tmp_path / "export.pt")
    encoder = SliceEncoder(depth=18, embed_dim=32)
    report = load_slice_encoder_weights(encoder, export)
    assert report.missing == [] and report.unexpected == []  # the dense head stays out of the export


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

    workflow = embedding_workflow(corpus, tmp_path / "embeddings", exported)
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


# The plain path: every fast-path switch of train.json off (pin_memory acts only with CUDA: the GPU check covers it).
# 64-pixel crops and no small crops give the 2D batch 2 x 2 stage-4 maps: batch norm over two 1 x 1 maps turns
# rounding differences into sign flips, and the losses of two runs would then drift apart after one step.
PLAIN_PATH = {
    "num_workers": 1,
    "persistent_workers": False,
    "channels_last": False,
    "fused_optimizer": False,
    "image_size": 64,
    "num_small_crops": 0,
}
SWITCH_IS_WIRED = {
    "persistent_workers": lambda parser: parser.get_parsed_content("train#dataloader").persistent_workers,
    "channels_last": lambda parser: parser.get_parsed_content("network_def").slice_encoder.channels_last,
    "fused_optimizer": lambda parser: parser.get_parsed_content("optimizer").defaults["fused"],
}


@pytest.fixture(scope="module")
def plain_path_losses(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    losses: list[float] = []
    workflow = train(corpus, tmp_path_factory.mktemp("plain_path"), losses=losses, **PLAIN_PATH)
    assert not any(wired(workflow.parser) for wired in SWITCH_IS_WIRED.values())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("switch", sorted(SWITCH_IS_WIRED))
def test_fast_path_switch_keeps_the_losses(
    corpus: Path, tmp_path: Path, plain_path_losses: list[float], switch: str
) -> None:
    losses: list[float] = []
    workflow = train(corpus, tmp_path, losses=losses, **{**PLAIN_PATH, switch: True})
    assert SWITCH_IS_WIRED[switch](workflow.parser)
    assert len(losses) == len(plain_path_losses) == 2
    assert losses[0] == pytest.approx(plain_path_losses[0], rel=1e-4)  # the same weights: rounding only
    assert losses[1] == pytest.approx(plain_path_losses[1], rel=1e-2)  # after one step: ~0.2 % for channels_last


@pytest.mark.slow
def test_group_views_trains(corpus: Path, tmp_path: Path) -> None:
    """group_views reaches the network and trains; its losses differ from the per-view path's (batch-norm statistics
    over both global views), so they are only checked to be finite."""
    losses: list[float] = []
    workflow = train(corpus, tmp_path, losses=losses, **{**PLAIN_PATH, "num_small_crops": 2, "group_views": True})
    assert workflow.parser.get_parsed_content("network_def").group_views
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


@pytest.mark.slow
def test_compile_slice_transformer_trains(corpus: Path, tmp_path: Path) -> None:
    """compile_slice_transformer reaches the network and trains in one graph: the loader's views reach the network as
    plain tensors (MONAI's MetaTensor broke the graph 24 times in two steps). The checkpoint keeps the eager weight
    names. The compiled dropout draws other random numbers than eager dropout, so the losses are only checked to be
    finite (tests/nets/test_nets_slice_transformer.py compares outputs and gradients with dropout 0)."""
    losses: list[float] = []
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    workflow = train(corpus, tmp_path, losses=losses, **{**PLAIN_PATH, "compile_slice_transformer": "default"})
    network = workflow.parser.get_parsed_content("network_def")
    assert network.slice_transformer._compiled_call_impl is not None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert not torch._dynamo.utils.counters["graph_break"]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    checkpoint = torch.load(tmp_path / "model_final.pt", map_location="cpu", weights_only=True)
    assert sorted(checkpoint["model"]) == sorted(network.state_dict())
    assert not any("_orig_mod" in key for key in checkpoint["model"])


def run_module(*args: str, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
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


def write_tiny_args(path: Path, corpus: Path) -> Path:
    """The TINY run as a ``--args_file`` for command-line runs."""
    args = {**TINY, "dataset_dir": str(corpus.parent), "datalist": str(corpus), "bundle_root": str(BUNDLE)}
    path.write_text(json.dumps(args))
    return path


@pytest.fixture
def tiny_args(tmp_path: Path, corpus: Path) -> Path:
    return write_tiny_args(tmp_path / "tiny_args.json", corpus)


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


# CPU kernels round differently with another thread count: torchrun pins OMP_NUM_THREADS to 1 only when it starts
# several processes per node, so every distributed run here pins it for bit-identical weights across launch layouts.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
DDP_CONFIG = f"['{TRAIN}','{BUNDLE / 'configs' / 'multi_gpu_train.json'}']"


def bundle_run_args(args_file: Path, output_dir: Path) -> list[str]:
    return [
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        DDP_CONFIG,
        "--args_file",
        str(args_file),
        "--output_dir",
        str(output_dir),
    ]


@pytest.fixture(scope="module")
def single_node_ddp(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> tuple[Path, str]:
    """One torchrun launcher, 2 gloo CPU processes: the output folder and the log."""
    workdir = tmp_path_factory.mktemp("single_node")
    output_dir = workdir / "ddp"
    result = run_module(
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        *bundle_run_args(write_tiny_args(workdir / "tiny_args.json", corpus), output_dir),
        timeout=900,
        env=ONE_THREAD,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return output_dir, log


@pytest.mark.flaky(reruns=1, only_rerun=["SIGABRT", "Signal 6"])  # a rare gloo process abort, see pyproject.toml
@pytest.mark.slow
def test_two_process_ddp_trains_saves_once_logs_once(single_node_ddp: tuple[Path, str]) -> None:
    output_dir, log = single_node_ddp
    assert (output_dir / "model_final.pt").is_file()
    assert len(list((output_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert log.count("Epoch: 1/1, Iter: 1/2") == 1  # StatsHandler on rank 0 only
    checkpoint = torch.load(output_dir / "model_final.pt", map_location="cpu", weights_only=True)
    assert not any(key.startswith("module.") for key in checkpoint["model"])


@pytest.mark.flaky(reruns=1, only_rerun=["SIGABRT", "Signal 6"])  # a rare gloo process abort, see pyproject.toml
@pytest.mark.slow
def test_two_nodes_match_one_node_with_two_processes(
    tmp_path: Path, corpus: Path, single_node_ddp: tuple[Path, str], bundle_checks
) -> None:
    """Two torchrun launchers of one process each meet by c10d rendezvous on 127.0.0.1, as two nodes would."""
    args_file = write_tiny_args(tmp_path / "tiny_args.json", corpus)
    output_dir = tmp_path / "two_nodes"
    launchers = bundle_checks.torchrun_launchers(nodes=2, rdzv_id="pretrain_joint_two_nodes")
    commands = [launcher + bundle_run_args(args_file, output_dir) for launcher in launchers]
    nodes = bundle_checks.launch_nodes(commands, tmp_path, timeout=600, cwd=REPO, env=ONE_THREAD)

    for node, (code, log) in enumerate(nodes):
        assert code == 0, f"node {node}:\n{log[-4000:]}"
    assert [log.count("Epoch: 1/1, Iter: 2/2") for _, log in nodes] in ([1, 0], [0, 1])  # one rank 0 over both nodes
    reference_dir, _ = single_node_ddp
    two_nodes = torch.load(output_dir / "model_final.pt", map_location="cpu", weights_only=True)
    one_node = torch.load(reference_dir / "model_final.pt", map_location="cpu", weights_only=True)
    assert two_nodes["trainer"]["iteration"] == one_node["trainer"]["iteration"] == 2
    assert two_nodes["model"].keys() == one_node["model"].keys()
    differing = [name for name, value in one_node["model"].items() if not torch.equal(two_nodes["model"][name], value)]
    assert differing == []


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


@pytest.mark.slow
def test_embedding_inference_with_skip_bad_embeds_the_good_items_and_lists_the_bad_one(
    corpus: Path, tmp_path: Path
) -> None:
    content = json.loads(corpus.read_text())
    items = [{**item, "image": str(corpus.parent / item["image"])} for item in content["training"]]
    (tmp_path / "broken.nii.gz").write_bytes(b"truncated")
    datalist = tmp_path / "datalist.json"
    datalist.write_text(
        json.dumps({**content, "training": [items[0], {"image": str(tmp_path / "broken.nii.gz")}, *items[1:]]})
    )
    with pytest.raises(Exception) as stopped:  # the start-up check stops inference by default
        embedding_workflow(datalist, tmp_path / "strict", None).initialize()
    assert "broken.nii.gz: unreadable NIfTI header" in str(stopped.value.__cause__ or stopped.value)

    workflow = embedding_workflow(datalist, tmp_path / "lenient", None, skip_bad=True)
    workflow.initialize()
    workflow.run()
    assert len(np.load(tmp_path / "lenient" / "embeddings.npy")) == len(items)
    assert "broken" not in (tmp_path / "lenient" / "embeddings.csv").read_text()
    skipped = json.loads((tmp_path / "lenient" / "skipped_items.json").read_text())["skipped"]
    assert [entry["item"]["image"] for entry in skipped] == [str(tmp_path / "broken.nii.gz")]
    assert any("broken.nii.gz" in line for line in log_skipped_items(tmp_path / "lenient"))  # what finalize lists


@pytest.mark.slow
def test_dicom_identifiers_never_reach_the_outputs_written_only_under_output_dir(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bundle_checks
) -> None:
    """A DICOM series full of patient identifiers goes through pretraining, export and embedding inference, run from
    an empty working directory: no identifier appears in any output file, file name, log line or checkpoint, and
    nothing is written outside ``output_dir`` (bundle, dataset and working directory untouched)."""
    from custom_nets.data.demo import _write_dicom_series

    series = tmp_path / "data" / "series"
    volume = (np.random.default_rng(0).random((32, 32, 10)) * 1000).astype(np.int16)
    _write_dicom_series(series, volume, (1.0, 1.0, 2.0), "CT", "identified")
    bundle_checks.stamp_identifiers(series.iterdir())
    content = json.loads(corpus.read_text())
    items = [{**item, "image": str(corpus.parent / item["image"])} for item in content["training"]]
    first_volume = next(i for i, item in enumerate(items) if item["kind"] == "volume")
    items[first_volume] = {**items[first_volume], "image": str(series)}
    datalist = tmp_path / "data" / "datalist.json"
    datalist.write_text(json.dumps({**content, "training": items}))

    outputs, cwd = tmp_path / "outputs", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    watched = (BUNDLE, corpus.parent, tmp_path / "data", cwd)
    before = bundle_checks.snapshot(*watched)
    with bundle_checks.log_to(outputs / "run.log"):
        train(corpus, outputs / "run", datalist=str(datalist))
        exported = export_pretrained(outputs / "run" / "model_final.pt", outputs / "model.pt")
        workflow = embedding_workflow(datalist, outputs / "embeddings", exported)
        workflow.run()
    bundle_checks.assert_confined(before, bundle_checks.snapshot(*watched), outputs)
    assert str(series) in (outputs / "embeddings" / "embeddings.csv").read_text()  # the series was read
    assert bundle_checks.leaked_identifiers(bundle_checks.output_bytes(tmp_path / "data"))  # found in the input
    assert bundle_checks.leaked_identifiers(bundle_checks.output_bytes(outputs)) == []
