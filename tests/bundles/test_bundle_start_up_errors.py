"""A bundle run by the stock ``python -m monai.bundle run`` that stops at its start-up check ends with the list of
problems on stderr and exit status 1, no traceback (MONAI wraps the check's error in ``RuntimeError: Failed to
evaluate``; :func:`custom_nets.command_line.report_input_errors_without_traceback` unwraps it), for every bundle's
training, and for the inference of heart, CXR and pretrain_joint (a bad image stops it before the network sees it)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from custom_nets.command_line import USER_ERROR_EXIT, input_error_in
from custom_nets.data.datalist import DatalistError
from custom_nets.datasets import brats

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"


def _volume(path: Path, array: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path.name


def _segmentation_data(folder: Path) -> list[str]:
    """Image / label pairs: one good, one with a missing image, one with label value 9; returns the expected lines."""
    rng = np.random.default_rng(0)
    label = np.zeros((16, 16, 4), dtype=np.int16)
    label[4:12, 4:12] = 1
    bad_label = label.copy()
    bad_label[0, 0, 0] = 9
    good = {"image": _volume(folder / "a.nii.gz", rng.random(label.shape, dtype=np.float32)), "label": "a_seg.nii.gz"}
    _volume(folder / "a_seg.nii.gz", label)
    out_of_range = {"image": _volume(folder / "b.nii.gz", rng.random(label.shape, dtype=np.float32))}
    out_of_range["label"] = _volume(folder / "b_seg.nii.gz", bad_label)
    missing = {"image": "missing.nii.gz", "label": _volume(folder / "c_seg.nii.gz", label)}
    (folder / "datalist.json").write_text(json.dumps({"training": [good, missing], "validation": [out_of_range]}))
    return [
        f"[training] {folder / 'missing.nii.gz'}: file not found",
        f"[validation] label {folder / 'b_seg.nii.gz'} has values [9.0] outside 0..",
    ]


def _pretraining_data(folder: Path) -> list[str]:
    items = [{"image": _volume(folder / "a.nii.gz", np.random.default_rng(0).random((16, 16, 8), dtype=np.float32))}]
    items.append({"image": "missing.nii.gz"})
    (folder / "datalist.json").write_text(json.dumps({"training": items}))
    return [f"[training] {folder / 'missing.nii.gz'}: file not found"]


def _detection_data(folder: Path) -> list[str]:
    lists = {key: [{"image": f"{key}.png", "box": [[1, 1, 5, 5]], "label": [0]}] for key in ("training", "validation")}
    (folder / "datalist.json").write_text(json.dumps(lists))
    return [f"[{key}] {folder / key}.png: file not found" for key in lists]


def _candidate_data(folder: Path) -> list[str]:
    """Cubes of another size than the bundle's: ``luna16.check_prepared`` refuses them (a plain ``ValueError``)."""
    content = {"cube_size": [8, 8, 8], "spacing_mm": [1.0, 1.0, 1.0], "scans": {}, "subset0": []}
    (folder / "datalist.json").write_text(json.dumps(content))
    return [f"{folder / 'datalist.json'} holds cubes of size [8, 8, 8]"]


CASES = {
    "finetune_heart": (_segmentation_data, {}),
    "finetune_brainseg": (_segmentation_data, {"label_mode": "plain", "class_names": ["background", "tissue"]}),
    "pretrain_joint": (_pretraining_data, {}),
    "finetune_cxr": (_detection_data, {}),
    "finetune_nodule": (_candidate_data, {}),
}


def _bundle_run(
    bundle_checks,
    bundle: str,
    tmp_path: Path,
    overrides: dict,
    env: dict | None = None,
    configs: tuple[str, ...] = ("train.json",),
    launcher: tuple[str, ...] = (),
):
    """``python -m monai.bundle run`` of the repository's bundle on ``tmp_path / "data"``, every output sent to
    ``tmp_path``."""
    root = BUNDLES / bundle
    settings = {"bundle_root": str(root), "dataset_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "out")}
    if configs[0] == "train.json":
        settings |= {"datalist": str(tmp_path / "data" / "datalist.json"), "ckpt_dir": str(tmp_path / "models")}
    settings |= {"num_workers": 0, **overrides}
    files = [root / "configs" / name for name in configs]
    return bundle_checks.monai_bundle_run(files, settings, tmp_path, env, launcher)


def _problem_lines(result) -> list[str]:
    """The problems a failed run printed: the lines after the last ``error:`` header (MONAI's warnings come before),
    after checking the exit status and that no traceback was shown."""
    assert result.returncode == USER_ERROR_EXIT, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr[-3000:]
    assert "Failed to evaluate" not in result.stderr
    lines = result.stderr.splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("error:"))
    problems = lines[header + 1 :]
    assert all(line.startswith("  ") for line in problems), lines[header:]
    return [line.strip() for line in problems]


@pytest.mark.slow
@pytest.mark.parametrize("bundle", list(CASES))
def test_start_up_check_failure_lists_the_problems_without_traceback(bundle, tmp_path, bundle_checks):
    (tmp_path / "data").mkdir()
    make_data, overrides = CASES[bundle]
    expected = make_data(tmp_path / "data")
    result = _bundle_run(bundle_checks, bundle, tmp_path, overrides)
    problems = _problem_lines(result)
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start), (problem, start)


@pytest.mark.slow
def test_a_wrong_channel_count_stops_brainseg_with_one_line(tmp_path, bundle_checks):
    """The bundle's data_expectations: four modality files per case while ``modalities`` is the default ['flair']
    (a 1-channel network) give one line naming the first file, the found and the expected count, and the fix."""
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    label = np.zeros((16, 16, 4), dtype=np.int16)
    label[4:12, 4:12] = 1
    images = [
        _volume(folder / f"a_{m}.nii.gz", rng.random(label.shape, dtype=np.float32)) for m in brats.BRATS_MODALITIES
    ]
    item = {"image": images, "label": _volume(folder / "a_seg.nii.gz", label)}
    (folder / "datalist.json").write_text(json.dumps({"training": [item]}))
    result = _bundle_run(bundle_checks, "finetune_brainseg", tmp_path, {"validate_data": True})
    assert _problem_lines(result) == [
        f"[training] {folder / 'a_flair.nii.gz'} (+3 channel file(s)): 4 channel(s), the bundle expects 1 "
        "(expected_channels); list one single-channel file per modality of ['flair'] in that order, or set "
        "modalities to the sequences your images hold (in_channels follows)"
    ]


def _heart_channels(folder: Path) -> tuple[dict, str]:
    name = _volume(folder / "two_echoes.nii.gz", np.random.default_rng(0).random((16, 16, 4, 2), dtype=np.float32))
    return {}, f"{folder / name}: 2 channel(s), the bundle expects 1 (expected_channels)"


def _heart_nan(folder: Path) -> tuple[dict, str]:
    volume = np.random.default_rng(0).random((16, 16, 4), dtype=np.float32)
    volume[3, 3, 1] = np.nan
    return {}, f"{folder / _volume(folder / 'nan.nii.gz', volume)}: NaN or infinite voxel values"


def _heart_missing(folder: Path) -> tuple[dict, str]:
    items = [{"image": "ok.nii.gz"}, {"image": "gone.nii.gz"}]  # ok.nii.gz: the test writes it
    (folder / "datalist.json").write_text(json.dumps({"testing": items}))
    return {"datalist": str(folder / "datalist.json")}, f"{folder / 'gone.nii.gz'}: file not found (item 1, image)"


def _heart_ok(folder: Path) -> str:
    return _volume(folder / "ok.nii.gz", np.random.default_rng(1).random((16, 16, 4), dtype=np.float32))


def _radiograph(folder: Path, name: str = "ok.png", channels: int = 1) -> Path:
    """A random 32 x 32 PNG: grey (1 channel) or grey + alpha (2)."""
    shape = (32, 32) if channels == 1 else (32, 32, channels)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)).save(folder / name)
    return folder / name


def _cxr_channels(folder: Path) -> tuple[dict, str]:
    return {}, f"{_radiograph(folder, 'grey_alpha.png', channels=2)}: "


def _cxr_unreadable(folder: Path) -> tuple[dict, str]:
    (folder / "notes.png").write_text("not an image")
    return {}, f"{folder / 'notes.png'}: cannot read it as a radiograph"


def _cxr_missing(folder: Path) -> tuple[dict, str]:
    items = [{"image": "ok.png", "image_id": "ok"}, {"image": "gone.png"}]  # ok.png: the test writes it
    (folder / "datalist.json").write_text(json.dumps({"testing": items}))
    return {"datalist": str(folder / "datalist.json")}, f"{folder / 'gone.png'}: file not found (item 1)"


INFERENCE_CASES = {
    "heart_wrong_channel_count": ("finetune_heart", _heart_channels),
    "heart_nan_volume": ("finetune_heart", _heart_nan),
    "heart_missing_file": ("finetune_heart", _heart_missing),
    "cxr_grey_and_alpha_png": ("finetune_cxr", _cxr_channels),
    "cxr_unreadable_file": ("finetune_cxr", _cxr_unreadable),
    "cxr_missing_file": ("finetune_cxr", _cxr_missing),
    "embeddings_missing_file": ("pretrain_joint", lambda folder: ({}, _pretraining_data(folder)[0])),
}
GOOD_IMAGE = {"finetune_heart": _heart_ok, "finetune_cxr": _radiograph, "pretrain_joint": lambda folder: None}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(INFERENCE_CASES))
def test_a_bad_image_stops_inference_with_one_line(case, tmp_path, bundle_checks):
    """One bad image beside a good one (in a folder of images, or a datalist's ``testing`` list): the start-up check
    stops the run with exit status 1 and one line naming it, no traceback (no trained weights are needed to get
    there)."""
    folder = tmp_path / "data"
    folder.mkdir()
    bundle, make = INFERENCE_CASES[case]
    overrides, expected = make(folder)
    GOOD_IMAGE[bundle](folder)
    result = _bundle_run(bundle_checks, bundle, tmp_path, overrides, configs=("inference.json",))
    (problem,) = _problem_lines(result)
    assert problem.startswith(expected), (problem, expected)


@pytest.mark.slow
def test_under_torchrun_rank_0_lists_the_problems_before_torchrun_reports_the_failure(tmp_path, bundle_checks):
    """Two CPU processes with the multi-GPU overlay: rank 0 checks the datalist and prints the problems (torchrun
    prefixes ``[rank0]:``) with exit status 1; torchrun then adds its own ChildFailedError report, which no worker can
    turn off (documented in the README, "Bad input under torchrun")."""
    (tmp_path / "data").mkdir()
    expected = _segmentation_data(tmp_path / "data")
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    result = _bundle_run(
        bundle_checks, "finetune_heart", tmp_path, {}, configs=("train.json", "multi_gpu_train.json"), launcher=launcher
    )
    assert result.returncode == USER_ERROR_EXIT, result.stderr[-3000:]
    lines = [line.removeprefix("[rank0]: ") for line in result.stderr.splitlines() if line.startswith("[rank0]:")]
    header = lines.index("error: 2 problem(s):")
    for problem, start in zip(lines[header + 1 : header + 3], expected, strict=True):
        assert problem.strip().startswith(start), (problem, start)
    assert "Traceback" not in "\n".join(lines)  # the worker's own output: the list only
    assert "ChildFailedError" in result.stderr and "exitcode  : 1" in result.stderr  # torchrun's report follows


@pytest.mark.slow
def test_traceback_is_shown_on_request(tmp_path, bundle_checks):
    (tmp_path / "data").mkdir()
    _segmentation_data(tmp_path / "data")
    result = _bundle_run(bundle_checks, "finetune_heart", tmp_path, {}, env={"CUSTOM_NETS_TRACEBACK": "1"})
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "Failed to evaluate" in result.stderr and "DatalistError" in result.stderr


def _wrapped_like_monai(check) -> RuntimeError:
    """What ``ConfigExpression.evaluate`` makes of an error: ``RuntimeError("Failed to evaluate ...")`` from it."""
    try:
        try:
            check()
        except Exception as error:
            raise RuntimeError("Failed to evaluate ConfigExpression") from error
    except RuntimeError as outer:
        return outer


def _missing_file() -> None:
    raise DatalistError("x.nii.gz: file not found", ["x.nii.gz: file not found"])


def test_only_input_errors_of_this_package_are_unwrapped():
    assert isinstance(input_error_in(_wrapped_like_monai(_missing_file)), DatalistError)
    ours = input_error_in(_wrapped_like_monai(lambda: brats.check_label_mode("bogus", ["background"])))
    assert isinstance(ours, ValueError) and "label_mode must be one of" in str(ours)
    assert input_error_in(_wrapped_like_monai(lambda: int("x"))) is None  # a ValueError raised by Python: maybe a bug
    assert input_error_in(RuntimeError("no cause")) is None
