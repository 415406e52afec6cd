"""BraTS preparation and label regions for the brain-tumour bundle (arXiv 2212.01893, METHOD.md section 4).

BraTS stores each case as ``<case>_flair``, ``<case>_t1``, ``<case>_t1ce``, ``<case>_t2`` and ``<case>_seg`` NIfTI files
with labels 1 (necrotic / non-enhancing core), 2 (oedema) and 4 (enhancing tumour). The evaluated regions are
whole tumour WT = {1, 2, 4}, tumour core TC = {1, 4} and enhancing tumour ET = {4}; the paper's setting is binary
whole-tumour segmentation from FLAIR alone.

CLI (fire)::

    python -m custom_nets.datasets.brats prepare --src_dir /data/BraTS2020/train --out_dir /data/brats_prepared \
        --modalities flair            # or flair,t1,t1ce,t2
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from custom_nets.data.segmentation import check_header_geometry, split_cases, write_datalist

__all__ = ["BRATS_MODALITIES", "BRATS_REGION_NAMES", "BratsLabelsd", "brats_regions", "check_brats_labels", "prepare"]

BRATS_MODALITIES: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
BRATS_REGION_NAMES: tuple[str, ...] = ("whole_tumour", "tumour_core", "enhancing_tumour")
LABEL_MODES = ("whole_tumour", "regions")


def check_brats_labels(values: Sequence[float], filename: str, et_label: int = 4) -> None:
    """Raise a ``ValueError`` naming ``filename`` unless every value is one of 0, 1, 2 and ``et_label``."""
    allowed = (0, 1, 2, et_label)
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(
            f"{filename}: unexpected BraTS label values {bad[:10]} (allowed: {list(allowed)}). "
            "BraTS 2023 codes enhancing tumour as 3: pass et_label=3."
        )


def brats_regions(label: torch.Tensor, mode: str = "whole_tumour", et_label: int = 4) -> torch.Tensor:
    """BraTS label map ``(1, H, W, D)`` -> ``(1, ...)`` binary whole tumour, or ``(3, ...)`` WT / TC / ET masks."""
    if mode not in LABEL_MODES:
        raise ValueError(f"mode must be one of {LABEL_MODES}, got {mode!r}.")
    whole = label > 0
    if mode == "whole_tumour":
        return whole.to(torch.uint8)
    core = (label == 1) | (label == et_label)
    enhancing = label == et_label
    return torch.cat([whole, core, enhancing], dim=0).to(torch.uint8)


class BratsLabelsd(MapTransform):
    """Validate BraTS label values and convert them to the training target.

    ``mode="whole_tumour"``: ``(1, H, W, D)`` map with 1 = tumour (softmax over background / tumour, the paper's
    setting). ``mode="regions"``: ``(3, H, W, D)`` overlapping binary masks WT, TC, ET (sigmoid outputs).

    Args:
        keys: label keys.
        mode: ``"whole_tumour"`` or ``"regions"``.
        et_label: value of enhancing tumour (4 up to BraTS 2021, 3 in BraTS 2023).
    """

    def __init__(
        self, keys: KeysCollection, mode: str = "whole_tumour", et_label: int = 4, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if mode not in LABEL_MODES:
            raise ValueError(f"mode must be one of {LABEL_MODES}, got {mode!r}.")
        self.mode = mode
        self.et_label = et_label

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            filename = str(getattr(label, "meta", {}).get("filename_or_obj", key))
            check_brats_labels(torch.unique(torch.as_tensor(label)).tolist(), filename, self.et_label)
            d[key] = brats_regions(label, self.mode, self.et_label)
        return d


def _parse_modalities(modalities: str | Sequence[str]) -> list[str]:
    names = [m.strip() for m in modalities.split(",")] if isinstance(modalities, str) else list(modalities)
    unknown = [m for m in names if m not in BRATS_MODALITIES]
    if not names or unknown:
        raise ValueError(f"modalities must be a non-empty subset of {BRATS_MODALITIES}, got {names}.")
    return names


def prepare(
    src_dir: str,
    out_dir: str,
    modalities: str | Sequence[str] = "flair",
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    et_label: int = 4,
) -> str:
    """Check a BraTS training folder and write ``<out_dir>/datalist.json``.

    Every case needs ``<case>_seg.nii.gz`` and ``<case>_<modality>.nii.gz`` for each requested modality in the same
    folder (searched recursively). Headers must agree and label values must be 0, 1, 2, ``et_label``; errors name the
    file. Entries hold ``image`` (the modality files in the order given: they become the input channels) and ``label``,
    relative to ``out_dir`` (the bundle's ``dataset_dir``).

    Returns:
        The datalist path.
    """
    import nibabel as nib

    src, out = Path(src_dir), Path(out_dir)
    names = _parse_modalities(modalities)
    segs = sorted(src.rglob("*_seg.nii*"))
    if not segs:
        raise FileNotFoundError(f"no '*_seg.nii.gz' files under {src}: is it a BraTS training folder?")
    entries = {}
    for seg in segs:
        case = seg.name.split("_seg.nii")[0]
        suffix = seg.name[len(case) + len("_seg") :]
        images = []
        for modality in names:
            image = seg.with_name(f"{case}_{modality}{suffix}")
            if not image.is_file():
                raise FileNotFoundError(f"BraTS case {case}: missing {image} (needed for modality '{modality}').")
            check_header_geometry(image, seg)
            images.append(os.path.relpath(image.resolve(), out.resolve()))
        values = np.unique(np.asanyarray(nib.load(str(seg)).dataobj)).tolist()
        check_brats_labels(values, str(seg), et_label)
        entries[case] = {"image": images, "label": os.path.relpath(seg.resolve(), out.resolve()), "case": case}
    splits = split_cases(list(entries), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    datalist = write_datalist(
        out / "datalist.json",
        {name: [entries[c] for c in ids] for name, ids in splits.items()},
        name="BraTS",
        modalities=names,
        et_label=et_label,
    )
    return str(datalist)


if __name__ == "__main__":
    from custom_nets.command_line import fire_command

    fire_command({"prepare": prepare})
