"""Intensity normalisation selected by imaging modality.

The public code of arXiv 2212.01893 fed raw volume intensities to the network while its 2D stage used normalised
inputs (METHOD.md, section 3, item 6). Here every item is normalised according to its ``modality``:

- CT: Hounsfield units clipped to a window and scaled to [0, 1] (``ScaleIntensityRange``).
- MR: intensities clipped to percentiles, then z-scored (``ClipIntensityPercentiles`` + ``NormalizeIntensity``).
- XR (and items without a modality): percentiles scaled to [0, 1] (``ScaleIntensityRangePercentiles``).

Any NaN or infinite value stops loading with an error that names the file.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    ClipIntensityPercentiles,
    MapTransform,
    NormalizeIntensity,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
)

__all__ = ["MODALITY_ALIASES", "canonical_modality", "image_source", "assert_finite", "ModalityNormalized"]

MODALITY_ALIASES = {
    "CT": "CT",
    "MR": "MR",
    "MRI": "MR",
    "XR": "XR",
    "X-RAY": "XR",
    "XRAY": "XR",
    "CR": "XR",
    "DX": "XR",
    "DR": "XR",
    "RG": "XR",
    "MG": "XR",
}
"""Accepted modality names (upper-cased, DICOM ``Modality`` codes included) and the normalisation they select."""


def canonical_modality(modality: str | None) -> str | None:
    """Map a modality name or DICOM code to ``"CT"``, ``"MR"`` or ``"XR"``; None stays None.

    Raises:
        ValueError: for a name outside :data:`MODALITY_ALIASES`.
    """
    if modality is None:
        return None
    key = str(modality).strip().upper()
    if key not in MODALITY_ALIASES:
        raise ValueError(
            f"unknown modality {modality!r}; use one of {sorted(MODALITY_ALIASES)} or leave it out (percentile scaling)"
        )
    return MODALITY_ALIASES[key]


def image_source(image: torch.Tensor, data: Mapping | None = None, key: Hashable = "image") -> str:
    """The file an image came from: its MetaTensor ``filename_or_obj``, else ``data[key]`` if it is a path."""
    if isinstance(image, MetaTensor) and image.meta.get("filename_or_obj"):
        return str(image.meta["filename_or_obj"])
    if data is not None and isinstance(data.get(f"source_{key}"), str):
        return data[f"source_{key}"]
    return "<in-memory image>"


def assert_finite(image: torch.Tensor, source: str) -> None:
    """Raise a ValueError naming ``source`` when ``image`` holds NaN or infinite values."""
    finite = torch.isfinite(torch.as_tensor(image))
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"{source}: {bad} NaN/inf value(s) in the image; repair the file or remove it from the datalist "
            "(check the whole datalist with custom_nets.data.validate_datalist)"
        )


class ModalityNormalized(MapTransform):
    """Normalise ``keys`` according to the item's modality, after checking that every value is finite.

    Input and output: channel-first tensors of any spatial rank, (C, spatial...); output float32 of the same shape.
    The modality is read from ``data[modality_key]`` (canonical name or alias, see :data:`MODALITY_ALIASES`);
    a missing or None modality uses ``default_modality``. Part of the data pipeline of arXiv 2212.01893 as built here.

    Args:
        keys: keys of the images to normalise.
        modality_key: key of the modality string in the data dict.
        ct_window: (lower, upper) HU window mapped to [0, 1], values outside clipped.
        mr_percentiles: (lower, upper) percentiles that MR images are clipped to before z-scoring.
        xr_percentiles: (lower, upper) percentiles mapped to [0, 1] (clipped) for X-ray and unknown modalities.
        default_modality: normalisation for items without a modality.
        allow_missing_keys: don't raise when a key is absent.

    Raises:
        ValueError: NaN/inf in an image (the message names its file) or an unknown modality.
    """

    def __init__(
        self,
        keys: KeysCollection,
        modality_key: str = "modality",
        ct_window: Sequence[float] = (-1000.0, 1000.0),
        mr_percentiles: Sequence[float] = (0.5, 99.5),
        xr_percentiles: Sequence[float] = (0.5, 99.5),
        default_modality: str = "XR",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modality_key = modality_key
        self.default_modality = canonical_modality(default_modality)
        self.normalisers = {
            "CT": [ScaleIntensityRange(a_min=ct_window[0], a_max=ct_window[1], b_min=0.0, b_max=1.0, clip=True)],
            "MR": [
                ClipIntensityPercentiles(lower=mr_percentiles[0], upper=mr_percentiles[1], sharpness_factor=None),
                NormalizeIntensity(),
            ],
            "XR": [
                ScaleIntensityRangePercentiles(
                    lower=xr_percentiles[0], upper=xr_percentiles[1], b_min=0.0, b_max=1.0, clip=True
                )
            ],
        }

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        modality = canonical_modality(d.get(self.modality_key)) or self.default_modality
        for key in self.key_iterator(d):
            image = d[key]
            assert_finite(image, image_source(image, d, key))
            image = image.float() if isinstance(image, torch.Tensor) else torch.as_tensor(image, dtype=torch.float32)
            for normaliser in self.normalisers[modality]:
                image = normaliser(image)
            d[key] = image
        return d
