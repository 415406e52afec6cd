"""BraTS preparation and label regions for the brain-tumour bundle (arXiv 2212.01893, METHOD.md section 4).

BraTS stores each case as ``<case>_flair``, ``<case>_t1``, ``<case>_t1ce``, ``<case>_t2`` and ``<case>_seg`` NIfTI files
with labels 1 (necrotic / non-enhancing core), 2 (oedema) and 4 (enhancing tumour). The evaluated regions are
whole tumour WT = {1, 2, 4}, tumour core TC = {1, 4} and enhancing tumour ET = {4}; the paper's setting is binary
whole-tumour segmentation from FLAIR alone.

Own data with a plain label map (values 0..K-1, e.g. 1 grey / 2 white matter) goes through ``label_mode="plain"`` with
one ``class_names`` entry per value: the values are checked and kept. BraTS codes would silently merge such labels into
"whole tumour", so :func:`check_label_mode` refuses ``class_names`` that do not fit the chosen mode.

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

__all__ = [
    "BRATS_MODALITIES",
    "BRATS_REGION_NAMES",
    "LABEL_MODES",
    "BratsLabelsd",
    "brats_regions",
    "check_brats_labels",
    "check_label_mode",
    "check_plain_labels",
    "prepare",
]

BRATS_MODALITIES: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
BRATS_REGION_NAMES: tuple[str, ...] = ("whole_tumour", "tumour_core", "enhancing_tumour")
LABEL_MODES = ("whole_tumour", "regions", "plain")
"""``whole_tumour`` / ``regions``: BraTS codes 1, 2, et_label; ``plain``: a label map 0..K-1, one class per value."""

_CLASSES_OF_MODE = {"whole_tumour": 2, "regions": 3}


def check_label_mode(mode: str, class_names: Sequence[str]) -> None:
    """Refuse a ``label_mode`` / ``class_names`` pair that would train something other than what it says.

    ``whole_tumour`` trains exactly 2 classes (background, whole tumour), ``regions`` exactly 3 (WT, TC, ET);
    ``plain`` needs at least 2 names (background first), one per label value 0..K-1.

    Raises:
        ValueError: naming the mode, the class names and the fix.
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {mode!r}.")
    names = list(class_names)
    expected = _CLASSES_OF_MODE.get(mode)
    if expected is not None and len(names) != expected:
        raise ValueError(
            f"label_mode {mode!r} reads BraTS codes (1, 2, 4) and trains {expected} classes, but class_names has "
            f"{len(names)}: {names}. For your own label map with values 0..{len(names) - 1}, set label_mode 'plain' "
            "(one class name per value, background first); for BraTS keep the default class_names."
        )
    if mode == "plain" and len(names) < 2:
        raise ValueError(f"label_mode 'plain' needs one class name per label value, background first; got {names}.")


def check_plain_labels(values: Sequence[float], filename: str, class_names: Sequence[str]) -> None:
    """Raise a ``ValueError`` naming ``filename`` unless every value is an integer in ``0..len(class_names) - 1``."""
    bad = [v for v in values if v != int(v) or not 0 <= v < len(class_names)]
    if bad:
        raise ValueError(
            f"{filename}: label values {bad[:10]} are not class indices 0..{len(class_names) - 1} of class_names "
            f"{list(class_names)}. Give one class name per label value, or map the labels to 0..K-1 first."
        )


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
    if mode not in _CLASSES_OF_MODE:
        raise ValueError(f"mode must be one of {tuple(_CLASSES_OF_MODE)} for BraTS codes, got {mode!r}.")
    whole = label > 0
    if mode == "whole_tumour":
        return whole.to(torch.uint8)
    core = (label == 1) | (label == et_label)
    enhancing = label == et_label
    return torch.cat([whole, core, enhancing], dim=0).to(torch.uint8)


class BratsLabelsd(MapTransform):
    """Validate label values and convert them to the training target.

    ``mode="whole_tumour"``: ``(1, H, W, D)`` map with 1 = tumour (softmax over background / tumour, the paper's
    setting). ``mode="regions"``: ``(3, H, W, D)`` overlapping binary masks WT, TC, ET (sigmoid outputs).
    ``mode="plain"``: the ``(1, H, W, D)`` label map unchanged, after checking that its values are 0..K-1 for the K
    ``class_names`` (own data).

    Args:
        keys: label keys.
        mode: ``"whole_tumour"``, ``"regions"`` or ``"plain"``.
        et_label: value of enhancing tumour (4 up to BraTS 2021, 3 in BraTS 2023).
        class_names: the trained classes; checked against ``mode`` (:func:`check_label_mode`). Required for
            ``"plain"``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mode: str = "whole_tumour",
        et_label: int = 4,
        class_names: Sequence[str] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if class_names is None and mode == "plain":
            raise ValueError("label_mode 'plain' needs class_names: one name per label value, background first.")
        check_label_mode(mode, class_names if class_names is not None else ["?"] * _CLASSES_OF_MODE.get(mode, 2))
        self.mode = mode
        self.et_label = et_label
        self.class_names = list(class_names) if class_names is not None else None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            filename = str(getattr(label, "meta", {}).get("filename_or_obj", key))
            values = torch.unique(torch.as_tensor(label)).tolist()
            if self.mode == "plain":
                check_plain_labels(values, filename, self.class_names)
                continue
            check_brats_labels(values, filename, self.et_label)
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
