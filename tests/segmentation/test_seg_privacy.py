"""finetune_heart and finetune_brainseg run as a user would, from an empty working directory with `output_dir` and
`ckpt_dir` elsewhere: the patient identifiers a user carries over from DICOM (in NIfTI header text fields and extra
datalist keys) reach no output, and nothing is written outside the output folder (bundle, dataset and working
directory untouched)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import pytest
from monai.bundle import run

from custom_nets.datasets import brats, mmwhs

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
TINY = {"encoder_depth": 18, "decoder_channels": [16, 16, 8, 8, 8], "image_size": [32, 32], "num_workers": 0}


def _stamp_nifti(path: Path, identifiers: dict[str, str]) -> None:
    """Write the identifiers into the text fields of a NIfTI header (``descrip``, ``aux_file``, ``intent_name``), as
    DICOM-to-NIfTI converters can do."""
    image = nib.load(path)
    header = image.header.copy()
    header["descrip"] = " ".join(identifiers[k] for k in ("PatientName", "PatientID", "InstitutionName")).encode()
    header["aux_file"] = identifiers["AccessionNumber"].encode()
    header["intent_name"] = identifiers["PatientBirthDate"].encode()
    data = image.get_fdata(dtype="float32").astype(image.get_data_dtype())
    nib.save(nib.Nifti1Image(data, image.affine, header), path)


def _prepared(bundle: str, tmp_path: Path, seg_data, identifiers: dict[str, str]) -> tuple[Path, Path]:
    """The bundle's raw folder, every NIfTI stamped with ``identifiers``, and its prepared ``dataset_dir``."""
    dataset_dir = tmp_path / "data"
    if bundle == "finetune_heart":
        raw = seg_data.make_heart_folder(tmp_path / "raw")
    else:
        raw = seg_data.make_brats_folder(tmp_path / "raw")
    for path in raw.rglob("*.nii.gz"):
        _stamp_nifti(path, identifiers)
    if bundle == "finetune_heart":
        mmwhs.prepare(str(raw), str(dataset_dir), split="random", val_fraction=0.25, test_fraction=0.25)
    else:
        brats.prepare(str(raw), str(dataset_dir), modalities=["flair"], val_fraction=0.25, test_fraction=0.25)
    return raw, dataset_dir


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ["finetune_heart", "finetune_brainseg"])
def test_outputs_hold_no_identifier_and_stay_under_output_dir(bundle, tmp_path, seg_data, bundle_checks, monkeypatch):
    identifiers = bundle_checks.IDENTIFIERS
    raw, dataset_dir = _prepared(bundle, tmp_path, seg_data, identifiers)
    datalist = dataset_dir / "datalist.json"
    content = json.loads(datalist.read_text())
    for split in ("training", "validation", "testing"):  # a user's datalist carrying the DICOM tags along
        content[split] = [{**item, **identifiers} for item in content[split]]
    datalist.write_text(json.dumps(content))
    assert bundle_checks.leaked_identifiers(bundle_checks.output_bytes(dataset_dir))  # the search finds the input's

    outputs, cwd = tmp_path / "outputs", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    root = BUNDLES / bundle
    watched = (root, raw, dataset_dir, cwd)
    before = bundle_checks.snapshot(*watched)
    common = {
        "config_file": [str(root / "configs" / "train.json")],
        "meta_file": str(root / "configs" / "metadata.json"),
        "logging_file": str(root / "configs" / "logging.conf"),
        "bundle_root": str(root),
        "dataset_dir": str(dataset_dir),
        "output_dir": str(outputs),
        "ckpt_dir": str(outputs / "models"),
        **TINY,
    }
    with bundle_checks.log_to(outputs / "run.log"):
        run(**common, epochs=1, val_interval=1, batch_size=1, slices_per_volume=2)
        run(**{**common, "config_file": [*common["config_file"], str(root / "configs" / "evaluate.json")]})
    bundle_checks.assert_confined(before, bundle_checks.snapshot(*watched), outputs)
    written = {p.relative_to(outputs).parts[0] for p in outputs.rglob("*") if p.is_file()}
    assert written >= {"models", "checkpoints", "tensorboard", "eval", "run.log"}
    assert any((outputs / "eval" / "predictions").glob("*_seg.nii.gz"))  # the NIfTI outputs are searched too
    assert bundle_checks.leaked_identifiers(bundle_checks.output_bytes(outputs)) == []
