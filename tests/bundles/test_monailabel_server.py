"""A real MONAI Label server (monailabel 0.8.5, ``monaibundle`` app) serving finetune_heart and finetune_brainseg.

The server runs in MONAI Label's own environment (``make monailabel-venv``; ``$CUSTOM_NETS_MONAILABEL_PYTHON`` points
elsewhere) on 127.0.0.1 and a free port, on a generated NIfTI studies folder. The weights are made here: randomly
initialised networks of the served size, written with the project's ``save_weights``. The test calls ``/info/``,
``/infer/<model>`` on an uploaded volume whose affine is not RAS (the returned label must keep the input's shape and
affine, with values among the bundle's classes), a one-epoch ``/train/`` through the bundle's train.json, and stops
the server: its whole process group (the server and MONAI Label's training subprocess) must be gone afterwards, also
when an assertion failed.

Without that environment the test is skipped, unless ``CUSTOM_NETS_REQUIRE_MONAILABEL=1`` (set by ``.ci/run``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, run

from custom_nets.monailabel_serving import (
    install_bundle,
    monailabel_python,
    prepare_monailabel_app,
    start_server_command,
)
from custom_nets.weights import save_weights

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
REPO_ROOT = BUNDLES.parent
SERVED = ("finetune_heart", "finetune_brainseg")
CLASSES = {"finetune_heart": 8, "finetune_brainseg": 2}
TINY = {  # a small network, and validation after every epoch (MONAI Label's model.pt is written by validation)
    "encoder_depth": 18,
    "decoder_channels": [16, 16, 8, 8, 8],
    "image_size": [32, 32],
    "num_workers": 0,
    "sw_batch_size": 8,
    "val_interval": 1,
    "cache_rate": 0.0,
}
SHAPE = (24, 20, 6)
# LPS-like axes with swapped in-plane axes and anisotropic spacing: the served pipeline must restore this geometry
AFFINE = np.array([[0.0, -1.5, 0.0, 30.0], [-1.2, 0.0, 0.0, 20.0], [0.0, 0.0, 2.5, -7.0], [0.0, 0.0, 0.0, 1.0]])
STARTUP_SECONDS = 300
TRAIN_SECONDS = 600


def _server_python() -> Path:
    try:
        return monailabel_python()
    except FileNotFoundError as error:
        if os.environ.get("CUSTOM_NETS_REQUIRE_MONAILABEL", "") not in ("", "0"):
            raise
        pytest.skip(f"MONAI Label's environment is absent ({error})")


def _volume(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A bright box on a noisy background and its label (values 1 and 2: a class of both bundles)."""
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[6:18, 5:15, 1:5] = 1
    label[9:15, 8:12, 1:5] = 2
    image = 100.0 + 150.0 * label + rng.normal(0.0, 10.0, SHAPE)
    return image.astype(np.float32), label


def _make_studies(root: Path, num_images: int = 5, num_labelled: int = 4) -> Path:
    """MONAI Label's local datastore layout: images in the folder, final labels in ``labels/final`` (same name)."""
    (root / "labels" / "final").mkdir(parents=True)
    for index in range(num_images):
        image, label = _volume(index)
        nib.save(nib.Nifti1Image(image, AFFINE), root / f"case_{index:03d}.nii.gz")
        if index < num_labelled:
            nib.save(nib.Nifti1Image(label, AFFINE), root / "labels" / "final" / f"case_{index:03d}.nii.gz")
    return root


def _random_weights(bundle: str, path: Path, overrides: dict = TINY) -> Path:
    """A randomly initialised network of the served size, saved the way the bundles save theirs (flat state dict).

    The segmentation head's bias is zeroed: with it, the random network labels every voxel alike, and a constant
    label would hide a flipped or transposed geometry."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(BUNDLES / bundle), **{k: v for k, v in overrides.items() if k in parser.config}})
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    torch.nn.init.zeros_(network.segmentation_head[0].bias)
    return save_weights(network, path)


def _request(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 300) -> bytes:
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def _multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, content) in files.items():
        header = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(header.encode() + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it leads its own session), SIGKILL what is left after 30 s."""
    for sig, grace in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while (process.poll() is None or _group_alive(process.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        if process.poll() is not None and not _group_alive(process.pid):
            return


@pytest.fixture
def server(tmp_path: Path, bundle_checks) -> Iterator[dict]:
    python = _server_python()
    studies = _make_studies(tmp_path / "studies")
    weights = {name: _random_weights(name, tmp_path / "weights" / f"{name}.pt") for name in SERVED}
    app = tmp_path / "app"
    models = prepare_monailabel_app(app, [BUNDLES / name for name in SERVED], python, weights, TINY)
    port = bundle_checks.free_port()
    command = start_server_command(python, app, studies, models, port=port)
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",  # the same CPU run on a machine with a GPU
        "PYTHONPATH": str(REPO_ROOT),  # this checkout's custom_nets, also when the environment holds another copy
        "MONAI_LABEL_SESSION_PATH": str(tmp_path / "sessions"),
    }
    log = tmp_path / "server.log"
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=environment, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            assert process.poll() is None, f"the server exited:\n{log.read_text()[-5000:]}"
            try:
                info = json.loads(_request(f"{base}/info/", timeout=10))
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, f"no answer in {STARTUP_SECONDS} s:\n{log.read_text()[-5000:]}"
                time.sleep(2)
        yield {"base": base, "info": info, "app": app, "log": log, "process": process}
    finally:
        _stop(process)
        assert not _group_alive(process.pid), "processes of the server's group survived"  # no orphan


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_monailabel_serves_infers_and_trains(server, tmp_path):
    base, info = server["base"], server["info"]
    for name in SERVED:
        model = info["models"][name]
        assert model["type"] == "segmentation"
        class_names = json.loads((BUNDLES / name / "configs" / "metadata.json").read_text())
        class_names = class_names["network_data_format"]["outputs"]["pred"]["channel_def"]
        expected = {v.lower(): int(k) for k, v in class_names.items() if v.lower() != "background"}
        assert model["labels"] == expected
    assert set(SERVED) <= set(info["trainers"])
    log_text = server["log"].read_text()
    assert "Checkpoint keys don't match" not in log_text

    image, _ = _volume(seed=99)
    upload = tmp_path / "upload.nii.gz"
    nib.save(nib.Nifti1Image(image, AFFINE), upload)
    for name in SERVED:
        body, headers = _multipart(
            {"params": json.dumps({"device": "cpu"})}, {"file": (upload.name, upload.read_bytes())}
        )
        returned = tmp_path / f"{name}_label.nii.gz"
        returned.write_bytes(_request(f"{base}/infer/{name}?output=image", body, headers))
        label = nib.load(returned)
        assert label.shape == SHAPE
        assert np.allclose(label.affine, AFFINE)
        values = np.unique(np.asarray(label.dataobj))
        assert values.min() >= 0 and values.max() < CLASSES[name] and len(values) > 1, values
        # the same label as the served bundle's own inference (monai.bundle run) on that volume, voxel for voxel
        served = server["app"] / "model" / name
        run(
            config_file=str(served / "configs" / "inference.json"),
            bundle_root=str(served),
            dataset_dir=str(upload.parent),
            image_pattern=upload.name,
            output_dir=str(tmp_path / "bundle_inference" / name),
            device="$torch.device('cpu')",
            amp=False,
        )
        (own,) = (tmp_path / "bundle_inference" / name).glob("*.nii.gz")
        np.testing.assert_array_equal(np.asarray(label.dataobj), np.asarray(nib.load(own).dataobj))
    assert "Checkpoint keys don't match" not in server["log"].read_text()  # the weights loaded completely

    served_weights = server["app"] / "model" / "finetune_heart" / "models" / "model.pt"
    before = served_weights.read_bytes()
    request = {"max_epochs": 1, "device": "cpu", "val_split": 0.25, "multi_gpu": False, "train_batch_size": 1}
    headers = {"Content-Type": "application/json"}
    _request(f"{base}/train/finetune_heart", json.dumps(request).encode(), headers)
    deadline = time.monotonic() + TRAIN_SECONDS
    while True:
        task = json.loads(_request(f"{base}/train/", timeout=30))
        if task["status"] not in ("SUBMITTED", "RUNNING"):
            break
        assert time.monotonic() < deadline, f"training still running after {TRAIN_SECONDS} s"
        time.sleep(3)
    details = "\n".join(task.get("details", []))
    assert task["status"] == "DONE", f"{task['status']}:\n{details}\n{server['log'].read_text()[-5000:]}"
    assert served_weights.read_bytes() != before  # validation after the epoch wrote the trained weights
    trained = torch.load(served_weights, map_location="cpu", weights_only=True)
    assert trained["segmentation_head.0.weight"].shape[0] == CLASSES["finetune_heart"]


def test_install_bundle_writes_overrides_and_checks_weights(tmp_path):
    """Runs without MONAI Label: what the served copy holds, and what is refused before a server starts."""
    heart_weights = _random_weights("finetune_heart", tmp_path / "heart.pt")
    served = install_bundle(BUNDLES / "finetune_heart", tmp_path / "app", heart_weights, TINY)
    assert served == tmp_path / "app" / "model" / "finetune_heart"
    inference = json.loads((served / "configs" / "inference.json").read_text())
    train = json.loads((served / "configs" / "train.json").read_text())
    assert inference["encoder_depth"] == train["encoder_depth"] == 18 and train["val_interval"] == 1
    assert "val_interval" not in inference  # a key is only written where the bundle has it
    assert train["validate_data"] is inference["validate_data"] is False  # MONAI Label's datastore replaces the inputs
    assert (served / "models" / "model.pt").read_bytes() == heart_weights.read_bytes()
    assert not (served / "outputs").exists()

    with pytest.raises(RuntimeError, match="segmentation_head.0.weight"):  # 8 heart classes into 2-class brainseg
        install_bundle(BUNDLES / "finetune_brainseg", tmp_path / "app", heart_weights, TINY)
    with pytest.raises(ValueError, match="encoder_dpeth"):
        install_bundle(BUNDLES / "finetune_heart", tmp_path / "app", heart_weights, {"encoder_dpeth": 18})
    with pytest.raises(FileNotFoundError, match="model.pt"):
        install_bundle(BUNDLES / "finetune_heart", tmp_path / "app", None, TINY)
    with pytest.raises(ValueError, match="multi-label"):  # overlapping region masks are not one label map
        install_bundle(BUNDLES / "finetune_brainseg", tmp_path / "app", heart_weights, {"label_mode": "regions"})
    assert sorted(p.name for p in (tmp_path / "app" / "model").iterdir()) == ["finetune_heart"]  # nothing half-made

    demo_classes = {**TINY, "class_names": ["background", "organ", "bone"]}  # weights of other classes
    served = install_bundle(
        BUNDLES / "finetune_heart",
        tmp_path / "app",
        _random_weights("finetune_heart", tmp_path / "demo.pt", demo_classes),
        demo_classes,
    )
    metadata = json.loads((served / "configs" / "metadata.json").read_text())
    output = metadata["network_data_format"]["outputs"]["pred"]
    assert output["channel_def"] == {"0": "background", "1": "organ", "2": "bone"} and output["num_channels"] == 3

    command = start_server_command("python", tmp_path / "app", tmp_path / "studies", ["finetune_heart"], port=8123)
    assert command[1:4] == ["-m", "monailabel.main", "start_server"]
    settings = {command[i + 1]: command[i + 2] for i, argument in enumerate(command) if argument == "--conf"}
    assert settings["models"] == "finetune_heart" and settings["zoo_source"] != "monaihosting"
