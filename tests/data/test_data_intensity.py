"""Modality-selected intensity normalisation against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from custom_nets.data.intensity import ModalityNormalized, canonical_modality


def normalise(image, modality, **kwargs):
    return ModalityNormalized("image", **kwargs)({"image": image, "modality": modality})["image"]


def test_ct_window_maps_hounsfield_units_to_unit_range():
    hu = torch.tensor([[[-2000.0, -1000.0, -500.0, 0.0, 400.0, 1000.0, 3000.0]]])
    out = normalise(hu, "CT")
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.0, 0.25, 0.5, 0.7, 1.0, 1.0]]]))
    narrow = normalise(hu, "ct", ct_window=(-160.0, 240.0))
    torch.testing.assert_close(narrow, torch.tensor([[[0.0, 0.0, 0.0, 0.4, 1.0, 1.0, 1.0]]]))


def test_mr_percentile_clip_then_z_score():
    values = np.random.default_rng(0).gamma(2.0, 100.0, size=(1, 20, 30)).astype(np.float32)
    values[0, 0, 0] = 1e5  # outlier that the clip must remove
    low, high = np.percentile(values, [1.0, 99.0])
    clipped = np.clip(values, low, high)
    expected = (clipped - clipped.mean()) / clipped.std()
    out = normalise(torch.from_numpy(values), "MRI", mr_percentiles=(1.0, 99.0))
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-4)
    assert abs(float(out.mean())) < 1e-5 and abs(float(out.std(unbiased=False)) - 1.0) < 1e-4


def test_xray_and_unspecified_modalities_use_percentile_scaling():
    values = torch.arange(1001, dtype=torch.float32).reshape(1, 7, 143)
    expected = ((values - 50.0) / 900.0).clamp(0.0, 1.0)  # 5th/95th percentiles of 0..1000 are 50 and 950
    torch.testing.assert_close(normalise(values, "DX", xr_percentiles=(5.0, 95.0)), expected)
    torch.testing.assert_close(normalise(values, None, xr_percentiles=(5.0, 95.0)), expected)


def test_nan_names_the_file():
    image = torch.zeros(1, 4, 4)
    image[0, 1, 2] = float("nan")
    data = {"image": image, "modality": "CT", "source_image": "/data/bad_scan.nii.gz"}
    with pytest.raises(ValueError, match=r"/data/bad_scan.nii.gz: 1 NaN/inf"):
        ModalityNormalized("image")(data)


def test_infinite_values_are_rejected():
    image = torch.ones(1, 3, 3)
    image[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        normalise(image, "MR")


def test_modality_aliases_and_unknown_names():
    assert [canonical_modality(m) for m in ("ct", "MR", "mri", "CR", "x-ray", None)] == [
        "CT",
        "MR",
        "MR",
        "XR",
        "XR",
        None,
    ]
    with pytest.raises(ValueError, match="unknown modality 'PET'"):
        canonical_modality("PET")
