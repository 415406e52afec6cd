"""The joint loader end to end on real files, the inference dataset, and reading pydicom's real CT data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from custom_nets.data.joint_dataset import build_inference_dataset, build_joint_dataloader
from custom_nets.data.loading import load_item_array

SPACING = (1.0, 1.0, 2.5)


def loader_for(datalist, **overrides):
    options = dict(
        num_slices=24,
        image_size=32,
        volume_size=32,
        small_crop_size=16,
        num_small_crops=2,
        images_per_batch=3,
        volumes_per_batch=2,
        spacing=SPACING,
        seed=4,
    )
    options.update(overrides)
    return build_joint_dataloader(datalist, **options)


def test_mixed_batches_follow_the_batch_format(demo_datalist):
    items = json.loads(demo_datalist.read_text())["training"]
    loader = loader_for(demo_datalist)
    assert len(loader) == 4  # max(ceil(8 / 3), ceil(8 / 2))
    seen_images, seen_volumes = set(), set()
    for batch in loader:
        assert [tuple(v.shape) for v in batch["image_views"]] == [(3, 1, 32, 32)] * 2 + [(3, 1, 16, 16)] * 2
        assert [tuple(v.shape) for v in batch["volume_views"]] == [(2, 1, 24, 32, 32)] * 2
        assert all(torch.isfinite(v).all() for v in batch["image_views"] + batch["volume_views"])
        assert batch["slice_valid"].shape == (2, 24) and batch["slice_position"].shape == (2, 24)
        for name, kind, seen in (("image", "image", seen_images), ("volume", "volume", seen_volumes)):
            for index, label in zip(batch[f"{name}_index"].tolist(), batch[f"{name}_class"].tolist(), strict=True):
                assert items[index]["kind"] == kind and items[index]["class_label"] == label
                seen.add(index)
        steps = batch["slice_position"].diff(dim=1)
        torch.testing.assert_close(steps, torch.full_like(steps, 2.5))
    assert len(seen_images) == 8 and len(seen_volumes) == 8


def test_short_volumes_are_padded_and_masked(demo_datalist):
    loader = loader_for(demo_datalist, num_slices=60, images_per_batch=0, volumes_per_batch=4, volume_size=16)
    padded = 0
    for batch in loader:
        assert batch["image_views"] == [] and batch["image_index"].shape == (0,)
        valid = batch["slice_valid"]
        counts = valid.sum(dim=1)
        assert bool((counts >= 14).all()) and bool((counts < 60).all())  # 36-120 mm at 2.5 mm per slice
        assert torch.equal(valid, torch.arange(60).expand(len(counts), 60) < counts[:, None])
        for view in batch["volume_views"]:
            assert torch.count_nonzero(view.transpose(1, 2)[~valid]) == 0
        padded += int((~valid).sum())
    assert padded > 0


def test_images_only_datalist(demo_datalist):
    items = [item for item in json.loads(demo_datalist.read_text())["training"] if item["kind"] == "image"]
    loader = loader_for(items, base_dir=demo_datalist.parent, num_small_crops=0, volumes_per_batch=2)
    batch = next(iter(loader))
    assert len(batch["image_views"]) == 2 and batch["volume_views"] == []
    assert batch["slice_valid"].dtype == torch.bool and batch["volume_index"].shape == (0,)


def test_same_seed_same_batches(demo_datalist):
    first = next(iter(loader_for(demo_datalist, num_small_crops=0)))
    second = next(iter(loader_for(demo_datalist, num_small_crops=0)))
    assert torch.equal(first["volume_index"], second["volume_index"])
    for a, b in zip(
        first["image_views"] + first["volume_views"], second["image_views"] + second["volume_views"], strict=True
    ):
        torch.testing.assert_close(a, b)


def test_ranks_share_the_epoch_length(demo_datalist):
    loaders = [loader_for(demo_datalist, rank=r, world_size=2, images_per_batch=2) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 2
    assert [loader.batch_sampler.rank for loader in loaders] == [0, 1]


def test_disk_cache_keeps_one_folder_per_preprocessing_setting(demo_datalist, tmp_path):
    shapes = []
    for spacing in (SPACING, (1.2, 1.2, 3.0), SPACING):
        loader = loader_for(demo_datalist, spacing=spacing, cache="disk", cache_dir=tmp_path, num_small_crops=0)
        shapes.append(next(iter(loader))["volume_views"][0].shape)
    folders = sorted(path.name.rsplit("-", 1)[0] for path in tmp_path.iterdir())
    assert folders == ["train-images", "train-images", "train-volumes", "train-volumes"]
    assert all(any(path.glob("*.pt")) for path in tmp_path.iterdir())
    assert shapes == [(2, 1, 24, 32, 32)] * 3


@pytest.mark.slow
def test_worker_processes_and_memory_cache(demo_datalist):
    loader = loader_for(demo_datalist, num_workers=1, cache="memory")
    batches = list(loader)
    assert len(batches) == len(loader) and batches[0]["volume_views"][0].shape == (2, 1, 24, 32, 32)


def test_inference_dataset_is_deterministic_without_augmentation(demo_datalist, tmp_path):
    dataset = build_inference_dataset(demo_datalist, image_size=32, volume_size=(32, 28), spacing=SPACING)
    items = json.loads(demo_datalist.read_text())["training"]
    assert len(dataset) == len(items)
    for position, item in enumerate(items):
        sample = dataset[position]
        assert sample["global_index"] == position and sample["kind"] == item["kind"]
        assert sample["class_label"] == item["class_label"] and sample["modality"] == item["modality"]
        if item["kind"] == "image":
            assert tuple(sample["image"].shape) == (1, 32, 32)
        else:
            n = sample["image"].shape[1]
            assert tuple(sample["image"].shape) == (1, n, 32, 28) and 14 <= n <= 48
            assert sample["slice_valid"].all() and sample["slice_position"].shape == (n,)
    cached = build_inference_dataset(
        demo_datalist,
        image_size=32,
        volume_size=(32, 28),
        num_slices=16,
        spacing=SPACING,
        cache="disk",
        cache_dir=tmp_path / "cache",
    )
    for position in (0, 9):
        repeat = [torch.as_tensor(cached[position]["image"]) for _ in range(2)]
        torch.testing.assert_close(repeat[0], repeat[1])
    fixed = cached[0] if items[0]["kind"] == "volume" else cached[1]
    assert fixed["image"].shape[1] == 16 and fixed["slice_valid"].shape == (16,)


def test_inference_batches_of_one(demo_datalist):
    from monai.data import DataLoader

    dataset = build_inference_dataset(demo_datalist, image_size=32, volume_size=32, num_slices=16, spacing=SPACING)
    shapes = {batch["kind"][0]: tuple(batch["image"].shape) for batch in DataLoader(dataset, batch_size=1)}
    assert shapes == {"image": (1, 1, 32, 32), "volume": (1, 1, 16, 32, 32)}


def pydicom_ct_series() -> Path:
    folder = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "77654033" / "CT2"
    if not folder.is_dir():
        pytest.skip("pydicom's CT series is not installed")
    return folder


def test_real_ct_dicom_series_from_pydicom(tmp_path):
    series = pydicom_ct_series()
    # pydicom's CT2 folder skips 161 slices after its first file (z = -99.48, then 103.02 ... 105.52 mm): ITK would read
    # 4 slices with a distorted spacing, so the check rejects it; the 3 contiguous slices load as a real volume.
    with pytest.raises(ValueError, match=r"CT2: uneven slice spacing \(usual step 1.25 mm, also 202 mm\)"):
        load_item_array({"image": str(series), "kind": "volume"})
    folder = tmp_path / "CT2_contiguous"
    folder.mkdir()
    for path in sorted(series.iterdir())[1:]:
        shutil.copy(path, folder / path.name)
    volume = load_item_array({"image": str(folder), "kind": "volume"})
    assert tuple(volume.shape) == (1, 16, 16, 3)
    spacing = np.linalg.norm(np.asarray(volume.affine)[:3, :3], axis=0)
    np.testing.assert_allclose(spacing[:2], [0.488281, 0.488281], rtol=1e-5)
    slices = [pydicom.dcmread(path) for path in sorted(folder.iterdir())]
    hounsfield = [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices]
    assert float(volume.max()) == max(float(h.max()) for h in hounsfield)  # rescaled to Hounsfield units
    sample = build_inference_dataset([{"image": str(folder), "modality": "CT"}], volume_size=16)[0]
    assert tuple(sample["image"].shape) == (1, 3, 16, 16) and 0.0 <= float(sample["image"].min())
    assert float(sample["image"].max()) <= 1.0


def test_real_2d_ct_dicom_from_pydicom():
    image = load_item_array({"image": get_testdata_file("CT_small.dcm"), "kind": "image"})
    assert tuple(image.shape) == (1, 128, 128)
    assert float(image.min()) == -896.0 and float(image.max()) == 1167.0


def test_metaimage_volume_keeps_its_geometry(tmp_path):
    import itk

    array = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)  # ITK arrays are (z, y, x)
    image = itk.image_from_array(array)
    image.SetSpacing([0.5, 0.75, 2.0])
    itk.imwrite(image, str(tmp_path / "case.mhd"))
    volume = load_item_array({"image": str(tmp_path / "case.mhd"), "kind": "volume"})
    assert tuple(volume.shape) == (1, 4, 5, 6)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(volume.affine)[:3, :3], axis=0), [0.5, 0.75, 2.0])
    torch.testing.assert_close(volume[0, 1, 2, 3], torch.tensor(float(array[3, 2, 1])))
    sample = build_inference_dataset([{"image": str(tmp_path / "case.mhd")}], volume_size=4)[0]
    torch.testing.assert_close(sample["slice_position"], 2.0 * torch.arange(6, dtype=torch.float32))


def test_rgb_png_becomes_one_grey_channel(tmp_path):
    from PIL import Image

    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 30, 60, 90
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    grey = load_item_array({"image": str(tmp_path / "colour.png"), "kind": "image"})
    assert tuple(grey.shape) == (1, 8, 6)  # MONAI order: (C, X, Y)
    torch.testing.assert_close(grey, torch.full((1, 8, 6), 60.0))
    assert tuple(load_item_array({"image": str(tmp_path / "colour.png"), "kind": "image"}, channels=3).shape) == (
        3,
        8,
        6,
    )


def test_nan_volume_stops_the_loader_with_the_file_name(tmp_path, nifti_writer):
    volume = np.ones((8, 8, 6), np.float32)
    volume[2, 3, 4] = np.inf
    nifti_writer(tmp_path / "broken.nii.gz", volume)
    loader = build_joint_dataloader(
        [{"image": "broken.nii.gz", "modality": "MR"}], tmp_path, num_slices=4, volume_size=8, volumes_per_batch=1
    )
    with pytest.raises(Exception) as error:
        next(iter(loader))
    messages = []
    cause = error.value
    while cause is not None:
        messages.append(str(cause))
        cause = cause.__cause__
    assert any(str(tmp_path / "broken.nii.gz") in m and "NaN/inf" in m for m in messages), messages


def test_nifti_and_png_load_without_itk_and_dicom_names_the_fix(tmp_path, nifti_writer, monkeypatch):
    from monai.utils import OptionalImportError
    from PIL import Image

    from custom_nets.data import loading

    def itk_missing() -> None:  # what MONAI's ITKReader() raises when itk is not installed
        raise OptionalImportError("required package `itk` is not installed or the version doesn't match requirement.")

    monkeypatch.setitem(loading.READERS, "itk", itk_missing)
    nifti_writer(tmp_path / "volume.nii.gz", np.ones((8, 8, 4), np.float32))
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "image.png")
    assert tuple(load_item_array({"image": str(tmp_path / "volume.nii.gz"), "kind": "volume"}).shape) == (1, 8, 8, 4)
    assert tuple(load_item_array({"image": str(tmp_path / "image.png"), "kind": "image"}).shape) == (1, 8, 6)
    dicom = get_testdata_file("CT_small.dcm")
    with pytest.raises(loading.ReaderUnavailableError, match="itk-io") as error:
        load_item_array({"image": dicom, "kind": "image"})
    assert dicom in str(error.value) and isinstance(error.value, ImportError) and isinstance(error.value, ValueError)


def test_readers_are_built_once_on_first_use(tmp_path, nifti_writer):
    from custom_nets.data.loading import LoadMedicalImaged

    nifti_writer(tmp_path / "volume.nii.gz", np.ones((8, 8, 4), np.float32))
    load = LoadMedicalImaged("image")
    assert load.loaders == {}
    load({"image": str(tmp_path / "volume.nii.gz")})
    first = load.loaders["nibabel"]
    load({"image": str(tmp_path / "volume.nii.gz")})
    assert list(load.loaders) == ["nibabel"] and load.loaders["nibabel"] is first
