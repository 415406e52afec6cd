"""Helpers shared by the tests (conftest is not importable as a module, so they come as fixtures): ``bundle_checks``
(a loss that turns NaN at one call, DICOM files stamped with patient identifiers, the search of every output of a run
for those identifiers, output confinement, ``python -m monai.bundle run`` in a subprocess, a training killed with
SIGKILL mid-epoch and the checks of what it left, an inference workflow with an untrained model) and tiny generated
MM-WHS and BraTS folders (``heart_raw``, ``brats_raw``, ``seg_data``: raw label codes, non-RAS affines)."""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from custom_nets.datasets.mmwhs import MMWHS_RAW_LABELS

# Values that must never reach an output (logs, reports, CSV, JSON, TensorBoard events, checkpoints, file names); every
# word of 6 characters or more is searched on its own, so each is one that no output holds by chance.
IDENTIFIERS = {
    "PatientName": "Doe^Janet^Secretname",
    "PatientID": "PID-98765-SECRET",
    "PatientBirthDate": "19610203",
    "AccessionNumber": "ACC-55555",
    "InstitutionName": "Secretplace Infirmary",
}


class NaNAt:
    """A loss that returns NaN at one call (a stand-in for a diverging step inside a bundle); ``calls`` counts them."""

    def __init__(self, loss: Any, call: int) -> None:
        self.loss, self.call, self.calls = loss, call, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        value = self.loss(*args, **kwargs)
        return value * float("nan") if self.calls == self.call else value


def stamp_identifiers(paths: Iterable[str | os.PathLike], identifiers: Mapping[str, str] = IDENTIFIERS) -> None:
    """Write ``identifiers`` (DICOM keyword -> value) into every DICOM file of ``paths``, in place."""
    import pydicom

    for path in paths:
        dataset = pydicom.dcmread(path)
        for keyword, value in identifiers.items():
            setattr(dataset, keyword, value)
        dataset.save_as(path, enforce_file_format=True)


def output_bytes(folder: str | os.PathLike) -> bytes:
    """Every byte under ``folder``: relative file names, files as stored, gzip members decompressed, the members of
    zip files (``torch.save`` checkpoints) read."""
    folder = Path(folder)
    chunks = []
    for path in sorted(folder.rglob("*")):
        chunks.append(str(path.relative_to(folder)).encode())
        if not path.is_file():
            continue
        data = path.read_bytes()
        chunks.append(data)
        if data[:2] == b"\x1f\x8b":
            chunks.append(gzip.decompress(data))
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                chunks.extend(archive.read(name) for name in archive.namelist())
    return b"\n".join(chunks)


def leaked_identifiers(content: bytes, identifiers: Mapping[str, str] = IDENTIFIERS) -> list[tuple[str, str]]:
    """``(keyword, form)`` of every identifier found in ``content`` (case-insensitive): the value as written, with
    DICOM's ``^`` as spaces, and each of its words (split at ``^`` and spaces) of 6 characters or more."""
    content = content.lower()
    found = []
    for keyword, value in identifiers.items():
        words = value.replace("^", " ").split()
        forms = {value, value.replace("^", " "), *(word for word in words if len(word) >= 6)}
        found += [(keyword, form) for form in sorted(forms) if form.lower().encode() in content]
    return found


@contextlib.contextmanager
def log_to(path: str | os.PathLike) -> Iterator[Path]:
    """Copy every log record of the block (all loggers, as the bundles' logging.conf lets them through) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    logging.getLogger().addHandler(handler)
    try:
        yield path
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def assert_confined(before: Mapping[str, float], after: Mapping[str, float], allowed: str | os.PathLike) -> None:
    """Fail naming every path created or modified between two :func:`snapshot` calls outside ``allowed``."""
    allowed = Path(allowed).resolve()
    changed = [path for path, mtime in after.items() if before.get(path) != mtime]
    outside = [path for path in changed if not Path(path).resolve().is_relative_to(allowed)]
    assert not outside, f"written outside {allowed}: {outside[:10]}"


def terminate_after_epoch(workflow: Any, epoch: int) -> None:
    """End the training of a bundle workflow cleanly after ``epoch`` (its savers still write that epoch), as an
    interrupted run that is resumed later."""
    from ignite.engine import Events

    workflow.trainer.add_event_handler(Events.EPOCH_COMPLETED(once=epoch), lambda engine: engine.terminate())


def snapshot(*folders: str | os.PathLike) -> dict[str, float]:
    """Every path under ``folders`` with its modification time (to tell what a run created or changed)."""
    return {str(p): p.stat().st_mtime for folder in folders for p in Path(folder).rglob("*")}


def monai_bundle_run(
    config_files: list[str | os.PathLike],
    overrides: Mapping[str, Any],
    cwd: Path,
    env: Mapping[str, str] | None = None,
    launcher: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` of ``config_files`` (each overlaying the ones before; ``metadata.json`` and
    ``logging.conf`` taken beside the first) in a subprocess on the CPU, ``overrides`` as command-line flags;
    ``launcher``: arguments of python before ``-m monai.bundle`` (``("-m", "torch.distributed.run", ...)``)."""
    configs = Path(config_files[0]).parent
    command = [
        sys.executable,
        *launcher,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        repr([str(f) for f in config_files]),
    ]
    command += ["--meta_file", str(configs / "metadata.json"), "--logging_file", str(configs / "logging.conf")]
    for key, value in overrides.items():  # fire reads Python literals: repr keeps True, None and lists exact
        command += [f"--{key}", value if isinstance(value, str) else repr(value)]
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, cwd=cwd)


def torchrun_failure(stderr: str, per_rank: int = 1500, tail: int = 1200) -> str:
    """The part of a failed torchrun's stderr that names the cause, ending with it: torchrun's closing summary (from
    its ``ChildFailedError`` on: each rank's exit code or signal; torchrun's own traceback frames left out), then each
    rank's exception lines (``[rankN]: Error: ...``, outside the traceback frames; the first is the original cause,
    the last MONAI's wrapper), rank 0 first. Without such lines (a rank that failed before joining the process group
    prints no rank prefix) the end of the ranks' output comes last instead. The plain tail of stderr is not enough:
    when a second rank fails because the first one died, its traceback pushes the first one's out."""
    summary_at = stderr.rfind("ChildFailedError")
    children, summary = stderr, ""
    if summary_at >= 0:  # torchrun's report: its traceback, then the summary
        launcher = stderr.rfind("Traceback (most recent call last):", 0, summary_at)
        children = stderr[: launcher if launcher >= 0 else summary_at]
        summary = stderr[summary_at:]
    by_rank: dict[int, list[str]] = {}
    for line in children.splitlines():
        match = re.match(r"\[rank(\d+)\]: (\S.*)", line)
        if match and not match.group(2).startswith(("Traceback", "The above", "During handling", "^", "~")):
            by_rank.setdefault(int(match.group(1)), []).append(line)
    parts = ["\n".join(lines)[:per_rank] for _, lines in sorted(by_rank.items())] or [children[-tail:]]
    return "\n...\n".join(part for part in [summary[-tail:], *parts] if part)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_launchers(nodes: int, rdzv_id: str) -> list[list[str]]:
    """The torchrun commands (module and arguments, for ``python -m``) that start 2 processes: one launcher of 2
    (``nodes=1``, ``--standalone``), or two launchers of one process each that meet by c10d rendezvous on 127.0.0.1 as
    two nodes would (``nodes=2``; start both with :func:`launch_nodes`)."""
    if nodes == 1:
        return [["torch.distributed.run", "--standalone", "--nproc_per_node=2"]]
    launcher = ["torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d"]
    launcher += [f"--rdzv_endpoint=127.0.0.1:{free_port()}", f"--rdzv_id={rdzv_id}", "--local_addr=127.0.0.1"]
    launcher += [
        "--rdzv_conf=keep_alive_interval=1"
    ]  # the launchers exit on a keep-alive tick: 1 s, not the 5 s default
    return [launcher] * nodes


def launch_nodes(
    commands: list[list[str]], log_dir: Path, timeout: int, cwd: Path, env: Mapping[str, str] | None = None
) -> list[tuple[int, str]]:
    """Start every ``python -m`` command at once (one torchrun launcher per "node"); their return codes and logs."""
    environment = {**os.environ, "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    logs = [log_dir / f"node{node}.log" for node in range(len(commands))]
    processes = []
    for command, log in zip(commands, logs, strict=True):
        with log.open("w") as out:  # a file, not a pipe: a full pipe would stall one node while the other waits on it
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", *command], cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=environment
                )
            )
    try:
        codes = [process.wait(timeout=timeout) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()  # torchrun stops its workers on SIGTERM
                process.wait(timeout=30)
    return [(code, log.read_text()) for code, log in zip(codes, logs, strict=True)]


def train_on_nodes(
    bundle_args: list[str], nodes: int, rdzv_id: str, log_dir: Path, cwd: Path, last_iteration_line: str
) -> str:
    """Run ``python -m monai.bundle ...`` (``bundle_args``) as 2 gloo processes through
    :func:`torchrun_launchers` (``nodes`` 1 or 2), assert that every launcher ended with status 0 and that exactly one
    log, rank 0's, holds ``last_iteration_line`` (once); returns all logs joined."""
    launchers = torchrun_launchers(nodes, rdzv_id)
    runs = launch_nodes([launcher + bundle_args for launcher in launchers], log_dir, timeout=600, cwd=cwd)
    for code, log in runs:
        assert code == 0, torchrun_failure(log)
    assert sorted(log.count(last_iteration_line) for _, log in runs) == [0] * (nodes - 1) + [1]  # rank 0 logs
    return "".join(log for _, log in runs)


def train_until_sigkill(
    config_files: list[str | os.PathLike], overrides: Mapping[str, Any], kill_at_iteration: int, cwd: Path
) -> subprocess.CompletedProcess:
    """Train through ``python -m monai.bundle run`` with an overlay config whose last ``initialize`` step makes the
    trainer SIGKILL its own process when iteration ``kill_at_iteration`` completes: a known point of training that
    nothing can catch or clean up after, like a node failure or the OOM killer. Asserts that the kill happened."""
    overlay = cwd / "sigkill_overlay.json"
    kill = "lambda engine: os.kill(os.getpid(), signal.SIGKILL)"
    when = f"ignite.engine.Events.ITERATION_COMPLETED(once={kill_at_iteration})"
    content = {"+imports": ["$import signal", "$import ignite"]}
    content["+initialize"] = [f"$@train#trainer.add_event_handler({when}, {kill})"]
    overlay.write_text(json.dumps(content))
    killed = monai_bundle_run([*config_files, overlay], overrides, cwd)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    return killed


def assert_checkpoints_loadable(folder: str | os.PathLike) -> list[dict]:
    """``folder`` holds checkpoints (``*.pt``) that ``torch.load(weights_only=True)`` reads (it raises on a truncated
    one) and no temporary file of the atomic writer (``.<name>.*.tmp*``); returns their contents, in name order."""
    import torch

    folder = Path(folder)
    assert not [path.name for path in folder.iterdir() if ".tmp" in path.name]
    files = sorted(path for path in folder.glob("*.pt") if not path.name.startswith("."))
    assert files, f"no checkpoint in {folder}"
    return [torch.load(path, map_location="cpu", weights_only=True) for path in files]


def assert_same_weights(state: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Two state dicts hold the same keys and bit-identical tensors."""
    import torch

    assert state.keys() == expected.keys()
    different = [key for key in expected if not torch.equal(state[key], expected[key])]
    assert not different, different[:5]


def assert_one_whole_checkpoint_left(bundle_root: str | os.PathLike, iteration: int) -> Path:
    """What a fine-tune bundle killed mid-epoch leaves: one loadable ``outputs/checkpoints`` checkpoint, at
    ``iteration`` and with the random state, and loadable ``models``; returns the checkpoint's path (to resume)."""
    checkpoints = Path(bundle_root) / "outputs" / "checkpoints"
    (saved,) = assert_checkpoints_loadable(checkpoints)
    assert saved["trainer"]["iteration"] == iteration and "random_state" in saved
    assert_checkpoints_loadable(Path(bundle_root) / "models")
    (path,) = checkpoints.glob("*.pt")
    return path


def assert_same_final_checkpoint(bundle_root: str | os.PathLike, reference_root: str | os.PathLike, iteration: int):
    """``outputs/checkpoints/checkpoint_final.pt`` of two copies of a fine-tune bundle: both at ``iteration``, with
    bit-identical model weights (a resumed run against an uninterrupted one)."""
    import torch

    final, expected = (
        torch.load(Path(root) / "outputs" / "checkpoints" / "checkpoint_final.pt", weights_only=True)
        for root in (bundle_root, reference_root)
    )
    assert final["trainer"]["iteration"] == expected["trainer"]["iteration"] == iteration
    assert_same_weights(final["model"], expected["model"])


def inference_workflow(bundle_root: str | os.PathLike, **overrides: Any) -> Any:
    """The ``inference.json`` workflow of a bundle copy, initialised (its start-up check run), with an untrained
    network of the same settings saved as ``<bundle_root>/models/model.pt`` for it to load: for tests of what
    inference reads and writes, not of what it predicts."""
    import torch
    from monai.bundle import ConfigParser, ConfigWorkflow

    config = Path(bundle_root) / "configs" / "inference.json"
    parser = ConfigParser()
    parser.read_config(str(config))
    parser.update({"bundle_root": str(bundle_root), **overrides})
    (Path(bundle_root) / "models").mkdir(exist_ok=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), Path(bundle_root) / "models" / "model.pt")
    workflow = ConfigWorkflow(
        config_file=str(config), workflow_type="inference", bundle_root=str(bundle_root), **overrides
    )
    workflow.initialize()
    return workflow


def inference_stops_then_skips(bundle_root: str | os.PathLike, message: str, **settings: Any) -> tuple[Any, dict]:
    """Inference on inputs with one bad item: without ``skip_bad`` the start-up check stops the run with ``message``
    in its cause; with ``skip_bad`` it runs. Returns that workflow and the one entry of its ``skipped_items.json``."""
    with pytest.raises(RuntimeError) as stopped:  # MONAI wraps errors of the config's "initialize"
        inference_workflow(bundle_root, **settings)
    assert message in str(stopped.value.__cause__)
    workflow = inference_workflow(bundle_root, skip_bad=True, **settings)
    workflow.run()
    report = Path(bundle_root) / "outputs" / "inference" / "skipped_items.json"
    (skipped,) = json.loads(report.read_text())["skipped"]
    return workflow, skipped


@pytest.fixture(scope="session")
def bundle_checks() -> SimpleNamespace:
    return SimpleNamespace(
        free_port=free_port,
        torchrun_launchers=torchrun_launchers,
        launch_nodes=launch_nodes,
        train_on_nodes=train_on_nodes,
        IDENTIFIERS=IDENTIFIERS,
        NaNAt=NaNAt,
        stamp_identifiers=stamp_identifiers,
        output_bytes=output_bytes,
        leaked_identifiers=leaked_identifiers,
        snapshot=snapshot,
        assert_confined=assert_confined,
        log_to=log_to,
        terminate_after_epoch=terminate_after_epoch,
        monai_bundle_run=monai_bundle_run,
        torchrun_failure=torchrun_failure,
        train_until_sigkill=train_until_sigkill,
        assert_checkpoints_loadable=assert_checkpoints_loadable,
        assert_same_weights=assert_same_weights,
        assert_one_whole_checkpoint_left=assert_one_whole_checkpoint_left,
        assert_same_final_checkpoint=assert_same_final_checkpoint,
        inference_workflow=inference_workflow,
        inference_stops_then_skips=inference_stops_then_skips,
    )


SHAPE = (24, 20, 6)
# LPS-like axes with swapped in-plane axes and anisotropic spacing: Orientationd must reorient and Invertd undo it.
AFFINE = np.array([[0.0, -1.5, 0.0, 30.0], [-1.2, 0.0, 0.0, 20.0], [0.0, 0.0, 2.5, -7.0], [0.0, 0.0, 0.0, 1.0]])


def heart_label() -> np.ndarray:
    """Raw MM-WHS codes: seven 2-voxel-wide bars in slices 1-4, slices 0 and 5 empty."""
    label = np.zeros(SHAPE, dtype=np.int16)
    for index, value in enumerate(MMWHS_RAW_LABELS):
        label[2 + 3 * index : 4 + 3 * index, 4:16, 1:5] = value
    return label


def brats_label() -> np.ndarray:
    """BraTS codes: oedema 2 around a core 1 around enhancing 4 in slices 2-4."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[6:18, 5:15, 2:5] = 2
    label[8:16, 7:13, 2:5] = 1
    label[10:14, 9:11, 2:5] = 4
    return label


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def make_heart_folder(root: Path, case_ids: tuple[int, ...] = (1001, 1002, 1003, 1004)) -> Path:
    rng = np.random.default_rng(0)
    for case_id in case_ids:
        label = heart_label()
        image = (label > 0) * 300.0 - 100.0 + rng.normal(0.0, 20.0, SHAPE)
        write_nifti(root / f"ct_train_{case_id}_image.nii.gz", image.astype(np.float32))
        write_nifti(root / f"ct_train_{case_id}_label.nii.gz", label)
    return root


def make_brats_folder(root: Path, num_cases: int = 4) -> Path:
    rng = np.random.default_rng(1)
    for index in range(num_cases):
        case = f"BraTS20_Training_{index + 1:03d}"
        label = brats_label()
        for modality in ("flair", "t1", "t1ce", "t2"):
            image = 100.0 + (label > 0) * 200.0 + rng.normal(0.0, 10.0, SHAPE)
            image[:2] = 0.0  # background outside the head
            write_nifti(root / case / f"{case}_{modality}.nii.gz", image.astype(np.float32))
        write_nifti(root / case / f"{case}_seg.nii.gz", label)
    return root


@pytest.fixture
def heart_raw(tmp_path: Path) -> Path:
    return make_heart_folder(tmp_path / "mmwhs_raw")


@pytest.fixture
def brats_raw(tmp_path: Path) -> Path:
    return make_brats_folder(tmp_path / "brats_raw")


@pytest.fixture
def seg_data() -> SimpleNamespace:
    """The generators above, for tests that build their own variants (conftest is not importable as a module)."""
    return SimpleNamespace(
        AFFINE=AFFINE,
        SHAPE=SHAPE,
        heart_label=heart_label,
        brats_label=brats_label,
        write_nifti=write_nifti,
        make_heart_folder=make_heart_folder,
        make_brats_folder=make_brats_folder,
    )
