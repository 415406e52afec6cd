"""Command-line use as a new user tries it: bad input prints the list of problems and exits 1, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from custom_nets.command_line import USER_ERROR_EXIT, fire_command, problem_lines
from custom_nets.data.datalist import DatalistError


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m custom_nets.cli ARGS`` (a few seconds each: the process imports torch and MONAI)."""
    return subprocess.run([sys.executable, "-m", "custom_nets.cli", *args], capture_output=True, text=True, timeout=300)


def _write_volume(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((6, 6, 4)).astype(np.float32), np.eye(4)), path)
    return path


@pytest.mark.slow
def test_make_datalist_elsewhere_then_validate_data(tmp_path):
    """The reported bug: a datalist written to another folder must validate."""
    _write_volume(tmp_path / "scans" / "a.nii.gz")
    _write_volume(tmp_path / "scans" / "sub" / "b.nii.gz")
    out = tmp_path / "lists" / "datalist.json"
    made = _cli("make_datalist", "--root", str(tmp_path / "scans"), "--out", str(out))
    assert made.returncode == 0, made.stderr
    report = tmp_path / "report.json"
    checked = _cli("validate_data", str(out), "--report", str(report))
    assert checked.returncode == 0, checked.stderr
    assert json.loads(report.read_text()) == {
        "datalist": str(out),
        "ok": True,
        "summary": {
            "items": 2,
            "kinds": {"volume": 2},
            "modalities": {"unspecified": 2},
            "keys": ["training"],
            "warnings": [],
        },
    }


@pytest.mark.slow
def test_validate_data_lists_problems_without_traceback(tmp_path):
    _write_volume(tmp_path / "good.nii.gz")
    (tmp_path / "corrupt.nii.gz").write_bytes(b"not a volume")
    datalist = tmp_path / "datalist.json"
    items = [{"image": "good.nii.gz"}, {"image": "corrupt.nii.gz"}, {"image": "missing.nii.gz"}]
    datalist.write_text(json.dumps({"training": items}))
    report = tmp_path / "report.json"
    result = _cli("validate_data", str(datalist), "--report", str(report))
    assert result.returncode == USER_ERROR_EXIT
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert "missing.nii.gz: file not found" in result.stderr
    content = json.loads(report.read_text())
    assert content["ok"] is False and len(content["problems"]) == 1  # a missing file stops before any file is read
    assert "missing.nii.gz" in content["problems"][0]
    (tmp_path / "missing.nii.gz").symlink_to(tmp_path / "good.nii.gz")
    result = _cli("validate_data", str(datalist))
    assert result.returncode == USER_ERROR_EXIT and "Traceback" not in result.stderr
    assert f"{tmp_path / 'corrupt.nii.gz'}: unreadable NIfTI header" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (("make_datalist", "--root", "{tmp}/nowhere", "--out", "{tmp}/d.json"), "nowhere: not a folder"),
        (("make_datalist", "--root", "{tmp}", "--out", "{tmp}/d.json"), "no PNG/JPG, DICOM, NIfTI"),
        (("validate_data", "{tmp}/absent.json"), "absent.json: datalist file not found"),
        (("prepare_brats", "--src_dir", "{tmp}", "--out_dir", "{tmp}/out"), "no '*_seg.nii.gz' files"),
        (("prepare_mmwhs", "--src_dir", "{tmp}", "--out_dir", "{tmp}/out"), "no '*_<id>_image.nii.gz' files"),
    ],
)
def test_every_command_reports_user_errors_cleanly(tmp_path, args, message):
    result = _cli(*(arg.format(tmp=tmp_path) for arg in args))
    assert result.returncode == USER_ERROR_EXIT, result.stderr
    assert "Traceback" not in result.stderr and message in result.stderr, result.stderr


def test_fire_command_in_process(capsys):
    def broken(path: str = "x") -> None:
        raise DatalistError("list.json: 2 problem(s)", [f"{path}: missing", "y: corrupt"])

    with pytest.raises(SystemExit) as stop:
        fire_command(broken, ["--path", "a.png"])
    assert stop.value.code == USER_ERROR_EXIT
    assert capsys.readouterr().err.splitlines() == ["error: 2 problem(s):", "  a.png: missing", "  y: corrupt"]
    assert problem_lines(ValueError("one\ntwo")) == ["one", "two"]

    def bug() -> None:
        raise RuntimeError("a bug keeps its traceback")

    with pytest.raises(RuntimeError):
        fire_command(bug, [])


def test_demo_protocols_flag_reaches_the_demo_and_an_unknown_one_stops_it_first(tmp_path, capsys, monkeypatch):
    from custom_nets import cli

    with pytest.raises(SystemExit) as stop:  # refused before any corpus is written or anything trains
        fire_command(cli.demo, ["--workdir", str(tmp_path / "demo"), "--protocols", "[frozen,linear]"])
    assert stop.value.code == USER_ERROR_EXIT
    assert "unknown fine-tuning protocols ['linear']" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()

    calls = []
    monkeypatch.setattr(cli, "run_demo", lambda *args, **kwargs: calls.append(kwargs))
    fire_command(cli.demo, ["--protocols", "[end_to_end,frozen]"])
    fire_command(cli.demo, [])
    fire_command(cli.demo, ["--protocols", "frozen"])
    fire_command(cli.demo, ["--protocols", "frozen,frozen_then_end_to_end"])
    assert calls[0]["protocols"] == ("end_to_end", "frozen") and "protocols" not in calls[1]
    assert calls[2]["protocols"] == ("frozen",) and calls[3]["protocols"] == ("frozen", "frozen_then_end_to_end")
