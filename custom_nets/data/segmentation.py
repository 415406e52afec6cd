"""Data pipeline pieces for slice-wise 3D segmentation (downstream protocol of arXiv 2212.01893, METHOD.md section 4).

* :class:`CheckSegmentationPaird` - image / label geometry, finiteness and label-range checks with errors that name
  both files;
* :class:`StackNeighbourSlicesd` - 2.5D input: the neighbouring slices of every slice as extra channels;
* :class:`RandForegroundSliced` - draws 2D training slices from a volume with a balanced mix of slices that contain
  foreground and slices that do not;
* datalist helpers: seeded splits, label fractions for label-efficiency tables, loading with checks, and a fire CLI
  that pairs any image / label folders into a decathlon-style datalist::

      python -m custom_nets.data.segmentation make_datalist --images_dir imgs --labels_dir labs --out datalist.json
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, load_decathlon_datalist
from monai.transforms import MapTransform, Randomizable
from monai.utils import ImageMetaKey

from custom_nets.atomic_files import atomic_write_json
from custom_nets.data.datalist import file_suffix
from custom_nets.data.expectations import DataExpectations, affine_problems, channel_problem, nifti_header_problems

__all__ = [
    "CheckSegmentationPaird",
    "RandForegroundSliced",
    "StackNeighbourSlicesd",
    "check_header_geometry",
    "inference_datalist",
    "load_segmentation_datalist",
    "make_datalist",
    "segmentation_image_problems",
    "segmentation_item_problems",
    "select_label_fraction",
    "select_stratified",
    "split_cases",
    "write_datalist",
]

SPLITS = ("training", "validation", "testing")


def _filename(x: Any, fallback: str) -> str:
    meta = getattr(x, "meta", None)
    if meta is not None and ImageMetaKey.FILENAME_OR_OBJ in meta:
        return str(meta[ImageMetaKey.FILENAME_OR_OBJ])
    return fallback


class CheckSegmentationPaird(MapTransform):
    """Reject an image / label pair that cannot be segmented slice by slice, naming both files.

    Checks, on channel-first ``(C, H, W, D)`` MetaTensors:

    * same spatial shape and (within ``affine_atol`` mm) the same affine;
    * finite image intensities (no NaN / inf);
    * when ``num_label_values`` is given, integer label values in ``[0, num_label_values)``.

    Args:
        image_key: key of the image.
        label_key: key of the label.
        num_label_values: number of allowed label values (classes including background); ``None`` skips the check.
        affine_atol: absolute tolerance on the affine entries (mm).
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str = "label",
        num_label_values: int | None = None,
        affine_atol: float = 1e-3,
    ) -> None:
        super().__init__(keys=[image_key, label_key])
        self.image_key, self.label_key = image_key, label_key
        self.num_label_values = num_label_values
        self.affine_atol = affine_atol

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image, label = d[self.image_key], d[self.label_key]
        image_file = _filename(image, self.image_key)
        label_file = _filename(label, self.label_key)
        pair = f"image {image_file} and label {label_file}"
        if tuple(image.shape[1:]) != tuple(label.shape[1:]):
            raise ValueError(
                f"{pair} have different voxel grids: {tuple(image.shape[1:])} vs {tuple(label.shape[1:])}. "
                "Resample the label onto the image grid (nearest neighbour) or fix the datalist pairing."
            )
        if isinstance(image, MetaTensor) and isinstance(label, MetaTensor):
            if not torch.allclose(image.affine.double(), label.affine.double(), atol=self.affine_atol):
                raise ValueError(
                    f"{pair} have different affines (origin/spacing/orientation): {_rounded(image.affine)} vs "
                    f"{_rounded(label.affine)}. Resample the label onto the image grid or fix the header."
                )
        if not torch.isfinite(torch.as_tensor(image)).all():
            raise ValueError(f"image {image_file} contains NaN or infinite values; fix or exclude this case.")
        if self.num_label_values is not None:
            values = torch.unique(torch.as_tensor(label))
            bad = [v for v in values.tolist() if v != int(v) or not 0 <= v < self.num_label_values]
            if bad:
                raise ValueError(
                    f"label {label_file} has values {bad[:10]} outside 0..{self.num_label_values - 1} "
                    f"(image {image_file}). Map the raw labels first (see custom_nets.datasets.mmwhs / brats)."
                )
        return d


def _rounded(affine: torch.Tensor) -> list:
    """An affine as nested lists rounded to 0.001 mm, for one-line messages."""
    return np.round(torch.as_tensor(affine).double().cpu().numpy(), 3).tolist()


def _stack_neighbours(x: torch.Tensor, num_slices: int) -> torch.Tensor:
    half = num_slices // 2
    depth = x.shape[-1]
    offsets = torch.arange(-half, half + 1)
    index = (torch.arange(depth)[None, :] + offsets[:, None]).clamp(0, depth - 1)  # (num_slices, D), edge replicate
    stacked = x[..., index]  # (C, H, W, num_slices, D)
    return stacked.permute(0, 3, 1, 2, 4).reshape(x.shape[0] * num_slices, *x.shape[1:])


class StackNeighbourSlicesd(MapTransform):
    """2.5D input: each slice along the last axis gets its ``num_slices // 2`` neighbours on both sides as channels.

    ``(C, H, W, D) -> (C * num_slices, H, W, D)``; channel ``c * num_slices + j`` of slice ``z`` holds channel ``c`` of
    slice ``z + j - num_slices // 2`` (clamped at the volume ends, i.e. edge replication). ``num_slices = 1`` is the
    identity. Applied to the volume before slices are drawn (training) or inferred (SliceInferer along the last axis),
    so the 2D network sees the same context in both.

    Args:
        keys: image keys.
        num_slices: odd number of slices per input (1 = plain 2D).
    """

    def __init__(self, keys: KeysCollection, num_slices: int = 1, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if num_slices < 1 or num_slices % 2 == 0:
            raise ValueError(
                f"num_slices must be a positive odd number (centre slice +- neighbours), got {num_slices}."
            )
        self.num_slices = num_slices

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.num_slices == 1:
            return d
        for key in self.key_iterator(d):
            d[key] = _stack_neighbours(d[key], self.num_slices)
        return d


class RandForegroundSliced(Randomizable, MapTransform):
    """Draw ``num_samples`` 2D slices (last axis) from a volume, balancing slices with and without foreground.

    Each sample is a slice containing foreground with probability ``pos / (pos + neg)`` and a slice without foreground
    otherwise (falling back to the other kind when a volume has none of the requested kind). Foreground means any
    label value > 0 in any channel, so it works for label maps and multi-label region masks alike.

    ``(C, H, W, D)`` volumes -> list of ``num_samples`` dicts whose ``keys`` hold ``(C, H, W)`` tensors; other entries
    are copied; ``slice_index`` records the slice drawn.

    Args:
        keys: keys to slice (image and label).
        label_key: key of the label used to find foreground slices.
        num_samples: slices per volume.
        pos: relative weight of foreground slices.
        neg: relative weight of background slices.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label",
        num_samples: int = 4,
        pos: float = 1.0,
        neg: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        if pos < 0 or neg < 0 or pos + neg == 0:
            raise ValueError(f"pos and neg must be non-negative and not both zero, got pos={pos}, neg={neg}.")
        self.label_key = label_key
        self.num_samples = num_samples
        self.pos_ratio = pos / (pos + neg)
        self._indices: list[int] = []

    def randomize(self, foreground: np.ndarray) -> None:
        fg = np.flatnonzero(foreground)
        bg = np.flatnonzero(~foreground)
        indices = []
        for _ in range(self.num_samples):
            want_fg = self.R.rand() < self.pos_ratio
            pool = fg if (want_fg and len(fg)) or not len(bg) else bg
            indices.append(int(pool[self.R.randint(len(pool))]))
        self._indices = indices

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        d = dict(data)
        label = torch.as_tensor(d[self.label_key])
        foreground = (label > 0).reshape(-1, label.shape[-1]).any(dim=0).cpu().numpy()
        self.randomize(foreground)
        samples = []
        for index in self._indices:
            sample = dict(d)
            for key in self.key_iterator(d):
                sample[key] = torch.as_tensor(d[key])[..., index].clone()
            sample["slice_index"] = index
            samples.append(sample)
        return samples


def split_cases(
    case_ids: Sequence[str], val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
) -> dict[str, list[str]]:
    """Seeded random split of case ids into training / validation / testing (each non-empty fraction >= 1 case)."""
    if not case_ids:
        raise ValueError("no cases to split.")
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"need 0 <= val_fraction, test_fraction and a sum < 1; got {val_fraction}, {test_fraction}.")
    ids = sorted(case_ids)
    random.Random(seed).shuffle(ids)
    n_val = math.ceil(val_fraction * len(ids)) if val_fraction > 0 else 0
    n_test = math.ceil(test_fraction * len(ids)) if test_fraction > 0 else 0
    if n_val + n_test >= len(ids):
        raise ValueError(
            f"{len(ids)} cases are too few for val_fraction={val_fraction}, test_fraction={test_fraction}."
        )
    return {
        "training": sorted(ids[n_val + n_test :]),
        "validation": sorted(ids[:n_val]),
        "testing": sorted(ids[n_val : n_val + n_test]),
    }


def select_label_fraction(items: Sequence[Any], fraction: float = 1.0, seed: int = 0) -> list[Any]:
    """The labelled subset for label-efficiency runs: ``ceil(fraction * n)`` items (at least 1), seeded.

    The subsets are nested across fractions for one seed (10 % is inside 25 %, itself inside 50 %), so a
    label-efficiency curve only adds cases.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}.")
    if not items:
        raise ValueError("the training list is empty; check the datalist's 'training' section.")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    keep = sorted(order[: max(1, math.ceil(fraction * len(items)))])
    return [items[i] for i in keep]


def select_stratified(items: Sequence[Mapping[str, Any]], count: int, key: str, seed: int = 0) -> list[Any]:
    """``count`` items drawn round-robin over the groups of ``item[key]`` (e.g. the anatomy of each volume), seeded.

    With few labelled volumes a plain random pick may miss a whole group and make the trials' spread a measure of
    luck; drawing one item of each group in turn keeps every group represented as soon as ``count`` allows. Each group
    is shuffled once per seed and groups take turns in sorted order, so for one seed a smaller subset is always inside
    a larger one. The subset keeps the order of ``items``.

    Raises:
        ValueError: for ``count`` outside ``[1, len(items)]`` or an item without ``key``.
    """
    if not 1 <= count <= len(items):
        raise ValueError(f"count must be in [1, {len(items)}] (the number of items), got {count}.")
    missing = [i for i, item in enumerate(items) if key not in item]
    if missing:
        raise ValueError(f"items {missing[:5]} have no '{key}' to stratify by.")
    groups: dict[Any, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(item[key], []).append(index)
    rng = random.Random(seed)
    queues = []
    for group in sorted(groups):
        members = list(groups[group])
        rng.shuffle(members)
        queues.append(members)
    chosen: list[int] = []
    while len(chosen) < count:
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    return [items[i] for i in sorted(chosen)]


def load_segmentation_datalist(
    datalist: str | os.PathLike, split: str = "training", base_dir: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """Read one section of a decathlon-style datalist, checking that it exists, is not empty and its files exist."""
    path = Path(datalist)
    if not path.is_file():
        raise FileNotFoundError(
            f"datalist not found: {path}. Prepare one with python -m custom_nets.datasets.brats / mmwhs / segmentation."
        )
    with open(path) as f:
        sections = json.load(f)
    if not sections.get(split):
        raise ValueError(f"datalist {path} has no '{split}' cases (sections: {sorted(sections)}).")
    items = load_decathlon_datalist(path, is_segmentation=True, data_list_key=split, base_dir=base_dir)
    for item in items:
        for key in ("image", "label"):
            files = item.get(key, [])
            for file in [files] if isinstance(files, str) else files:
                if not os.path.exists(file):
                    raise FileNotFoundError(f"datalist {path} ('{split}', key '{key}') names a missing file: {file}.")
    return items


def inference_datalist(
    dataset_dir: str | os.PathLike,
    datalist: str | os.PathLike | None = None,
    split: str = "testing",
    pattern: str = "*.nii*",
) -> list[dict[str, Any]]:
    """Inputs for whole-volume inference: the ``split`` section of ``datalist`` when given, else the images matching
    ``pattern`` in ``dataset_dir`` (items ``{"image": path}``). An empty result is an error naming where it looked."""
    if datalist is not None:
        items = load_decathlon_datalist(datalist, is_segmentation=True, data_list_key=split, base_dir=dataset_dir)
        items = [{"image": item["image"]} for item in items]
    else:
        items = [{"image": str(p)} for p in sorted(Path(dataset_dir).glob(pattern)) if p.is_file()]
    if not items:
        where = f"section '{split}' of {datalist}" if datalist is not None else f"{dataset_dir}/{pattern}"
        raise FileNotFoundError(f"no images to segment in {where}.")
    return items


def _file_problems(
    paths: Mapping[str, Sequence[Path]], position: int, base: Path, expectations: DataExpectations
) -> tuple[list[str], list[str]]:
    """Before any voxel is read: every file of one item exists, announces a sane size and, for NIfTI, holds a usable
    geometry for ``expectations``. Returns ``(problems, warnings of the first image file)``."""
    from custom_nets.data.file_checks import check_header_size

    missing = [
        f"{p}: file not found (item {position}, {key}); fix the path or the base_dir ({base})"
        for key, group in paths.items()
        for p in group
        if not p.exists()
    ]
    if missing:
        return missing, []
    warnings = []
    for key, group in paths.items():
        for file in group:
            try:
                check_header_size(file)
            except ValueError as error:
                return [str(error)], []
            if file_suffix(file) in (".nii", ".nii.gz"):
                header = nifti_header_problems(file, expectations)
                if header.errors:
                    return header.errors, []
                warnings += header.warnings if key == "image" and file == paths["image"][0] else []
    return [], warnings


def _image_name(image: Any, paths: Sequence[Path]) -> str:
    """How problems name an image item: its file, or its first channel file and how many more."""
    return f"{paths[0]} (+{len(paths) - 1} channel file(s))" if isinstance(image, (list, tuple)) else str(paths[0])


def _read_image_problems(
    image: torch.Tensor, name: str, first_file: Path, expectations: DataExpectations
) -> tuple[list[str], list[str]]:
    """An image as read (channels first): its channel count and, for other formats than NIfTI (whose header was
    checked before reading), its affine against ``expectations``. Returns ``(problems, warnings)``."""
    wrong_channels = channel_problem(int(image.shape[0]), name, expectations)
    if wrong_channels is not None:
        return [wrong_channels], []
    if file_suffix(first_file) not in (".nii", ".nii.gz") and isinstance(image, MetaTensor):
        geometry = affine_problems(image.affine.numpy(), str(first_file), expectations)
        return geometry.errors, [] if geometry.errors else geometry.warnings
    return [], []


def _constant_image_problem(image: torch.Tensor, first_file: Path) -> list[str]:
    values = torch.as_tensor(image)
    if float(values.min()) == float(values.max()):
        return [f"{first_file}: constant image (every voxel is {float(values.min()):g}); remove the case"]
    return []


def segmentation_item_problems(
    item: Any,
    position: int,
    base_dir: str | os.PathLike,
    num_classes: int | None = None,
    expectations: DataExpectations | None = None,
) -> tuple[list[str], list[str], list[str]]:
    """Check one image / label pair of a segmentation datalist with the bundles' readers; never raises.

    ``item`` is ``{"image": path or [paths of the channels], "label": path}``, relative paths joined to ``base_dir``.
    Checks that every file exists and announces a sane size, that NIfTI headers hold a usable geometry for the
    bundle's ``expectations`` (:func:`~custom_nets.data.expectations.nifti_header_problems`), reads the pair with
    MONAI's ``LoadImaged`` (channels stacked), checks the image's channel count (and, for other formats, the affine
    read) against ``expectations``, applies :class:`CheckSegmentationPaird` (same grid and affine, finite image, label
    values in ``0..num_classes - 1``; without ``num_classes``: non-negative integers), then rejects a constant image.

    Returns:
        ``(files, problems, warnings)``: the resolved file paths (for duplicate detection), one line per problem, each
        naming the file, and one line per warning (e.g. thick slices).
    """
    from monai.transforms import LoadImaged

    from custom_nets.data.loading import reader_failure

    expectations = DataExpectations() if expectations is None else expectations
    if not isinstance(item, dict) or "image" not in item or "label" not in item:
        return [], [f"item {position}: {item!r} is not a dict with 'image' and 'label' (a segmentation pair)"], []
    base = Path(base_dir)
    images = item["image"] if isinstance(item["image"], (list, tuple)) else [item["image"]]
    paths = {"image": [base / str(p) for p in images], "label": [base / str(item["label"])]}
    files = [str(p.resolve()) for group in paths.values() for p in group]
    problems, warnings = _file_problems(paths, position, base, expectations)
    if problems:
        return files, problems, []
    data = {"image": [str(p) for p in paths["image"]], "label": str(paths["label"][0])}
    if len(data["image"]) == 1:
        data["image"] = data["image"][0]
    try:
        data = LoadImaged(["image", "label"], ensure_channel_first=True, image_only=True)(data)
    except Exception as error:  # MONAI/nibabel/ITK raise many types for unreadable files
        return (
            files,
            [
                f"{data['image']} / {data['label']}: the pair cannot be read ({reader_failure(error)}); a file is "
                "corrupt or not of the type its name says"
            ],
            [],
        )
    problems, read_warnings = _read_image_problems(
        data["image"], _image_name(item["image"], paths["image"]), paths["image"][0], expectations
    )
    if problems:
        return files, problems, warnings
    warnings += read_warnings
    label_values = torch.unique(torch.as_tensor(data["label"])).tolist()
    negative = [v for v in label_values if v != int(v) or v < 0]
    if num_classes is None and negative:
        return (
            files,
            [f"{paths['label'][0]}: label values {negative[:10]} are not class indices (integers >= 0)"],
            warnings,
        )
    try:
        CheckSegmentationPaird(num_label_values=num_classes)(data)
    except ValueError as error:
        return files, [str(error)], warnings
    return files, _constant_image_problem(data["image"], paths["image"][0]), warnings


def segmentation_image_problems(
    item: Any, position: int, base_dir: str | os.PathLike, expectations: DataExpectations | None = None
) -> tuple[list[str], list[str]]:
    """Check one inference input of the segmentation bundles (``{"image": path or [paths of the channels]}``, as
    :func:`inference_datalist` gives them) with the reader of their preprocessing; never raises.

    The checks of :func:`segmentation_item_problems` that concern the image: it exists, announces a sane size, has a
    usable geometry and the channel count of ``expectations``, reads with ``LoadImaged``, holds only finite values and
    is not constant. Returns ``(problems, warnings)``, each line naming the file.
    """
    from monai.transforms import LoadImage

    from custom_nets.data.loading import reader_failure

    expectations = DataExpectations() if expectations is None else expectations
    if not isinstance(item, dict) or not isinstance(item.get("image"), (str, list, tuple)):
        return [f"item {position}: {item!r} is not a dict with 'image' (a path or a list of channel files)"], []
    base = Path(base_dir)
    paths = [base / str(p) for p in (item["image"] if isinstance(item["image"], (list, tuple)) else [item["image"]])]
    problems, warnings = _file_problems({"image": paths}, position, base, expectations)
    if problems:
        return problems, []
    name = _image_name(item["image"], paths)
    try:
        image = LoadImage(image_only=True, ensure_channel_first=True)(
            str(paths[0]) if len(paths) == 1 else [str(p) for p in paths]
        )
    except Exception as error:  # MONAI/nibabel/ITK raise many types for unreadable files
        return [
            f"{name}: cannot be read ({reader_failure(error)}); a file is corrupt or not of the type its name says"
        ], []
    problems, read_warnings = _read_image_problems(image, name, paths[0], expectations)
    if problems:
        return problems, []
    if not torch.isfinite(torch.as_tensor(image)).all():
        return [f"{name}: NaN or infinite voxel values; fix or re-export the image"], warnings + read_warnings
    return _constant_image_problem(image, paths[0]), warnings + read_warnings


def check_header_geometry(image_path: str | os.PathLike, label_path: str | os.PathLike, atol: float = 1e-3) -> None:
    """Compare the NIfTI headers (shape and affine) of an image and its label without reading the voxels."""
    import nibabel as nib

    image, label = nib.load(str(image_path)), nib.load(str(label_path))
    if tuple(image.shape[:3]) != tuple(label.shape[:3]):
        raise ValueError(
            f"image {image_path} and label {label_path} have different shapes {image.shape[:3]} vs {label.shape[:3]}."
        )
    if not np.allclose(image.affine, label.affine, atol=atol):
        raise ValueError(
            f"image {image_path} and label {label_path} have different affines: "
            f"{np.round(image.affine, 3).tolist()} vs {np.round(label.affine, 3).tolist()}."
        )


def write_datalist(out: str | os.PathLike, splits: Mapping[str, Sequence[Mapping[str, Any]]], **extra: Any) -> Path:
    """Write a decathlon-style datalist (``training`` / ``validation`` / ``testing`` + extra keys), atomically."""
    content = {**extra, **{name: list(splits.get(name, [])) for name in SPLITS}}
    out = atomic_write_json(out, content)
    return out


def _relative(path: Path, base: Path) -> str:
    return os.path.relpath(path.resolve(), base.resolve())


def make_datalist(
    images_dir: str,
    labels_dir: str,
    out: str,
    image_suffix: str = ".nii.gz",
    label_suffix: str = ".nii.gz",
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> str:
    """Pair ``<case><image_suffix>`` in ``images_dir`` with ``<case><label_suffix>`` in ``labels_dir`` into a datalist.

    Paths are written relative to the datalist's folder (use it as the bundle's ``dataset_dir``). Every pair's header
    geometry is checked; an image without a label is an error naming it.
    """
    images_root, labels_root, out_path = Path(images_dir), Path(labels_dir), Path(out)
    images = sorted(p for p in images_root.iterdir() if p.name.endswith(image_suffix))
    if not images:
        raise FileNotFoundError(f"no '*{image_suffix}' images in {images_root}.")
    pairs = {}
    for image in images:
        case = image.name[: -len(image_suffix)]
        label = labels_root / f"{case}{label_suffix}"
        if label == image:
            continue
        if not label.is_file():
            raise FileNotFoundError(f"image {image} has no label {label}; add it or remove the image.")
        check_header_geometry(image, label)
        pairs[case] = {"image": _relative(image, out_path.parent), "label": _relative(label, out_path.parent)}
    split = split_cases(list(pairs), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    write_datalist(out_path, {name: [pairs[c] for c in ids] for name, ids in split.items()})
    return str(out_path)


if __name__ == "__main__":
    from custom_nets.command_line import fire_command

    fire_command({"make_datalist": make_datalist})
