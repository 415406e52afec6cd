"""Embedded demo corpus: small synthetic CT/MR volumes and radiographs of four anatomy-like hidden classes.

:func:`make_demo_corpus` writes real files that MONAI's readers open like clinical data:

- volumes as NIfTI (``.nii.gz``, RAS affine with the voxel spacing) or as DICOM series folders (one CT/MR Image
  Storage file per slice written with pydicom: ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
  SliceThickness, RescaleSlope/Intercept, study/series/SOP UIDs);
- 2D radiograph-like projections as 8-bit PNG;
- ``datalist.json`` (decathlon style, list ``training``) with ``image``, ``modality``, ``kind`` and ``class_label``.

Classes (``DEMO_CLASSES``): ``head`` (skull shell, brain, ventricles), ``thorax`` (two lungs, heart, spine, aorta,
ribs), ``abdomen`` (liver, kidneys, aorta, spine, gas bubbles) and ``limb`` (muscle, fat ring, one bone splitting into
two across a joint). Each item draws its own rotation, scale, offset, voxel spacing (in-plane 0.8-1.2 mm, slices
1.5-3 mm), slice count, tissue texture, blur, noise and (MR) bias field; radiographs also vary in exposure, scatter,
heel effect and gamma. So the classes differ by anatomy, not by format, modality or geometry (modality CT/MR and
format NIfTI/DICOM alternate within every class), and the nuisances are those the views teach invariance to.

It serves the CPU demo of joint image-volume pretraining (arXiv 2212.01893): the hidden classes measure how well
learned embeddings separate anatomy. Generation is deterministic from ``seed`` and takes about a second for the
default size; a complete existing corpus with the same parameters is reused as is.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from scipy.ndimage import gaussian_filter

from custom_nets.atomic_files import atomic_path, atomic_write_json

__all__ = ["DEMO_CLASSES", "DEMO_STRUCTURES", "DEMO_VERSION", "make_demo_corpus", "demo_label_map", "demo_structures"]

DEMO_CLASSES = ("head", "thorax", "abdomen", "limb")
DEMO_STRUCTURES = ("background", "organ", "bone")
DEMO_VERSION = 5
_DATALIST_NAME = "datalist.json"

# tissue labels of the phantoms
AIR, SOFT, FAT, BONE, LUNG, ORGAN, VESSEL, FLUID, MARROW, BRAIN, KIDNEY = range(11)
_CT_HU = np.array([-1000, 40, -100, 900, -850, 60, 250, 10, 300, 35, 150], dtype=np.float32)
_MR_T1 = np.array([0, 420, 950, 60, 40, 520, 1100, 160, 780, 640, 600], dtype=np.float32)
_XR_MU = np.array([0.0, 0.020, 0.018, 0.055, 0.004, 0.021, 0.024, 0.020, 0.030, 0.020, 0.021], dtype=np.float32)
# texture: (smoothing sigma in voxels, relative amplitude) per class
_TEXTURE = {"head": (0.8, 0.06), "thorax": (1.5, 0.08), "abdomen": (2.5, 0.10), "limb": (1.0, 0.05)}


def _ellipsoid(x, y, z, center, radii) -> np.ndarray:
    return ((x - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2 + (
        (z - center[2]) / radii[2]
    ) ** 2 <= 1.0


def _cylinder(x, y, center, radii) -> np.ndarray:
    return ((x - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2 <= 1.0


def demo_label_map(name: str, x: np.ndarray, y: np.ndarray, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Tissue labels of class ``name`` at the physical points (x, y, z) in mm (broadcastable arrays).

    x runs right-left, y anterior-posterior, z inferior-superior, all centred on the anatomy; ``rng`` draws the
    per-item anatomical variation (ventricle size, gas bubbles...).
    """
    shape = np.broadcast_shapes(x.shape, y.shape, z.shape)
    labels = np.full(shape, AIR, dtype=np.int8)
    if name == "head":
        radii = np.array([21.0, 25.0, 27.0])
        labels[_ellipsoid(x, y, z, (0, 0, 0), radii + 2.0)] = SOFT
        labels[_ellipsoid(x, y, z, (0, 0, 0), radii)] = BONE
        labels[_ellipsoid(x, y, z, (0, 0, 0), radii - 3.0)] = BRAIN
        ventricle = rng.uniform(2.0, 4.0)
        for side in (-1, 1):
            labels[_ellipsoid(x, y, z, (side * 5.0, -2.0, 4.0), (ventricle, 9.0, 7.0))] = FLUID
    elif name == "thorax":
        labels[np.broadcast_to(_cylinder(x, y, (0, 0), (26.0, 19.0)), shape)] = FAT
        labels[np.broadcast_to(_cylinder(x, y, (0, 0), (23.0, 16.0)), shape)] = SOFT
        rib_ring = _cylinder(x, y, (0, 0), (22.5, 15.5)) & ~_cylinder(x, y, (0, 0), (20.5, 13.5))
        pitch = rng.uniform(9.0, 12.0)
        ribs = np.abs(np.mod(z + rng.uniform(0.0, pitch), pitch) - pitch / 2) < 1.3
        labels[np.broadcast_to(rib_ring & ribs, shape)] = BONE
        for side in (-1, 1):
            labels[_ellipsoid(x, y, z, (side * 11.0, -1.0, 0.0), (8.5, 11.0, 45.0))] = LUNG
        labels[_ellipsoid(x, y, z, (2.0, -5.0, -6.0), (7.0, 6.0, 12.0))] = ORGAN
        labels[np.broadcast_to(_cylinder(x, y, (0.0, 12.5), (4.0, 4.0)), shape)] = BONE
        labels[np.broadcast_to(_cylinder(x, y, (-4.5, 7.0), (2.2, 2.2)), shape)] = VESSEL
    elif name == "abdomen":
        labels[np.broadcast_to(_cylinder(x, y, (0, 0), (27.0, 20.0)), shape)] = FAT
        labels[np.broadcast_to(_cylinder(x, y, (0, 0), (24.0, 17.0)), shape)] = SOFT
        labels[_ellipsoid(x, y, z, (-9.0, -3.0, 5.0), (13.0, 10.0, 30.0))] = ORGAN
        for side in (-1, 1):
            labels[_ellipsoid(x, y, z, (side * 11.0, 9.0, -3.0), (4.0, 5.0, 10.0))] = KIDNEY
        labels[np.broadcast_to(_cylinder(x, y, (2.0, 8.0), (2.6, 2.6)), shape)] = VESSEL
        labels[np.broadcast_to(_cylinder(x, y, (0.0, 13.5), (4.0, 4.0)), shape)] = BONE
        for _ in range(int(rng.integers(3, 7))):
            center = (rng.uniform(2.0, 15.0), rng.uniform(-12.0, 2.0), rng.uniform(-30.0, 30.0))
            labels[_ellipsoid(x, y, z, center, (rng.uniform(1.5, 3.5),) * 3)] = AIR
    elif name == "limb":
        labels[np.broadcast_to(_cylinder(x, y, (0, 0), (20.0, 20.0)), shape)] = FAT
        labels[np.broadcast_to(_cylinder(x, y, (0, 0), (17.0, 17.0)), shape)] = SOFT
        gap = rng.uniform(1.5, 3.5)
        lower = np.broadcast_to(z < -gap, shape)
        upper = np.broadcast_to(z > gap, shape)
        shaft = np.broadcast_to(_cylinder(x, y, (0.0, 0.0), (7.0, 7.0)), shape)
        labels[shaft & lower] = BONE
        labels[np.broadcast_to(_cylinder(x, y, (0.0, 0.0), (4.0, 4.0)), shape) & lower] = MARROW
        for side in (-1, 1):
            labels[np.broadcast_to(_cylinder(x, y, (side * 5.5, 1.0), (4.0, 4.0)), shape) & upper] = BONE
            labels[np.broadcast_to(_cylinder(x, y, (side * 5.5, 1.0), (2.0, 2.0)), shape) & upper] = MARROW
        labels[_ellipsoid(x, y, z, (0.0, 0.0, 0.0), (9.0, 9.0, gap))] = FLUID
    else:
        raise ValueError(f"unknown demo class {name!r}; choose from {DEMO_CLASSES}")
    return labels


def demo_structures(labels: np.ndarray) -> np.ndarray:
    """Segmentation target of a tissue label map, as uint8 indices into ``DEMO_STRUCTURES``.

    ``organ`` is the parenchyma of every class's solid organs (brain, heart, liver, kidneys), ``bone`` every bone with
    its marrow (skull, ribs, spine, limb bones). Neither is an intensity threshold: brain (CT 35 HU) lies within a few
    HU of muscle (40 HU) and is told apart by the skull around it, heart and liver (60 HU) by shape, position and
    texture against the noise; on MR, bone (60) is as dark as lung (40) and air, so it is found by its shape and place.
    """
    structures = np.zeros(labels.shape, dtype=np.uint8)
    structures[np.isin(labels, (ORGAN, BRAIN, KIDNEY))] = 1
    structures[np.isin(labels, (BONE, MARROW))] = 2
    return structures


def _posed_grid(shape, spacing, rng: np.random.Generator):
    """Physical coordinates of a grid after a random in-plane rotation, isotropic scale and offset of the anatomy."""
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    angle = math.radians(rng.uniform(-30.0, 30.0))
    scale = rng.uniform(0.8, 1.2)
    shift = rng.uniform(-5.0, 5.0, size=3) * np.array([1.0, 1.0, 2.0])
    xr = (math.cos(angle) * x - math.sin(angle) * y) / scale - shift[0]
    yr = (math.sin(angle) * x + math.cos(angle) * y) / scale - shift[1]
    return xr, yr, z / scale - shift[2]


def _tissue_image(labels, table, name, rng: np.random.Generator) -> np.ndarray:
    """Tissue values with class-specific texture and a random partial-volume blur (resolution / kernel)."""
    values = table[labels]
    sigma, amplitude = _TEXTURE[name]
    texture = gaussian_filter(rng.standard_normal(labels.shape).astype(np.float32), sigma)
    texture /= texture.std() + 1e-6
    spread = amplitude * (np.abs(values) + 50.0)
    return gaussian_filter(values + spread * texture * (labels != AIR), rng.uniform(0.4, 1.2))


def _volume(name: str, modality: str, rng: np.random.Generator, in_plane: int):
    """One phantom volume (X, Y, Z), its spacing and its tissue labels: CT in HU (int16) or MR intensities (uint16)."""
    spacing = (float(rng.uniform(0.8, 1.2)),) * 2 + (float(rng.choice([1.5, 2.0, 2.5, 3.0])),)
    shape = (in_plane, in_plane, int(rng.integers(24, 41)))
    labels = demo_label_map(name, *_posed_grid(shape, spacing, rng), rng)
    if modality == "CT":
        image = _tissue_image(labels, _CT_HU, name, rng) + rng.normal(0.0, rng.uniform(5.0, 30.0), labels.shape)
        return np.clip(np.round(image), -1024, 3071).astype(np.int16), spacing, labels
    image = _tissue_image(labels, _MR_T1, name, rng)
    x, y, z = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij", sparse=True)
    coefficients = rng.uniform(-0.35, 0.35, size=4)
    image = image * np.exp(coefficients[0] * x + coefficients[1] * y + coefficients[2] * z + coefficients[3] * x * y)
    noise = rng.uniform(10.0, 40.0)
    image = np.hypot(image + rng.normal(0.0, noise, shape), rng.normal(0.0, noise, shape))  # Rician magnitude
    return np.clip(np.round(image), 0, 65535).astype(np.uint16), spacing, labels


def _radiograph(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A projection radiograph (rows = superior to inferior, columns = right to left) as uint8."""
    labels = demo_label_map(name, *_posed_grid((size, size, size), (1.0, 1.0, 1.0), rng), rng)
    attenuation = (_XR_MU[labels] * (1.0 + 0.05 * rng.standard_normal(labels.shape))).sum(axis=1)
    image = gaussian_filter(attenuation.T[::-1], rng.uniform(0.0, 1.2)) / max(float(attenuation.max()), 1e-6)
    heel = np.linspace(1.0 - rng.uniform(0.0, 0.3), 1.0, size)[:, None]  # anode heel effect along the rows
    image = image * heel * rng.uniform(0.6, 1.0) + rng.uniform(0.0, 0.15)  # exposure and scatter
    image = np.clip(image + rng.normal(0.0, rng.uniform(0.01, 0.06), image.shape), 0, 1)
    return np.round(255.0 * image ** rng.uniform(0.6, 1.6)).astype(np.uint8)


def _write_nifti(path: Path, volume: np.ndarray, spacing) -> None:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(volume.shape, spacing, strict=True)]
    image = nib.Nifti1Image(volume, affine)
    image.header.set_xyzt_units("mm")
    with atomic_path(path) as temporary:
        nib.save(image, temporary)


def _write_dicom_series(folder: Path, volume: np.ndarray, spacing, modality: str, uid_key: str) -> None:
    """One DICOM file per slice; ``volume`` is (X, Y, Z) with X along the rows (DICOM columns)."""
    if folder.exists():
        shutil.rmtree(folder)
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    study_uid = generate_uid(entropy_srcs=[uid_key, "study"])
    series_uid = generate_uid(entropy_srcs=[uid_key, "series"])
    frame_uid = generate_uid(entropy_srcs=[uid_key, "frame"])
    origin = [-(n - 1) / 2.0 * s for n, s in zip(volume.shape, spacing, strict=True)]
    intercept = -1024.0 if modality == "CT" else 0.0
    for k in range(volume.shape[2]):
        sop_uid = generate_uid(entropy_srcs=[uid_key, "slice", str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientName, ds.PatientID = f"Demo^{uid_key}", uid_key
        ds.StudyDate, ds.SeriesDate, ds.StudyID = "20240101", "20240101", "1"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [f"{origin[0]:.4f}", f"{origin[1]:.4f}", f"{origin[2] + k * spacing[2]:.4f}"]
        ds.SliceLocation = f"{origin[2] + k * spacing[2]:.4f}"
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # row spacing (y), column spacing (x)
        ds.SliceThickness = ds.SpacingBetweenSlices = f"{spacing[2]:.4f}"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = f"{intercept:g}", "1"
        if modality == "CT":
            ds.RescaleType = "HU"
        stored = (volume[:, :, k].T.astype(np.int32) - int(intercept)).astype(np.uint16)
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        ds.save_as(tmp / f"IM{k + 1:04d}.dcm", enforce_file_format=True)
    os.replace(tmp, folder)


def _is_complete(root: Path, manifest: dict) -> bool:
    datalist = root / _DATALIST_NAME
    if not datalist.is_file():
        return False
    try:
        content = json.loads(datalist.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if content.get("demo") != manifest:
        return False
    for item in content.get("training", []):
        path = root / item["image"]
        expected = item.get("num_files")
        if not path.exists() or (expected is not None and len(list(path.glob("*.dcm"))) != expected):
            return False
        if "label" in item and not (root / item["label"]).is_file():
            return False
    return bool(content.get("training"))


def make_demo_corpus(
    root: str | os.PathLike,
    num_per_class: int = 6,
    seed: int = 0,
    in_plane: int = 64,
    image_size: int = 64,
    with_labels: bool = False,
    classes: Sequence[str] = DEMO_CLASSES,
) -> Path:
    """Write the demo corpus under ``root`` (or reuse a complete one) and return its datalist path.

    Per class: ``num_per_class`` volumes (``in_plane`` x ``in_plane`` x 24-40 slices; modality alternating CT/MR and
    format alternating DICOM series/NIfTI, shifted per class so that even one item per class covers all four) and
    ``num_per_class`` PNG radiographs of ``image_size`` x ``image_size`` (modality XR).
    Layout: ``root/volumes/<class>_<i>.nii.gz``, ``root/volumes/<class>_<i>_dicom/IM0001.dcm...``,
    ``root/images/<class>_<i>.png``, ``root/datalist.json`` (paths relative to ``root``; items carry ``class_label``,
    the index in ``DEMO_CLASSES``, and DICOM items ``num_files``). The datalist is written last, atomically, so an
    interrupted run is detected and redone; files of the same name are overwritten.

    With ``with_labels`` the corpus is a segmentation corpus: volumes only, all NIfTI, each with its label map
    ``root/labels/<class>_<i>.nii.gz`` (uint8 indices into ``DEMO_STRUCTURES``, see :func:`demo_structures`; same grid
    and affine as the image) under the item key ``label``.

    Args:
        root: output folder (created).
        num_per_class: volumes and images per class (4 classes).
        seed: the corpus is a deterministic function of ``seed`` and the sizes.
        in_plane: in-plane voxels of the volumes.
        image_size: side of the 2D images.
        with_labels: write a labelled volume corpus (segmentation) instead of the mixed 2D + 3D corpus.
        classes: the hidden classes to draw items of (a subset of ``DEMO_CLASSES``); ``class_label`` stays the index
            in ``DEMO_CLASSES``.
    """
    unknown = sorted(set(classes) - set(DEMO_CLASSES))
    if unknown or not classes:
        raise ValueError(f"classes must be a non-empty subset of {DEMO_CLASSES}, got {list(classes)}")
    if num_per_class < 1:
        raise ValueError(f"num_per_class must be >= 1, got {num_per_class}")
    root = Path(root)
    manifest = {
        "version": DEMO_VERSION,
        "seed": seed,
        "num_per_class": num_per_class,
        "in_plane": in_plane,
        "image_size": image_size,
        "with_labels": with_labels,
        "classes": list(classes),
    }
    if _is_complete(root, manifest):
        return root / _DATALIST_NAME
    for folder in ("volumes", "labels" if with_labels else "images"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    items = []
    for label, name in enumerate(DEMO_CLASSES):
        if name not in classes:
            continue
        for i in range(num_per_class):
            rng = np.random.default_rng([seed, label, i, 0])
            turn = i + label  # modality and format alternate, shifted per class: CT-DICOM, MR-NIfTI, CT-NIfTI, MR-DICOM
            modality = "CT" if turn % 2 == 0 else "MR"
            volume, spacing, tissues = _volume(name, modality, rng, in_plane)
            stem = f"{name}_{i:02d}"
            if (turn + turn // 2) % 2 == 0 and not with_labels:
                relative = f"volumes/{stem}_dicom"
                _write_dicom_series(root / relative, volume, spacing, modality, f"{seed}.{stem}")
                extra = {"num_files": int(volume.shape[2])}
            else:
                relative = f"volumes/{stem}.nii.gz"
                _write_nifti(root / relative, volume, spacing)
                extra = {}
            if with_labels:
                extra = {"label": f"labels/{stem}.nii.gz"}
                _write_nifti(root / extra["label"], demo_structures(tissues), spacing)
            items.append({"image": relative, "modality": modality, "kind": "volume", "class_label": label, **extra})
        for i in range(0 if with_labels else num_per_class):
            rng = np.random.default_rng([seed, label, i, 1])
            relative = f"images/{name}_{i:02d}.png"
            with atomic_path(root / relative) as temporary:
                Image.fromarray(_radiograph(name, rng, image_size)).save(temporary)
            items.append({"image": relative, "modality": "XR", "kind": "image", "class_label": label})
    content = {
        "name": "custom_nets demo corpus",
        "description": "Synthetic CT/MR volumes (NIfTI, DICOM series) and PNG radiographs of 4 anatomy-like classes",
        "classes": [name for name in DEMO_CLASSES if name in classes],
        **({"labels": {str(i): name for i, name in enumerate(DEMO_STRUCTURES)}} if with_labels else {}),
        "demo": manifest,
        "training": items,
    }
    atomic_write_json(root / _DATALIST_NAME, content)
    return root / _DATALIST_NAME
