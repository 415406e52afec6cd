"""A bad-input corpus generated here, one case a folder: each bad file or datalist gives exactly one problem from
``validate_data`` that names the file and says what is wrong, in the text error and in the JSON report. Pretraining,
segmentation (heart, brainseg), detection (finetune_cxr) and candidate-cube (finetune_nodule) datalists."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from custom_nets.data.datalist import DatalistError, DatalistProblem, usable_datalist, usable_inference_items
from custom_nets.data.demo import _write_dicom_series
from custom_nets.data.validate_data import bundle_expectations, validate_data

RNG = np.random.default_rng(0)


def _volume(shape=(8, 8, 5)) -> np.ndarray:
    return RNG.random(shape).astype(np.float32)


def _nifti(path: Path, array: np.ndarray, affine=None) -> str:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path.name


def _series(folder: Path, slices: int = 6) -> Path:
    _write_dicom_series(
        folder, (RNG.random((8, 8, slices)) * 1000).astype(np.int16), (1.0, 1.0, 2.0), "CT", folder.name
    )
    return folder


# Each case writes its files into `root` and returns (datalist content, file named in the problem, words of the
# problem, extra validate_data arguments).
Case = Callable[[Path], tuple[object, str, str, dict]]


def missing_file(root):
    return {"training": [{"image": "absent.nii.gz"}]}, "absent.nii.gz", "file not found", {}


def zero_byte_file(root):
    (root / "empty.nii.gz").write_bytes(b"")
    return {"training": [{"image": "empty.nii.gz"}]}, "empty.nii.gz", "unreadable NIfTI header", {}


def truncated_nifti(root):
    _nifti(root / "full.nii.gz", _volume((16, 16, 16)))
    data = (root / "full.nii.gz").read_bytes()
    (root / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    return {"training": [{"image": "cut.nii.gz"}]}, "cut.nii.gz", "cannot read it", {}


def png_named_nifti(root):
    Image.fromarray(RNG.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / "x.png")
    shutil.move(root / "x.png", root / "photo.nii.gz")
    return {"training": [{"image": "photo.nii.gz"}]}, "photo.nii.gz", "unreadable NIfTI header", {}


def nifti_named_png(root):
    _nifti(root / "x.nii", _volume())
    shutil.move(root / "x.nii", root / "scan.png")
    return {"training": [{"image": "scan.png"}]}, "scan.png", "cannot read it", {}


def text_file(root):
    (root / "notes.txt").write_text("not an image")
    return {"training": [{"image": "notes.txt"}]}, "notes.txt", "unknown file type '.txt'", {}


def text_named_dicom(root):
    (root / "scan.dcm").write_text("not an image")
    return {"training": [{"image": "scan.dcm"}]}, "scan.dcm", "cannot read it", {}


def four_d_volume(root):
    return (
        {"training": [{"image": _nifti(root / "fmri.nii.gz", _volume((8, 8, 5, 3)))}]},
        "fmri.nii.gz",
        "a 4D image",
        {},
    )


def nan_volume(root):
    volume = _volume()
    volume[1, 2, 3] = np.nan
    return {"training": [{"image": _nifti(root / "nan.nii.gz", volume)}]}, "nan.nii.gz", "NaN/inf", {}


def inf_volume(root):
    volume = _volume()
    volume[0, 0, 0] = np.inf
    return {"training": [{"image": _nifti(root / "inf.nii.gz", volume)}]}, "inf.nii.gz", "NaN/inf", {}


def constant_volume(root):
    volume = np.full((8, 8, 5), 7.0, np.float32)
    return {"training": [{"image": _nifti(root / "flat.nii.gz", volume)}]}, "flat.nii.gz", "constant image", {}


def absurd_nifti_header(root):
    header = nib.Nifti1Header()
    header.set_data_shape((30_000, 30_000, 30_000))
    header.set_data_dtype(np.float32)
    with open(root / "huge.nii", "wb") as handle:  # a header alone: reading the voxels would ask for 100 TB
        handle.write(header.binaryblock + b"\0" * 4)
    return {"training": [{"image": "huge.nii"}]}, "huge.nii", "exceed", {}


def absurd_metaimage_header(root):
    (root / "huge.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 100000\nElementType = "
        "MET_FLOAT\nElementDataFile = huge.raw\n"
    )
    return {"training": [{"image": "huge.mhd"}]}, "huge.mhd", "exceed", {}


def zero_metaimage_dimension(root):
    (root / "zero.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 0 8 8\nElementType = MET_FLOAT\nElementDataFile = zero.raw\n"
    )
    return {"training": [{"image": "zero.mhd"}]}, "zero.mhd", "zero or negative", {}


def image_declared_volume(root):
    Image.fromarray(RNG.integers(0, 255, (8, 9), dtype=np.uint8)).save(root / "xray.png")
    return {"training": [{"image": "xray.png", "kind": "volume"}]}, "xray.png", "expected a 3D volume", {}


def single_slice_volume(root):
    return {"training": [{"image": _nifti(root / "one.nii.gz", _volume((8, 8, 1)))}]}, "one.nii.gz", "single slice", {}


def dicom_without_pixel_data(root):
    folder = _series(root / "tmp_series", slices=2)
    dataset = pydicom.dcmread(sorted(folder.iterdir())[0])
    del dataset.PixelData
    dataset.save_as(root / "header_only.dcm", enforce_file_format=True)
    shutil.rmtree(folder)
    return {"training": [{"image": "header_only.dcm"}]}, "header_only.dcm", "cannot read it", {}


def dicom_series_with_a_missing_slice(root):
    folder = _series(root / "series")
    (folder / "IM0003.dcm").unlink()
    return {"training": [{"image": "series"}]}, "series", "uneven slice spacing", {}


def dicom_series_with_a_duplicated_slice(root):
    folder = _series(root / "series")
    shutil.copy(folder / "IM0002.dcm", folder / "IM0099.dcm")
    return {"training": [{"image": "series"}]}, "series", "uneven slice spacing", {}


def dicom_series_slice_without_pixels(root):
    folder = _series(root / "series")
    dataset = pydicom.dcmread(folder / "IM0004.dcm")
    del dataset.PixelData
    dataset.save_as(folder / "IM0004.dcm", enforce_file_format=True)
    return {"training": [{"image": "series"}]}, "series", "without pixel data", {}


def two_series_in_one_folder(root):
    first, second = _series(root / "a"), _series(root / "b")
    for path in second.iterdir():
        shutil.move(path, first / f"b_{path.name}")
    return {"training": [{"image": "a"}]}, "a", "different series", {}


def folder_without_dicom(root):
    (root / "folder").mkdir()
    (root / "folder" / "readme.txt").write_text("no images")
    return {"training": [{"image": "folder"}]}, "folder", "holds no DICOM file", {}


def path_through_a_file(root):
    (root / "notes.txt").write_text("a file, not a folder")
    return {"training": [{"image": "notes.txt/scan.nii.gz"}]}, "notes.txt/scan.nii.gz", "file not found", {}


def empty_datalist(root):
    return {"training": []}, "datalist.json", "the datalist is empty", {}


def not_json(root):
    return "{'training': [", "datalist.json", "not a readable JSON datalist", {}


def no_training_list(root):
    return {"images": [{"image": "a.nii.gz"}]}, "datalist.json", "no 'training', 'validation' or 'testing' list", {}


def item_without_image(root):
    return {"training": [{"path": "a.nii.gz"}]}, "item 0", "not a dict with an 'image' key", {}


def unknown_kind(root):
    name = _nifti(root / "a.nii.gz", _volume())
    return {"training": [{"image": name, "kind": "movie"}]}, "a.nii.gz", "kind 'movie'", {}


def unknown_modality(root):
    name = _nifti(root / "a.nii.gz", _volume())
    return {"training": [{"image": name, "modality": "PET"}]}, "a.nii.gz", "PET", {}


def duplicate_entry(root):
    name = _nifti(root / "a.nii.gz", _volume())
    return {"training": [{"image": name}], "validation": [{"image": name}]}, "a.nii.gz", "listed 2 times", {}


def _pair(root: Path, label: np.ndarray, image: np.ndarray | None = None, label_affine=None) -> dict:
    _nifti(root / "img.nii.gz", _volume(label.shape) if image is None else image)
    _nifti(root / "seg.nii.gz", label, label_affine)
    return {"training": [{"image": "img.nii.gz", "label": "seg.nii.gz"}]}


def label_out_of_range(root):
    label = np.zeros((8, 8, 5), np.uint8)
    label[2:4, 2:4, 1:3] = 5
    return _pair(root, label), "seg.nii.gz", "values [5.0] outside 0..2", {"num_classes": 3}


def negative_label(root):
    label = np.zeros((8, 8, 5), np.int16)
    label[2:4, 2:4, 1:3] = -1
    return _pair(root, label), "seg.nii.gz", "not class indices", {}


def mismatched_shapes(root):
    return (
        _pair(root, np.zeros((8, 8, 4), np.uint8), image=_volume((8, 8, 5))),
        "seg.nii.gz",
        "different voxel grids",
        {},
    )


def mismatched_affines(root):
    shifted = np.eye(4)
    shifted[0, 3] = 10.0
    return _pair(root, np.zeros((8, 8, 5), np.uint8), label_affine=shifted), "seg.nii.gz", "different affines", {}


def missing_label(root):
    _nifti(root / "img.nii.gz", _volume())
    content = {"training": [{"image": "img.nii.gz", "label": "seg.nii.gz"}]}
    return content, "seg.nii.gz", "file not found", {}


def nan_image_in_a_pair(root):
    image = _volume()
    image[0, 0, 0] = np.nan
    return _pair(root, np.zeros((8, 8, 5), np.uint8), image=image), "img.nii.gz", "NaN or infinite", {}


# finetune_cxr: detection datalists (a PNG or DICOM radiograph, boxes in its pixels, one class id per box)
def _radiograph(root: Path, name: str = "cxr.png", size=(24, 32)) -> str:
    Image.fromarray(RNG.integers(0, 255, size, dtype=np.uint8)).save(root / name)  # 24 rows x 32 columns
    return name


def _detection(image: str, box=((2.0, 3.0, 12.0, 14.0),), label=(0,)) -> dict:
    return {"training": [{"image": image, "box": [list(b) for b in box], "label": list(label), "image_id": "a1"}]}


def cxr_box_outside_the_image(root):
    content = _detection(_radiograph(root), box=[(20.0, 3.0, 40.0, 14.0)])  # x_max 40 > width 32
    return content, "cxr.png", "outside the image of width 32 and height 24", {"num_classes": 14}


def cxr_empty_box(root):
    return _detection(_radiograph(root), box=[(12.0, 3.0, 12.0, 14.0)]), "cxr.png", "is empty or outside", {}


def cxr_label_out_of_range(root):
    return _detection(_radiograph(root), label=[14]), "cxr.png", "outside 0..13", {"num_classes": 14}


def cxr_labels_do_not_match_boxes(root):
    return _detection(_radiograph(root), label=[0, 3]), "cxr.png", "one label per box", {}


def cxr_missing_image(root):
    return _detection("absent.png"), "absent.png", "file not found", {}


def cxr_text_named_png(root):
    (root / "cxr.png").write_text("not an image")
    return _detection("cxr.png"), "cxr.png", "cannot read it as a radiograph", {}


def _dicom_image(path: Path, stored: np.ndarray, **tags) -> str:
    """Write ``stored`` (``(rows, cols)``, or ``(frames, rows, cols)``: a multi-frame file) as a 12-bit grayscale
    DICOM with ``tags``; its name."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    dataset.Modality = "DX"
    dataset.Rows, dataset.Columns = stored.shape[-2:]
    if stored.ndim == 3:
        dataset.NumberOfFrames = stored.shape[0]
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
    for key, value in tags.items():
        setattr(dataset, key, value)
    dataset.PixelData = stored.astype(np.uint16).tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path.name


def cxr_multi_frame_dicom(root):
    _dicom_image(root / "cine.dcm", RNG.integers(0, 4000, (3, 24, 32)))
    return _detection("cine.dcm"), "cine.dcm", "expected one grayscale frame", {}


def pretraining_dicom_radiograph_in_micrometres(root):
    name = _dicom_image(root / "xray.dcm", RNG.integers(0, 4000, (24, 32)), PixelSpacing=[143.0, 143.0])
    content = {"training": [{"image": name, "modality": "XR"}]}
    return content, "xray.dcm", "PixelSpacing 143 x 143 mm is outside 0.02 - 5 mm", {"bundle": "pretrain_joint"}


def cxr_constant_image(root):
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(root / "black.png")
    return _detection("black.png"), "black.png", "constant image", {}


# finetune_nodule: candidate datalists written by prepare_luna16 (cubes .npy, folds subset<N>, scans with headers)
def _candidates(root: Path, cube: np.ndarray | None = None, label=0, world=(5.0, 6.0, 7.0), uid="1.2.3") -> dict:
    import itk

    image = itk.image_from_array(np.zeros((6, 10, 12), np.int16))  # 12 x 10 x 6 voxels of 1 x 1 x 2 mm from 0
    image.SetSpacing([1.0, 1.0, 2.0])
    (root / "scans").mkdir(exist_ok=True)
    itk.imwrite(image, str(root / "scans" / "1.2.3.mhd"))
    (root / "cubes").mkdir(exist_ok=True)
    np.save(root / "cubes" / "7.npy", np.full((4, 6, 6), -800, np.int16) if cube is None else cube)
    entry = {"image": "cubes/7.npy", "label": label, "seriesuid": uid, "subset": 0, "candidate": 7}
    entry.update(zip(("coordX", "coordY", "coordZ"), world, strict=True))
    scans = {"1.2.3": {"image": "scans/1.2.3.mhd", "subset": 0}}
    return {"cube_size": [4, 6, 6], "spacing_mm": [1.0, 1.0, 1.0], "scans": scans, "subset0": [entry]}


def nodule_candidate_outside_its_scan(root):
    return _candidates(root, world=(5.0, 6.0, 30.0)), "7.npy", "lies outside its scan", {}  # the scan ends at z 11


def nodule_cube_of_the_wrong_shape(root):
    return _candidates(root, cube=np.zeros((6, 6), np.int16)), "7.npy", "cube of shape (6, 6)", {}


def nodule_nan_cube(root):
    cube = np.zeros((4, 6, 6), np.float32)
    cube[1, 2, 3] = np.nan
    return _candidates(root, cube=cube), "7.npy", "NaN or infinite", {}


def nodule_truncated_cube(root):
    content = _candidates(root)
    data = (root / "cubes" / "7.npy").read_bytes()
    (root / "cubes" / "7.npy").write_bytes(data[: len(data) // 2])
    return content, "7.npy", "not a readable .npy cube", {}


def nodule_missing_cube(root):
    content = _candidates(root)
    (root / "cubes" / "7.npy").unlink()
    return content, "7.npy", "file not found", {}


def nodule_label_not_binary(root):
    return _candidates(root, label=2), "7.npy", "label 2", {}


def nodule_unknown_seriesuid(root):
    return _candidates(root, uid="9.9.9"), "7.npy", "seriesuid 9.9.9", {}


def nodule_empty_fold(root):
    return {**_candidates(root), "subset0": []}, "datalist.json", "no candidate in this fold", {}


# What each bundle expects of spacing, orientation and channels (custom_nets.data.expectations; --bundle reads the
# bundle's data_expectations from its train.json, as its start-up check does).
def _nifti_with_raw_header(path: Path, pixdim=None, sform_rows=None) -> str:
    """An uncompressed NIfTI whose header fields are patched as stored (nibabel would refuse or fix them on save)."""
    nib.save(nib.Nifti1Image(_volume(), np.eye(4)), path)
    raw = bytearray(path.read_bytes())
    if pixdim is not None:
        raw[80:92] = struct.pack("<3f", *pixdim)  # pixdim[1..3]
    if sform_rows is not None:
        raw[280:328] = struct.pack("<12f", *np.asarray(sform_rows, np.float32).ravel())  # srow_x, srow_y, srow_z
    path.write_bytes(bytes(raw))
    return path.name


def zero_spacing_in_the_header(root):
    name = _nifti_with_raw_header(root / "zero.nii", pixdim=(0.0, 1.0, 1.0))
    return {"training": [{"image": name}]}, "zero.nii", "pixdim) [0.0, 1.0, 1.0] must be finite and positive", {}


def negative_spacing_in_the_header(root):
    name = _nifti_with_raw_header(root / "negative.nii", pixdim=(1.0, -2.0, 1.0))
    return {"training": [{"image": name}]}, "negative.nii", "[1.0, -2.0, 1.0] must be finite and positive", {}


def nan_spacing_in_the_header(root):
    name = _nifti_with_raw_header(root / "nan_spacing.nii", pixdim=(1.0, 1.0, np.nan))
    return {"training": [{"image": name}]}, "nan_spacing.nii", "[1.0, 1.0, nan] must be finite and positive", {}


def singular_affine(root):
    rows = [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]  # two voxel axes along one direction
    return (
        {"training": [{"image": _nifti_with_raw_header(root / "flat.nii", sform_rows=rows)}]},
        "flat.nii",
        ("singular affine"),
        {},
    )


def sheared_affine(root):
    rows = [[1.0, 0.5, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]  # 27 degrees from perpendicular
    name = _nifti_with_raw_header(root / "sheared.nii", sform_rows=rows)
    return {"training": [{"image": name}]}, "sheared.nii", "voxel axes are not perpendicular", {}


def absurd_spacing(root):
    name = _nifti(root / "cm.nii.gz", _volume(), np.diag([0.1, 0.1, 50.0, 1.0]))  # slices 50 mm apart
    return {"training": [{"image": name}]}, "cm.nii.gz", "exceeds 20 mm", {}


def heart_given_a_four_channel_image(root):
    _nifti(root / "img.nii.gz", _volume((8, 8, 5, 4)))  # a BraTS-like 4-modality volume
    _nifti(root / "seg.nii.gz", np.zeros((8, 8, 5), np.uint8))
    content = {"training": [{"image": "img.nii.gz", "label": "seg.nii.gz"}]}
    return content, "img.nii.gz", "4 channel(s), the bundle expects 1", {"bundle": "finetune_heart"}


def brainseg_given_four_modalities_for_one(root):
    files = [_nifti(root / f"case_{m}.nii.gz", _volume()) for m in ("flair", "t1", "t1ce", "t2")]
    _nifti(root / "case_seg.nii.gz", np.zeros((8, 8, 5), np.uint8))
    content = {"training": [{"image": files, "label": "case_seg.nii.gz"}]}
    return content, "case_flair.nii.gz", "4 channel(s), the bundle expects 1", {"bundle": "finetune_brainseg"}


def brainseg_given_one_channel_for_four(root):
    content = _pair(root, np.zeros((8, 8, 5), np.uint8))
    options = {"bundle": "finetune_brainseg", "expected_channels": 4}  # as with modalities flair,t1,t1ce,t2
    return content, "img.nii.gz", "1 channel(s), the bundle expects 4", options


def heart_given_stretched_axial_pixels(root):
    content = _pair(root, np.zeros((8, 8, 5), np.uint8), label_affine=np.diag([0.5, 2.0, 1.0, 1.0]))
    _nifti(root / "img.nii.gz", _volume(), np.diag([0.5, 2.0, 1.0, 1.0]))  # 0.5 x 2 mm pixels: ratio 4 > 3
    return content, "img.nii.gz", "axial pixels of 0.5 x 2 mm (ratio 4 > 3", {"bundle": "finetune_heart"}


def palette_png(root):
    Image.fromarray(RNG.integers(0, 255, (8, 8), dtype=np.uint8)).convert("P").save(root / "palette.png")
    return {"training": [{"image": "palette.png"}]}, "palette.png", "palette image (PIL mode P)", {}


def rgba_png_for_pretraining(root):
    Image.fromarray(RNG.integers(0, 255, (8, 8, 4), dtype=np.uint8), "RGBA").save(root / "rgba.png")
    return {"training": [{"image": "rgba.png"}]}, "rgba.png", "RGB + alpha image", {"bundle": "pretrain_joint"}


def cxr_grey_and_alpha_png(root):
    Image.fromarray(RNG.integers(0, 255, (24, 32, 2), dtype=np.uint8), "LA").save(root / "cxr.png")
    return _detection("cxr.png"), "cxr.png", "grey + alpha image", {"bundle": "finetune_cxr"}


def dicom_series_with_a_slice_of_another_orientation(root):
    folder = _series(root / "series")
    dataset = pydicom.dcmread(folder / "IM0003.dcm")
    dataset.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # a sagittal slice among axial ones
    dataset.save_as(folder / "IM0003.dcm", enforce_file_format=True)
    return {"training": [{"image": "series"}]}, "series", "slices with different orientations", {}


def nodule_scan_with_zero_spacing(root):
    content = _candidates(root)
    header = root / "scans" / "1.2.3.mhd"
    header.write_text(header.read_text().replace("ElementSpacing = 1 1 2", "ElementSpacing = 1 0 2"))
    return content, "1.2.3.mhd", "singular affine", {"bundle": "finetune_nodule"}


CASES: list[Case] = [
    missing_file, zero_byte_file, truncated_nifti, png_named_nifti, nifti_named_png, text_file, text_named_dicom,
    four_d_volume, nan_volume, inf_volume, constant_volume, absurd_nifti_header, absurd_metaimage_header,
    zero_metaimage_dimension, image_declared_volume, single_slice_volume, dicom_without_pixel_data,
    dicom_series_with_a_missing_slice, dicom_series_with_a_duplicated_slice, dicom_series_slice_without_pixels,
    two_series_in_one_folder, folder_without_dicom, path_through_a_file, empty_datalist, not_json, no_training_list,
    item_without_image, unknown_kind, unknown_modality, duplicate_entry, label_out_of_range, negative_label,
    mismatched_shapes, mismatched_affines, missing_label, nan_image_in_a_pair,
    cxr_box_outside_the_image, cxr_empty_box, cxr_label_out_of_range, cxr_labels_do_not_match_boxes, cxr_missing_image,
    cxr_text_named_png, cxr_multi_frame_dicom, cxr_constant_image,
    nodule_candidate_outside_its_scan, nodule_cube_of_the_wrong_shape, nodule_nan_cube, nodule_truncated_cube,
    nodule_missing_cube, nodule_label_not_binary, nodule_unknown_seriesuid, nodule_empty_fold,
    zero_spacing_in_the_header, negative_spacing_in_the_header, nan_spacing_in_the_header, singular_affine,
    sheared_affine, absurd_spacing, heart_given_a_four_channel_image, brainseg_given_four_modalities_for_one,
    brainseg_given_one_channel_for_four, heart_given_stretched_axial_pixels, palette_png, rgba_png_for_pretraining,
    cxr_grey_and_alpha_png, dicom_series_with_a_slice_of_another_orientation, nodule_scan_with_zero_spacing,
    pretraining_dicom_radiograph_in_micrometres,
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_bad_input_gives_one_clear_problem(tmp_path, case):
    root = tmp_path / "data"
    root.mkdir()
    content, named, words, options = case(root)
    datalist = root / "datalist.json"
    datalist.write_text(content if isinstance(content, str) else json.dumps(content))
    report = tmp_path / "report.json"
    with pytest.raises(DatalistError) as error:
        validate_data(str(datalist), report=str(report), **options)
    problems = error.value.problems
    assert len(problems) == 1, problems
    assert named in problems[0] and words in problems[0], problems[0]
    assert "Traceback" not in problems[0] and "\n" not in problems[0]
    assert json.loads(report.read_text()) == {"datalist": str(datalist), "ok": False, "problems": problems}


def test_the_corpus_has_at_least_25_cases():
    assert len(CASES) >= 25 and len({case.__name__ for case in CASES}) == len(CASES)


def test_skip_bad_trains_on_the_usable_items_and_lists_the_others(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    good = _nifti(root / "good.nii.gz", _volume())
    (root / "corrupt.nii.gz").write_bytes(b"not a volume")
    items = [{"image": good, "modality": "CT"}, {"image": "corrupt.nii.gz"}, {"image": "absent.nii.gz"}]
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps({"training": items, "classes": ["a"]}))
    with pytest.raises(DatalistError, match="absent.nii.gz: file not found"):  # without skip_bad: stop
        usable_datalist(datalist, None, tmp_path / "out")
    usable = Path(usable_datalist(datalist, None, tmp_path / "out", skip_bad=True))
    content = json.loads(usable.read_text())
    assert content["classes"] == ["a"]
    assert content["training"] == [{"image": str(root / "good.nii.gz"), "modality": "CT"}]
    skipped = json.loads((tmp_path / "out" / "skipped_items.json").read_text())["skipped"]
    assert [entry["position"] for entry in skipped] == [1, 2]
    assert "unreadable NIfTI header" in skipped[0]["problem"] and "file not found" in skipped[1]["problem"]
    assert usable_datalist(usable, None, tmp_path / "out2", skip_bad=True) == str(usable)  # nothing left to skip


def test_pretrain_joint_checks_the_pixel_spacing_of_its_2d_dicoms(tmp_path):
    """pretrain_joint's start-up check (``usable_datalist`` with the bundle's expectations, as train.json runs it)
    reads the PixelSpacing / ImagerPixelSpacing of a 2D DICOM: a broken or absurd one is one problem naming the file,
    the tag and the fix (skipped with ``skip_bad``), none is a warning, a sane one nothing."""
    root = tmp_path / "data"
    root.mkdir()
    stored = RNG.integers(0, 4000, (24, 32))
    names = [
        _dicom_image(root / "good.dcm", stored, ImagerPixelSpacing=[0.139, 0.139]),
        _dicom_image(root / "zero.dcm", stored, PixelSpacing=[0.0, 0.139]),
        _dicom_image(root / "unknown.dcm", stored),
    ]
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": name, "modality": "XR"} for name in names]}))
    expectations = bundle_expectations("pretrain_joint")
    with pytest.raises(DatalistError) as refused:
        usable_datalist(datalist, None, tmp_path / "out", expectations=expectations)
    assert refused.value.problems == [
        f"[training] {root / 'zero.dcm'}: PixelSpacing [0.0, 0.139] is not two positive numbers (row, column spacing "
        "in mm); fix the header (re-export the image) or remove it from the datalist"
    ]
    (warning,) = refused.value.warnings
    assert warning.startswith(f"[training] {root / 'unknown.dcm'}: no PixelSpacing or ImagerPixelSpacing")
    usable = json.loads(
        Path(usable_datalist(datalist, None, tmp_path / "out", True, expectations=expectations)).read_text()
    )
    assert [Path(item["image"]).name for item in usable["training"]] == ["good.dcm", "unknown.dcm"]


def test_skip_bad_at_inference_keeps_the_usable_items_unless_none_is_left_or_the_input_itself_is_bad(tmp_path):
    items = [{"image": "a.png"}, {"image": "b.png"}]
    each_bad = [DatalistProblem(f"{name}: unreadable", (("inference", i),)) for i, name in enumerate(["a", "b"])]
    with pytest.raises(DatalistError, match="a: unreadable"):  # without skip_bad: stop
        usable_inference_items(items, each_bad[:1], output_dir=tmp_path)
    assert usable_inference_items(items, each_bad[:1], skip_bad=True, output_dir=tmp_path) == items[1:]
    (skipped,) = json.loads((tmp_path / "skipped_items.json").read_text())["skipped"]
    assert skipped == {"key": "inference", "position": 0, "item": items[0], "problem": "a: unreadable"}
    with pytest.raises(DatalistError, match="no usable item left"):
        usable_inference_items(items, each_bad, skip_bad=True, output_dir=tmp_path)
    with pytest.raises(DatalistError, match="scan.mhd: unreadable"):  # a problem of the input as a whole
        usable_inference_items(items, [DatalistProblem("scan.mhd: unreadable")], skip_bad=True, output_dir=tmp_path)
    assert usable_inference_items(items, [], skip_bad=True, output_dir=tmp_path) == items
    assert not (tmp_path / "skipped_items.json").exists()  # an earlier run's report is not left behind


def test_an_rgb_radiograph_passes_the_cxr_check_which_averages_its_channels(tmp_path):
    """finetune_cxr converts colour PNGs (``read_chest_xray`` averages R, G, B, drops alpha): not an error."""
    for mode, channels in (("RGB", 3), ("RGBA", 4)):
        Image.fromarray(RNG.integers(0, 255, (24, 32, channels), dtype=np.uint8), mode).save(tmp_path / "cxr.png")
        (tmp_path / "datalist.json").write_text(json.dumps(_detection("cxr.png")))
        summary = validate_data(str(tmp_path / "datalist.json"), bundle="finetune_cxr", num_classes=14)
        assert summary["items"] == 1 and summary["warnings"] == []


def test_thick_slices_are_a_warning_in_the_summary_and_the_report(tmp_path):
    """Slices 8 mm apart for 0.5 mm pixels (ratio 16 > 10): heart trains slice by slice, so listed, not refused."""
    content = _pair(tmp_path, np.zeros((8, 8, 5), np.uint8), label_affine=np.diag([0.5, 0.5, 8.0, 1.0]))
    _nifti(tmp_path / "img.nii.gz", _volume(), np.diag([0.5, 0.5, 8.0, 1.0]))
    (tmp_path / "datalist.json").write_text(json.dumps(content))
    report = tmp_path / "report.json"
    summary = validate_data(str(tmp_path / "datalist.json"), bundle="finetune_heart", report=str(report))
    (warning,) = summary["warnings"]
    assert "img.nii.gz" in warning and "slices 8 mm apart for 0.5 mm pixels (ratio 16 > 10)" in warning
    assert json.loads(report.read_text())["summary"]["warnings"] == [warning]
    with pytest.raises(DatalistError, match="8 mm exceeds 7 mm"):  # a CLI option overrides the bundle's value
        validate_data(str(tmp_path / "datalist.json"), bundle="finetune_heart", max_spacing_mm=7.0)
    with pytest.raises(ValueError, match="no_such_bundle: not a bundle folder .* 'finetune_heart'"):
        validate_data(str(tmp_path / "datalist.json"), bundle="no_such_bundle")


def test_a_header_whose_sform_and_pixdim_disagree_is_a_warning(tmp_path):
    """sform slices 3 mm apart, pixdim and qform 1 mm: MONAI's reader silently takes the qform; listed, not refused."""
    rows = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]]
    name = _nifti_with_raw_header(tmp_path / "mixed.nii", sform_rows=rows)
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [{"image": name}]}))
    (warning,) = validate_data(str(tmp_path / "datalist.json"), bundle="pretrain_joint")["warnings"]
    assert "mixed.nii: the header's sform, qform and pixdim disagree" in warning and "[0.0, 0.0, 3.0, 0.0]" in warning
