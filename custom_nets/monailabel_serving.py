"""Serve this project's bundles in MONAI Label: the ``monaibundle`` sample app with our bundles in its model folder.

MONAI Label 0.8.5 pins numpy 1.26 (and more) and so lives in a virtual environment of its own, with ``custom_nets``
installed in it too (``make monailabel-venv`` creates ``.venv-monailabel``). This module runs in either environment:
it copies the sample app out of that installation, installs bundles into the copy and starts
``<that venv>/bin/python -m monailabel.main start_server`` (the ``monailabel`` launcher would run whichever ``python``
comes first on ``PATH``).

What the ``monaibundle`` app of monailabel 0.8.5 does with a bundle (read from its sources):

* ``--conf models a,b`` names folders of ``<app>/model/``; with a ``zoo_source`` other than ``monaihosting`` a folder
  that is present is used as it is, nothing is downloaded. The folder name is the model's name and sets its task type:
  ``*_detection``, ``*_classification``, anything else is a segmentation.
* Inference reads ``configs/inference.json`` alone (no overlay): ``network_def``, ``preprocessing``, ``inferer``,
  ``postprocessing`` (its ``SaveImage`` is dropped, and MONAI Label writes the label itself with the image's original
  affine). ``configs/metadata.json`` gives the input and output keys and the label names (the output's
  ``channel_def``). ``models/model.pt`` is loaded with ``strict=False``: a key mismatch only logs a warning, so
  :func:`install_bundle` loads it strictly first.
* Training runs ``configs/train.json`` alone with the datastore's labelled images as ``train#dataset#data`` and
  ``validate#dataset#data``, the request's ``max_epochs`` and ``device``, and a ``CheckpointLoader`` of
  ``models/model.pt`` inserted into ``train#handlers``. ``initialize`` still runs.

Hence :data:`SERVED_OVERRIDES`: the served copy does not check the bundle's own datalist or inference inputs (MONAI
Label does not use them); user overrides (network size, ``class_names``, ``val_interval``, ``num_workers``) are
written into both config files, and ``metadata.json``'s label names follow ``class_names``. MONAI Label saves a new
``models/model.pt`` only when the bundle validates (every ``val_interval`` epochs), so a training request needs
``max_epochs >= val_interval``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from custom_nets.atomic_files import atomic_write_text
from custom_nets.packaging import verify_bundle_weights

logger = logging.getLogger(__name__)

__all__ = [
    "MONAILABEL_PYTHON_VARIABLE",
    "SERVED_OVERRIDES",
    "copy_monaibundle_app",
    "install_bundle",
    "monailabel_python",
    "prepare_monailabel_app",
    "serve_monailabel",
    "start_server_command",
]

MONAILABEL_PYTHON_VARIABLE = "CUSTOM_NETS_MONAILABEL_PYTHON"
DEFAULT_MONAILABEL_VENV = Path(__file__).resolve().parents[1] / ".venv-monailabel"
SERVED_CONFIGS = ("inference.json", "train.json")
SERVED_OVERRIDES: dict[str, dict[str, object]] = {
    # the bundle's datalist check reads `datalist`, which MONAI Label replaces by its datastore; each image/label pair
    # is still checked when it is loaded (CheckSegmentationPaird)
    "train.json": {"validate_data": False},
    # MONAI Label hands inference.json the image of each request itself, never the folder or datalist it would check
    "inference.json": {"validate_data": False},
}
EXCLUDED_NAMES = ("outputs", "runs", "embeddings", "eval", "__pycache__", "*.pyc")


def monailabel_python(python: str | os.PathLike | None = None) -> Path:
    """The python of MONAI Label's environment: ``python``, else ``$CUSTOM_NETS_MONAILABEL_PYTHON``, else
    ``.venv-monailabel/bin/python`` of this checkout (``make monailabel-venv``)."""
    chosen = python or os.environ.get(MONAILABEL_PYTHON_VARIABLE) or DEFAULT_MONAILABEL_VENV / "bin" / "python"
    chosen = Path(chosen)
    if not chosen.is_file():
        raise FileNotFoundError(
            f"{chosen} not found: create MONAI Label's environment with `make monailabel-venv`, or point "
            f"{MONAILABEL_PYTHON_VARIABLE} (or --python) at the python of an environment with monailabel and "
            "custom_nets."
        )
    return chosen


def copy_monaibundle_app(python: str | os.PathLike, app_dir: str | os.PathLike) -> Path:
    """Copy the ``monaibundle`` sample app that ships inside the MONAI Label installation of ``python`` to
    ``app_dir`` (``monailabel apps --download``; nothing is downloaded); returns ``app_dir``."""
    app_dir = Path(app_dir).resolve()
    if app_dir.exists():
        raise FileExistsError(f"{app_dir} already exists: give a new folder for the app.")
    app_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=app_dir.parent) as scratch:  # the app is copied as <output>/monaibundle
        command = [str(python), "-m", "monailabel.main", "apps", "--download", "--name", "monaibundle"]
        command += ["--output", scratch]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0 or not (Path(scratch) / "monaibundle" / "main.py").is_file():
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
        os.replace(Path(scratch) / "monaibundle", app_dir)
    return app_dir


def _apply_overrides(config_dir: Path, overrides: Mapping[str, object]) -> None:
    """Set top-level keys of the served configs; a key that neither file has is an error (a typo would be ignored)."""
    configs = {name: json.loads((config_dir / name).read_text()) for name in SERVED_CONFIGS}
    unknown = sorted(key for key in overrides if not any(key in config for config in configs.values()))
    if unknown:
        raise ValueError(f"{config_dir} has no top-level keys {unknown} in {' or '.join(SERVED_CONFIGS)}.")
    for name, config in configs.items():
        served = {**SERVED_OVERRIDES.get(name, {}), **overrides}
        updated = {**config, **{key: value for key, value in served.items() if key in config}}
        if updated != config:
            atomic_write_text(config_dir / name, json.dumps(updated, indent=4) + "\n")


def _sync_label_names(bundle_dir: Path) -> None:
    """MONAI Label names the labels after ``metadata.json``'s output ``channel_def``: when the served network has other
    classes (a ``class_names`` override), rewrite ``channel_def`` and ``num_channels`` to match. A multi-label network
    (overlapping sigmoid masks, e.g. finetune_brainseg's ``label_mode: regions``) is refused: MONAI Label writes one
    label map."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle_dir / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle_dir)})
    if "multi_label" in parser and parser.get_parsed_content("multi_label"):
        raise ValueError(
            f"{bundle_dir}: a multi-label network (overlapping masks) cannot be served as one MONAI Label label map; "
            "serve a single-label mode (finetune_brainseg: label_mode whole_tumour or plain)."
        )
    if "class_names" not in parser:
        return
    channel_def = {str(index): str(name) for index, name in enumerate(parser.get_parsed_content("class_names"))}
    metadata_file = bundle_dir / "configs" / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    output = next(iter(metadata["network_data_format"]["outputs"].values()))
    if output.get("channel_def") != channel_def:
        output.update(channel_def=channel_def, num_channels=len(channel_def))
        atomic_write_text(metadata_file, json.dumps(metadata, indent=4) + "\n")


def install_bundle(
    bundle: str | os.PathLike,
    app_dir: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    overrides: Mapping[str, object] | None = None,
    name: str | None = None,
) -> Path:
    """Copy ``bundle`` into ``<app_dir>/model/<name>`` for MONAI Label and check that its weights load.

    Args:
        bundle: a bundle folder (from this repository or from ``download_bundle``).
        app_dir: the monaibundle app (:func:`copy_monaibundle_app`).
        weights: the ``models/model.pt`` to serve; default: the bundle's own ``models/model.pt``.
        overrides: top-level config keys written into the served ``inference.json`` and ``train.json`` (where the
            key exists): the network size and ``class_names`` the weights were trained for (``metadata.json``'s
            label names follow ``class_names``), ``val_interval``, ``num_workers``, ...
        name: the model's name in MONAI Label; default: the bundle's folder name (a segmentation task).

    Returns:
        the served bundle folder. An existing one is replaced.

    Raises:
        FileNotFoundError: no weights.
        ValueError: an unknown override key, or a multi-label network (MONAI Label writes one label map).
        RuntimeError: the weights do not fit the network of the served ``inference.json`` (the weight report).
    """
    bundle, app_dir = Path(bundle), Path(app_dir)
    if not (bundle / "configs" / "inference.json").is_file():
        raise FileNotFoundError(f"{bundle / 'configs' / 'inference.json'} not found: {bundle} is not a bundle folder.")
    weights = Path(weights) if weights else bundle / "models" / "model.pt"
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights} not found: MONAI Label needs the bundle's weights (train it, or download a release with "
            "`python -m custom_nets.cli download_bundle`)."
        )
    served = app_dir / "model" / (name or bundle.resolve().name)
    staging = Path(tempfile.mkdtemp(prefix=f".{served.name}.", dir=served.parent if served.parent.is_dir() else None))
    try:
        shutil.copytree(bundle, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*EXCLUDED_NAMES))
        (staging / "models").mkdir(exist_ok=True)
        if weights.resolve() != (bundle / "models" / "model.pt").resolve():
            shutil.copyfile(weights, staging / "models" / "model.pt")
        _apply_overrides(staging / "configs", overrides or {})
        _sync_label_names(staging)
        verify_bundle_weights(staging)
        served.parent.mkdir(parents=True, exist_ok=True)
        if served.exists():
            shutil.rmtree(served)
        shutil.move(staging, served)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return served


def prepare_monailabel_app(
    app_dir: str | os.PathLike,
    bundles: Sequence[str | os.PathLike],
    python: str | os.PathLike | None = None,
    weights: Mapping[str, str | os.PathLike] | None = None,
    overrides: Mapping[str, object] | None = None,
    reinstall: bool = False,
) -> list[str]:
    """Copy the monaibundle app to ``app_dir`` when it is not there yet and install ``bundles`` into it; returns the
    model names (``weights`` maps a bundle's folder name to its ``model.pt``).

    A bundle already served from ``app_dir`` is kept as it is, with the weights MONAI Label trained, unless
    ``reinstall``."""
    app_dir = Path(app_dir)
    if not (app_dir / "main.py").is_file():
        copy_monaibundle_app(monailabel_python(python), app_dir)
    weights = weights or {}
    unknown = sorted(set(weights) - {Path(b).resolve().name for b in bundles})
    if unknown:
        raise ValueError(f"weights given for {unknown}, which are not among the bundles served.")
    names = []
    for bundle in bundles:
        name = Path(bundle).resolve().name
        if reinstall or not (app_dir / "model" / name / "models" / "model.pt").is_file():
            install_bundle(bundle, app_dir, weights.get(name), overrides)
        else:
            logger.info("%s is served from %s as it is (reinstall=True replaces it)", name, app_dir / "model" / name)
        names.append(name)
    return names


def start_server_command(
    python: str | os.PathLike,
    app_dir: str | os.PathLike,
    studies: str | os.PathLike,
    models: Sequence[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    conf: Mapping[str, str] | None = None,
) -> list[str]:
    """``python -m monailabel.main start_server`` for the monaibundle app with local bundles only: ``zoo_source``
    ``local`` (no model zoo listing), ``sam2 false`` (SAM2 would download its weights), no preloading."""
    settings = {"models": ",".join(models), "zoo_source": "local", "sam2": "false", "preload": "false", **(conf or {})}
    command = [str(python), "-m", "monailabel.main", "start_server", "--app", str(app_dir), "--studies", str(studies)]
    command += ["--host", host, "--port", str(port)]
    for key, value in settings.items():
        command += ["--conf", key, str(value)]
    return command


def serve_monailabel(
    bundles: Sequence[str] | str,
    studies: str,
    app_dir: str = "monailabel_app",
    python: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    weights: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
    conf: Mapping[str, str] | None = None,
    reinstall: bool = False,
) -> int:
    """Install ``bundles`` into a monaibundle app and run the MONAI Label server until it is stopped (Ctrl-C).

    Args:
        bundles: bundle folders, e.g. ``bundles/finetune_heart,bundles/finetune_brainseg``.
        studies: the images to label (a folder of NIfTI files; labels go to ``<studies>/labels/final``).
        app_dir: where the app is copied to (kept between runs, with the bundles served and the weights MONAI Label
            trained; ``reinstall`` installs the bundles again).
        python: the python of MONAI Label's environment (default ``$CUSTOM_NETS_MONAILABEL_PYTHON`` or
            ``.venv-monailabel/bin/python``).
        host, port: where the server listens (``0.0.0.0`` to reach it from other machines).
        weights: bundle folder name -> ``model.pt`` to serve (default: each bundle's ``models/model.pt``).
        overrides: top-level config keys for the served configs (e.g. the network size of the weights).
        conf: more ``--conf`` settings of the app (e.g. ``{"skip_trainers": "true"}``).
        reinstall: install the bundles again even when ``app_dir`` serves them already.

    Returns:
        the server's exit status.
    """
    bundles = [b for b in bundles.split(",") if b] if isinstance(bundles, str) else list(bundles)
    if not bundles:
        raise ValueError("no bundles given: --bundles bundles/finetune_heart,bundles/finetune_brainseg")
    if not Path(studies).is_dir():
        raise NotADirectoryError(f"{studies} is not a folder: give the folder of images to label.")
    python_path = monailabel_python(python)
    models = prepare_monailabel_app(app_dir, bundles, python_path, weights, overrides, reinstall)
    app, studies_dir = Path(app_dir).resolve(), Path(studies).resolve()
    command = start_server_command(python_path, app, studies_dir, models, host, port, conf)
    print(" ".join(command), file=sys.stderr, flush=True)
    # the server leads a process group of its own (with MONAI Label's training subprocesses): Ctrl-C or SIGTERM here
    # is passed on to the whole group once, so that the server shuts down gracefully and leaves no process behind
    process = subprocess.Popen(command, start_new_session=True)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
