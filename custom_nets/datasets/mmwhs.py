"""MM-WHS (multi-modality whole heart segmentation) preparation for the heart bundle (arXiv 2212.01893, section 4).

MM-WHS stores each case as ``<prefix>_<id>_image.nii.gz`` / ``<prefix>_<id>_label.nii.gz`` (ids 1001-1020 for the CT and
the MR training sets) with the raw label values 205, 420, 500, 550, 600, 820, 850. They are mapped to classes 1..7
(the authors' public heart script skips this mapping for the documented dataset names, leaving binary masks: see
METHOD.md section 3.4); any other value is rejected with the file named. The authors' split is the ``authors`` preset.

CLI (fire)::

    python -m custom_nets.datasets.mmwhs prepare --src_dir /data/mmwhs/ct_train --out_dir /data/mmwhs_ct_prepared
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from custom_nets.data.segmentation import check_header_geometry, split_cases, write_datalist

__all__ = ["MMWHS_AUTHORS_SPLIT", "MMWHS_CLASS_NAMES", "MMWHS_RAW_LABELS", "map_mmwhs_labels", "prepare"]

MMWHS_RAW_LABELS: tuple[int, ...] = (205, 420, 500, 550, 600, 820, 850)
MMWHS_CLASS_NAMES: tuple[str, ...] = (
    "background",
    "lv_myocardium",  # 205
    "left_atrium",  # 420
    "left_ventricle",  # 500
    "right_atrium",  # 550
    "right_ventricle",  # 600
    "ascending_aorta",  # 820
    "pulmonary_artery",  # 850
)
MMWHS_AUTHORS_SPLIT: dict[str, tuple[int, ...]] = {
    "training": (1001, 1003, 1005, 1006, 1008, 1009, 1011, 1014, 1015, 1016, 1017, 1018, 1020),
    "validation": (1004, 1007, 1013),
    "testing": (1002, 1010, 1012, 1019),
}
_CASE_PATTERN = re.compile(r"(\d{4})_image\.nii(\.gz)?$")


def map_mmwhs_labels(raw: np.ndarray, filename: str = "<array>") -> np.ndarray:
    """Map raw MM-WHS label values (0 and 205, 420, 500, 550, 600, 820, 850) to classes 0..7 (uint8).

    Raises:
        ValueError: naming ``filename`` and the offending values when any other value (or a non-integer) occurs.
    """
    values = np.unique(raw)
    allowed = (0, *MMWHS_RAW_LABELS)
    bad = [v for v in values.tolist() if v not in allowed]
    if bad:
        raise ValueError(
            f"{filename}: unexpected MM-WHS label values {bad[:10]} (allowed: {list(allowed)}). "
            "Is this an MM-WHS label file, and was it resampled with nearest-neighbour interpolation?"
        )
    lookup = {raw_value: cls for cls, raw_value in enumerate(MMWHS_RAW_LABELS, start=1)}
    mapped = np.zeros(raw.shape, dtype=np.uint8)
    for raw_value, cls in lookup.items():
        mapped[raw == raw_value] = cls
    return mapped


def _find_cases(src_dir: Path) -> dict[int, tuple[Path, Path]]:
    cases = {}
    for image in sorted(src_dir.rglob("*_image.nii*")):
        match = _CASE_PATTERN.search(image.name)
        if match is None:
            continue
        label = image.with_name(image.name.replace("_image.nii", "_label.nii"))
        if not label.is_file():
            raise FileNotFoundError(f"MM-WHS image {image} has no label file {label}.")
        case_id = int(match.group(1))
        if case_id in cases:
            raise ValueError(f"case {case_id} appears twice: {cases[case_id][0]} and {image}. Prepare CT and MR apart.")
        cases[case_id] = (image, label)
    if not cases:
        raise FileNotFoundError(f"no '*_<id>_image.nii.gz' files under {src_dir}: is it an MM-WHS training folder?")
    return cases


def prepare(
    src_dir: str,
    out_dir: str,
    split: str = "authors",
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 0,
    cases: Sequence[int] | None = None,
) -> str:
    """Map the labels of an MM-WHS folder to 0..7 and write a datalist.

    Writes ``<out_dir>/labels/<case>_label.nii.gz`` (uint8, original header and affine) and
    ``<out_dir>/datalist.json`` whose paths are relative to ``out_dir`` (the bundle's ``dataset_dir``); images are
    referenced in place.

    Args:
        src_dir: folder holding ``*_<id>_image.nii.gz`` and ``*_<id>_label.nii.gz`` (searched recursively).
        out_dir: output folder.
        split: ``"authors"`` (train 13 / val 3 / test 4 cases as in the paper; every listed case must be present) or
            ``"random"`` (seeded, ``val_fraction`` / ``test_fraction``).
        val_fraction, test_fraction, seed: for ``split="random"``.
        cases: optional subset of case ids to prepare (``split="random"`` only).

    Returns:
        The datalist path.
    """
    import nibabel as nib

    src, out = Path(src_dir), Path(out_dir)
    found = _find_cases(src)
    if split == "authors":
        wanted = sorted(i for ids in MMWHS_AUTHORS_SPLIT.values() for i in ids)
        missing = [i for i in wanted if i not in found]
        if missing:
            raise FileNotFoundError(
                f"the authors' MM-WHS split needs cases {missing} which are not under {src}; use --split random."
            )
        splits = {name: list(ids) for name, ids in MMWHS_AUTHORS_SPLIT.items()}
    elif split == "random":
        selected = sorted(found) if cases is None else [int(c) for c in cases]
        unknown = [c for c in selected if c not in found]
        if unknown:
            raise FileNotFoundError(f"cases {unknown} are not under {src}.")
        split_ids = split_cases([str(c) for c in selected], val_fraction, test_fraction, seed)
        splits = {name: [int(c) for c in ids] for name, ids in split_ids.items()}
    else:
        raise ValueError(f"split must be 'authors' or 'random', got {split!r}.")

    (out / "labels").mkdir(parents=True, exist_ok=True)
    entries = {}
    for case_id in sorted({i for ids in splits.values() for i in ids}):
        image, label = found[case_id]
        check_header_geometry(image, label)
        raw = nib.load(str(label))
        mapped = map_mmwhs_labels(np.asanyarray(raw.dataobj), str(label))
        header = raw.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1, 0)
        target = out / "labels" / (label.name.split(".nii")[0] + ".nii.gz")
        tmp = target.with_name(target.name.replace(".nii.gz", ".tmp.nii.gz"))
        nib.save(nib.Nifti1Image(mapped, raw.affine, header), str(tmp))
        tmp.replace(target)
        entries[case_id] = {
            "image": os.path.relpath(image.resolve(), out.resolve()),
            "label": str(target.relative_to(out)),
            "case": case_id,
        }
    datalist = write_datalist(
        out / "datalist.json",
        {name: [entries[i] for i in ids] for name, ids in splits.items()},
        name="MM-WHS",
        labels={str(i): n for i, n in enumerate(MMWHS_CLASS_NAMES)},
        split=split,
    )
    return str(datalist)


if __name__ == "__main__":
    from custom_nets.command_line import fire_command

    fire_command({"prepare": prepare})
