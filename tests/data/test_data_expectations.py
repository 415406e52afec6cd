"""What a bundle expects of its images (``custom_nets.data.expectations``): the geometry rules on hand-built affines,
and every bundle's ``data_expectations`` as its train.json states them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from monai.bundle import ConfigParser

from custom_nets.data.expectations import DataExpectations, affine_problems, channel_problem
from custom_nets.data.validate_data import bundle_expectations

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
SLICE_WISE = DataExpectations(channels=1, max_inplane_anisotropy=3.0, max_slice_anisotropy=10.0)


def _affine(columns: np.ndarray) -> np.ndarray:
    """Homogeneous affine whose spatial columns (one per voxel axis, world RAS mm) are ``columns``."""
    affine = np.eye(4)
    affine[:3, :3] = columns
    return affine


def test_an_oblique_orthogonal_grid_passes():
    angle = np.deg2rad(30.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    findings = affine_problems(_affine(rotation * [0.7, 0.7, 2.5]), "oblique.nii", SLICE_WISE)
    assert findings.errors == [] and findings.warnings == []


def test_in_plane_means_the_axial_plane_after_reorientation_to_ras():
    # voxel axes along S, R, A with 5, 0.5, 0.5 mm: axial pixels 0.5 x 0.5, slices 5 mm apart (ratio 10, not > 10)
    axial_stack = np.array([[0, 0.5, 0], [0, 0, 0.5], [5.0, 0, 0]])
    assert affine_problems(_affine(axial_stack), "axial.nii", SLICE_WISE).errors == []
    # a sagittal acquisition (voxel axes along A, S, R with 0.5, 0.5, 5 mm): axial pixels 5 x 0.5 mm, ratio 10 > 3
    sagittal = np.array([[0, 0, 5.0], [0.5, 0, 0], [0, 0.5, 0]])
    (error,) = affine_problems(_affine(sagittal), "sagittal.nii", SLICE_WISE).errors
    assert error.startswith("sagittal.nii: axial pixels of 5 x 0.5 mm (ratio 10 > 3")
    assert affine_problems(_affine(sagittal), "sagittal.nii", DataExpectations()).errors == []  # bundles that resample


def test_a_slightly_non_orthogonal_grid_passes_and_a_sheared_one_does_not():
    def sheared(degrees: float) -> np.ndarray:
        return _affine(np.array([[1, np.sin(np.deg2rad(degrees)), 0], [0, np.cos(np.deg2rad(degrees)), 0], [0, 0, 1]]))

    assert affine_problems(sheared(0.5), "a.nii", SLICE_WISE).errors == []
    (error,) = affine_problems(sheared(2.0), "b.nii", SLICE_WISE).errors
    assert "b.nii: voxel axes are not perpendicular (88.0 degrees between two axes" in error


def test_channel_problem_names_the_found_and_the_expected_count():
    assert channel_problem(1, "a.nii.gz", SLICE_WISE) is None
    assert channel_problem(4, "a.nii.gz", DataExpectations()) is None  # no expectation: not checked
    assert channel_problem(4, "a.nii.gz", SLICE_WISE).startswith("a.nii.gz: 4 channel(s), the bundle expects 1")


@pytest.mark.parametrize(
    "bundle, channels, inplane",
    [
        ("finetune_heart", 1, 3.0),
        ("finetune_brainseg", 1, 3.0),
        ("pretrain_joint", None, 3.0),
        ("finetune_cxr", None, None),
        ("finetune_nodule", None, None),
    ],
)
def test_every_bundle_states_its_expectations(bundle, channels, inplane):
    expectations = bundle_expectations(bundle)
    assert isinstance(expectations, DataExpectations)
    assert (expectations.channels, expectations.max_inplane_anisotropy, expectations.max_spacing_mm) == (
        channels,
        inplane,
        20.0,
    )
    assert bundle_expectations(BUNDLES / bundle) == expectations  # a folder works as well as a name


def test_expectations_follow_the_bundle_keys_they_derive_from():
    brainseg = ConfigParser()
    brainseg.read_config(str(BUNDLES / "finetune_brainseg" / "configs" / "train.json"))
    brainseg["modalities"] = ["flair", "t1", "t1ce", "t2"]
    assert brainseg.get_parsed_content("data_expectations").channels == 4
    pretrain = ConfigParser()
    pretrain.read_config(str(BUNDLES / "pretrain_joint" / "configs" / "train.json"))
    pretrain["spacing"] = [1.0, 1.0, 2.5]  # Spacingd resamples in-plane: any axial pixel shape is fine
    assert pretrain.get_parsed_content("data_expectations").max_inplane_anisotropy is None
    assert bundle_expectations("finetune_cxr").averages_rgba is False  # read_chest_xray keeps R, G, B only
    assert bundle_expectations("finetune_cxr").pixel_spacing_range_mm == [0.02, 5.0]  # DICOM radiograph pixels
    assert bundle_expectations("pretrain_joint").pixel_spacing_range_mm == [0.02, 5.0]  # its 2D DICOMs too


@pytest.mark.parametrize(
    "bundle, overrides",
    [
        ("finetune_heart", {}),
        ("finetune_brainseg", {}),
        ("finetune_brainseg", {"modalities": ["flair", "t1", "t1ce", "t2"]}),
        ("finetune_cxr", {}),
        ("finetune_nodule", {}),
        ("pretrain_joint", {}),
        ("pretrain_joint", {"spacing": [1.0, 1.0, 2.5]}),
    ],
)
def test_inference_checks_what_training_checks(bundle, overrides):
    """inference.json runs alone (not over train.json), so it states the expectations again: they must agree."""
    parsed = []
    for name in ("train.json", "inference.json"):
        parser = ConfigParser()
        parser.read_config(str(BUNDLES / bundle / "configs" / name))
        parser.update(overrides)
        parsed.append(parser.get_parsed_content("data_expectations"))
    assert parsed[0] == parsed[1]
