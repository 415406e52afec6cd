"""Reading 2D images and 3D volumes with MONAI's readers, one reader per file type.

- DICOM (a series folder or a single file) and MetaImage/NRRD: ``ITKReader`` (applies RescaleSlope/Intercept).
- NIfTI: ``NibabelReader``.
- PNG/JPG/BMP/TIFF: ``PILReader``.

Each reader is built on the first file that needs it, so NIfTI and PNG files load where ``itk`` is not installed.

Arrays come out channel-first in MONAI's index order: 2D images (C, X, Y), volumes (C, X, Y, Z), with the affine in a
``MetaTensor``. Used by the joint image-volume pipeline of arXiv 2212.01893.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import torch
from monai.config import KeysCollection
from monai.data import ImageReader, ITKReader, MetaTensor, NibabelReader, PILReader
from monai.transforms import LoadImage, MapTransform, ResizeWithPadOrCrop

from custom_nets.data.datalist import IMAGE_EXTENSIONS, file_suffix
from custom_nets.data.file_checks import check_header_size, dicom_series_problems
from custom_nets.data.intensity import assert_finite

__all__ = [
    "READERS",
    "ReaderUnavailableError",
    "build_loader",
    "reader_name",
    "LoadMedicalImaged",
    "EnsureKindShaped",
    "CropOrPadToBackgroundd",
    "load_item_array",
    "reader_failure",
]

READERS: dict[str, type[ImageReader]] = {"itk": ITKReader, "nibabel": NibabelReader, "pil": PILReader}
"""MONAI reader class of each :func:`reader_name`."""

_INSTALL_HINTS = {
    "itk": "run `pip install itk-io` (see pyproject.toml for the version) or convert the file to NIfTI",
    "nibabel": "run `pip install nibabel`",
    "pil": "run `pip install pillow`",
}


class ReaderUnavailableError(ImportError, ValueError):
    """The package of the reader a file needs is not installed.

    An ``ImportError`` (a package is missing) and a ``ValueError``, like every error of this module that names a file,
    so that ``except ValueError`` reports it with the other unreadable files (e.g. in ``validate_datalist``).
    """


def reader_name(path: str) -> str:
    """``"nibabel"`` for NIfTI, ``"pil"`` for raster images, ``"itk"`` for everything else (DICOM, MetaImage)."""
    suffix = "" if Path(path).is_dir() else file_suffix(path)
    if suffix in (".nii", ".nii.gz"):
        return "nibabel"
    if suffix in IMAGE_EXTENSIONS:
        return "pil"
    return "itk"


_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception): ")


def reader_failure(error: BaseException) -> str:
    """One line on why a reader failed: the first exception line inside MONAI's message (which embeds the traceback
    of every reader it tried), else the message's first line."""
    lines = str(error).splitlines()
    embedded = [line.strip() for line in lines if _EXCEPTION_LINE.match(line.strip())]
    first = embedded[0] if embedded else (lines[0] if lines else "")
    return f"{type(error).__name__}: {first}" if not embedded else first


def build_loader(reader: str) -> LoadImage:
    """MONAI ``LoadImage`` with the reader ``READERS[reader]``: channel first, float32, image only.

    Raises:
        ImportError: MONAI's ``OptionalImportError`` when the reader's package (e.g. ``itk``) is not installed.
    """
    return LoadImage(reader=READERS[reader](), image_only=True, ensure_channel_first=True, dtype="float32")


class LoadMedicalImaged(MapTransform):
    """Load each key's path with the MONAI reader for its file type, channel first.

    Output: ``MetaTensor`` (C, X, Y) for 2D files, (C, X, Y, Z) for volumes (a 2D DICOM comes as (C, X, Y, 1); see
    :class:`EnsureKindShaped`), float32. The original path is kept under ``"source_<key>"``. Each reader's loader is
    built (:func:`build_loader`) on the first file that needs it and kept in ``self.loaders``.

    Raises:
        ReaderUnavailableError: naming the file when its reader's package (``itk`` for DICOM / MetaImage) is missing.
        ValueError: naming the file when the reader cannot open it (corrupt or mislabelled file).
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loaders: dict[str, LoadImage] = {}

    def loader(self, reader: str, path: str) -> LoadImage:
        """The cached loader of ``reader``, built on first use; ``path`` (the file that needs it) names errors."""
        if reader not in self.loaders:
            try:
                self.loaders[reader] = build_loader(reader)
            except ImportError as error:  # MONAI's OptionalImportError
                raise ReaderUnavailableError(
                    f"{path}: the {reader} reader is unavailable ({error}); {_INSTALL_HINTS[reader]}"
                ) from error
        return self.loaders[reader]

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            path = str(d[key])
            check_header_size(path)  # before any voxel is allocated
            reader = reader_name(path)
            loader = self.loader(reader, path)
            try:
                d[key] = loader(path)
            except Exception as error:  # MONAI/ITK/nibabel/PIL raise many types for unreadable files
                raise ValueError(
                    f"{path}: the {reader} reader cannot read it ({reader_failure(error)}); the file is "
                    "corrupt or not of the type its name says: re-export it or remove it from the datalist"
                ) from error
            d[f"source_{key}"] = path
        return d


class EnsureKindShaped(MapTransform):
    """Check that each image has the dimensionality of the item's ``kind`` and the wanted channel count.

    - ``kind == "image"``: output a plain tensor (channels, X, Y) (2D pipelines use no affine); a trailing singleton
      slice axis (2D DICOM) is squeezed.
    - ``kind == "volume"``: output (channels, X, Y, Z) with Z >= 2.
    Channels: a multi-channel image (RGB PNG) is averaged when ``channels == 1``; a single channel is repeated when
    ``channels > 1``.

    Raises:
        ValueError: naming the file for wrong dimensions, empty images or an unusable channel count.
    """

    def __init__(
        self, keys: KeysCollection, kind_key: str = "kind", channels: int = 1, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.kind_key = kind_key
        self.channels = channels

    def _shape(self, image: torch.Tensor, kind: str, source: str) -> torch.Tensor:
        if image.numel() == 0:
            raise ValueError(f"{source}: the image is empty (shape {tuple(image.shape)}); remove it from the datalist")
        if kind == "image":
            image = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
            if image.ndim == 4 and image.shape[-1] == 1:
                image = image[..., 0]
        expected = {"image": 3, "volume": 4}[kind]
        if image.ndim != expected:
            other = "volume" if kind == "image" else "image"
            raise ValueError(
                f"{source}: expected a {'2D' if kind == 'image' else '3D'} {kind} but the spatial shape is "
                f'{tuple(image.shape[1:])}; set "kind": "{other}" in the datalist or remove the item'
            )
        if kind == "volume" and image.shape[-1] < 2:
            raise ValueError(f'{source}: volume with a single slice; set "kind": "image" in the datalist')
        if image.shape[0] != self.channels:
            if kind == "volume" and image.ndim == 4 and image.shape[0] > 1 and self.channels == 1:
                raise ValueError(
                    f"{source}: a 4D image ({image.shape[0]} frames or channels of {tuple(image.shape[1:])}) where "
                    "one 3D volume is expected; split it into 3D files (e.g. one per time point) in the datalist"
                )
            if self.channels == 1:
                image = image.mean(dim=0, keepdim=True)
            elif image.shape[0] == 1:
                image = image.repeat(self.channels, *([1] * (image.ndim - 1)))
            else:
                raise ValueError(f"{source}: {image.shape[0]} channels cannot be mapped to {self.channels}")
        return image

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        kind = d[self.kind_key]
        for key in self.key_iterator(d):
            d[key] = self._shape(d[key], kind, str(d.get(f"source_{key}", "<in-memory image>")))
        return d


class CropOrPadToBackgroundd(MapTransform):
    """Centre crop/pad to ``spatial_size`` (MONAI ``ResizeWithPadOrCrop``), padding with each image's minimum.

    After modality normalisation the minimum is the background (air), so padding never looks like tissue, unlike
    zero padding of z-scored MR or edge replication of anatomy that touches the border. ``spatial_size`` entries of
    -1 keep that axis (e.g. ``(64, 64, -1)`` for the in-plane size of a volume).
    """

    def __init__(self, keys: KeysCollection, spatial_size: Sequence[int], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.resizer = ResizeWithPadOrCrop(spatial_size, mode="constant")

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resizer(d[key], value=float(d[key].min()))
        return d


def load_item_array(
    item: Mapping, key: Hashable = "image", channels: int = 1, reject_constant: bool = False
) -> MetaTensor:
    """Read one datalist item and check it (readable, dimensionality of its kind, not empty, finite).

    A DICOM series folder is first checked for gaps, duplicates and mixed series (:func:`dicom_series_problems`);
    with ``reject_constant`` (the datalist checks) a constant image (every voxel the same value, nothing to learn) is
    rejected too.

    Returns the channel-first image; raises ValueError naming the file otherwise.
    """
    path = Path(str(item[key]))
    if path.is_dir():
        problems = dicom_series_problems(path)
        if problems:
            raise ValueError("; ".join(problems))
    d = LoadMedicalImaged(key)(item)
    d = EnsureKindShaped(key, channels=channels)(d)
    source = d[f"source_{key}"]
    assert_finite(d[key], source)
    low, high = float(d[key].min()), float(d[key].max())
    if reject_constant and low == high:
        raise ValueError(f"{source}: constant image (every voxel is {low:g}); remove it from the datalist")
    return d[key]
