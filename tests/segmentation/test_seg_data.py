"""Segmentation data: MM-WHS / BraTS preparation, label mapping, pair checks, 2.5D stacking, balanced slice sampling."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from custom_nets.data.segmentation import (
    CheckSegmentationPaird,
    RandForegroundSliced,
    StackNeighbourSlicesd,
    inference_datalist,
    load_segmentation_datalist,
    make_datalist,
    select_label_fraction,
    select_stratified,
    split_cases,
)
from custom_nets.datasets import brats, mmwhs


def test_mmwhs_label_mapping_covers_every_raw_code():
    raw = np.array([0, 205, 420, 500, 550, 600, 820, 850, 205], dtype=np.int16)
    assert mmwhs.map_mmwhs_labels(raw).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 1]
    assert mmwhs.map_mmwhs_labels(raw).dtype == np.uint8
    assert len(mmwhs.MMWHS_CLASS_NAMES) == 8


@pytest.mark.parametrize("bad", [421, 3, 205.5])
def test_mmwhs_label_mapping_rejects_other_values_naming_the_file(bad):
    raw = np.array([0, 205, bad])
    with pytest.raises(ValueError, match=r"case_9_label\.nii\.gz.*unexpected MM-WHS label values"):
        mmwhs.map_mmwhs_labels(raw, "case_9_label.nii.gz")


def test_mmwhs_prepare_random_split_writes_mapped_labels(heart_raw, tmp_path, seg_data):
    heart_label = seg_data.heart_label
    out = tmp_path / "prepared"
    datalist = json.loads(
        Path(mmwhs.prepare(str(heart_raw), str(out), split="random", val_fraction=0.25, test_fraction=0.25)).read_text()
    )
    assert [len(datalist[s]) for s in ("training", "validation", "testing")] == [2, 1, 1]
    entry = datalist["training"][0]
    written = nib.load(str(out / entry["label"]))
    mapped = np.asarray(written.dataobj)
    assert mapped.dtype == np.uint8
    assert np.allclose(written.affine, seg_data.AFFINE)
    expected = mmwhs.map_mmwhs_labels(heart_label())
    assert np.array_equal(mapped, expected)
    assert sorted(np.unique(mapped).tolist()) == list(range(8))
    assert (out / entry["image"]).resolve() == (heart_raw / f"ct_train_{entry['case']}_image.nii.gz").resolve()


def test_mmwhs_authors_split_preset(tmp_path, seg_data):
    make_heart_folder = seg_data.make_heart_folder
    raw = make_heart_folder(tmp_path / "raw", case_ids=tuple(range(1001, 1021)))
    datalist = json.loads(Path(mmwhs.prepare(str(raw), str(tmp_path / "out"))).read_text())
    assert [e["case"] for e in datalist["testing"]] == [1002, 1010, 1012, 1019]
    assert [e["case"] for e in datalist["validation"]] == [1004, 1007, 1013]
    assert len(datalist["training"]) == 13 and datalist["split"] == "authors"


def test_mmwhs_authors_split_needs_every_case(heart_raw, tmp_path):
    with pytest.raises(FileNotFoundError, match="--split random"):
        mmwhs.prepare(str(heart_raw), str(tmp_path / "out"))


def test_mmwhs_prepare_rejects_unknown_label_naming_the_file(heart_raw, tmp_path, seg_data):
    heart_label, write_nifti = seg_data.heart_label, seg_data.write_nifti
    label = heart_label()
    label[0, 0, 0] = 999
    write_nifti(heart_raw / "ct_train_1003_label.nii.gz", label)
    with pytest.raises(ValueError, match=r"ct_train_1003_label\.nii\.gz.*999"):
        mmwhs.prepare(str(heart_raw), str(tmp_path / "out"), split="random", val_fraction=0.25, test_fraction=0.25)


def test_brats_regions_from_labels(seg_data):
    brats_label, SHAPE = seg_data.brats_label, seg_data.SHAPE
    label = torch.from_numpy(brats_label()[None].astype(np.float32))
    regions = brats.brats_regions(label, "regions")
    assert regions.shape == (3, *SHAPE)
    whole, core, enhancing = (int(r.sum()) for r in regions)
    assert whole == 12 * 10 * 3 and core == 8 * 6 * 3 and enhancing == 4 * 2 * 3
    binary = brats.brats_regions(label, "whole_tumour")
    assert binary.shape == (1, *SHAPE) and int(binary.sum()) == whole
    label_2023 = torch.where(label == 4, torch.tensor(3.0), label)
    assert torch.equal(brats.brats_regions(label_2023, "regions", et_label=3), regions)


def test_brats_labels_transform_rejects_unknown_values_naming_the_file():
    label = MetaTensor(torch.tensor([[[[0.0, 1.0, 3.0]]]]), meta={"filename_or_obj": "/d/BraTS_007_seg.nii.gz"})
    with pytest.raises(ValueError, match=r"BraTS_007_seg\.nii\.gz.*\[3\.0\].*et_label=3"):
        brats.BratsLabelsd("label")({"label": label})
    with pytest.raises(ValueError, match="mode"):
        brats.BratsLabelsd("label", mode="tumour")


def test_brats_prepare_orders_modalities_and_checks_files(brats_raw, tmp_path):
    out = tmp_path / "prepared"
    datalist = json.loads(
        Path(
            brats.prepare(str(brats_raw), str(out), modalities="t1ce,flair", val_fraction=0.25, test_fraction=0.25)
        ).read_text()
    )
    assert datalist["modalities"] == ["t1ce", "flair"]
    entry = datalist["training"][0]
    assert [Path(p).name.split("_")[-1] for p in entry["image"]] == ["t1ce.nii.gz", "flair.nii.gz"]
    missing = brats_raw / "BraTS20_Training_002" / "BraTS20_Training_002_t2.nii.gz"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match="BraTS20_Training_002_t2.nii.gz"):
        brats.prepare(str(brats_raw), str(out), modalities=["flair", "t2"])
    with pytest.raises(ValueError, match="modalities"):
        brats.prepare(str(brats_raw), str(out), modalities="dwi")


def _pair(image_shape=(1, 4, 4, 3), label_shape=(1, 4, 4, 3), label_affine=None, image=None, label=None):
    image = MetaTensor(torch.rand(image_shape) if image is None else image, meta={"filename_or_obj": "img.nii.gz"})
    label = MetaTensor(torch.zeros(label_shape) if label is None else label, meta={"filename_or_obj": "lab.nii.gz"})
    if label_affine is not None:
        label.affine = label_affine
    return {"image": image, "label": label}


def test_pair_check_accepts_a_matching_pair_and_names_both_files_otherwise():
    check = CheckSegmentationPaird(num_label_values=3)
    assert check(_pair())["image"].shape == (1, 4, 4, 3)
    with pytest.raises(ValueError, match=r"img\.nii\.gz and label lab\.nii\.gz have different voxel grids"):
        check(_pair(label_shape=(1, 4, 4, 2)))
    shifted = torch.eye(4, dtype=torch.float64)
    shifted[0, 3] = 2.0
    with pytest.raises(ValueError, match=r"img\.nii\.gz and label lab\.nii\.gz have different affines"):
        check(_pair(label_affine=shifted))
    nan_image = torch.rand(1, 4, 4, 3)
    nan_image[0, 1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"image img\.nii\.gz contains NaN"):
        check(_pair(image=nan_image))
    with pytest.raises(ValueError, match=r"label lab\.nii\.gz has values \[3\.0\] outside 0\.\.2"):
        check(_pair(label=torch.full((1, 4, 4, 3), 3.0)))


def test_stack_neighbour_slices_replicates_edges():
    volume = torch.arange(4.0).reshape(1, 1, 1, 4).expand(2, 2, 3, 4).clone()  # value = slice index
    volume[1] += 10  # second channel offset
    stacked = StackNeighbourSlicesd("image", num_slices=3)({"image": volume})["image"]
    assert stacked.shape == (6, 2, 3, 4)
    assert stacked[0:3, 0, 0].tolist() == [[0, 0, 1, 2], [0, 1, 2, 3], [1, 2, 3, 3]]
    assert stacked[3:6, 0, 0].tolist() == [[10, 10, 11, 12], [10, 11, 12, 13], [11, 12, 13, 13]]
    assert torch.equal(StackNeighbourSlicesd("image", 1)({"image": volume})["image"], volume)
    with pytest.raises(ValueError, match="odd"):
        StackNeighbourSlicesd("image", 2)


def _volume_with_foreground_slices(slices: list[int], depth: int = 10) -> dict:
    label = torch.zeros(1, 5, 5, depth)
    for z in slices:
        label[0, 2, 2, z] = 1
    image = torch.arange(float(depth)).expand(2, 5, 5, depth).clone()
    return {"image": image, "label": label, "case": "x"}


def test_foreground_slice_sampler_balances_and_falls_back():
    data = _volume_with_foreground_slices([3, 7])
    only_fg = RandForegroundSliced(["image", "label"], num_samples=20, pos=1, neg=0)
    only_fg.set_random_state(0)
    samples = only_fg(data)
    assert len(samples) == 20 and {s["slice_index"] for s in samples} == {3, 7}
    assert samples[0]["image"].shape == (2, 5, 5) and samples[0]["case"] == "x"
    assert all(s["image"][0, 0, 0].item() == s["slice_index"] for s in samples)
    only_bg = RandForegroundSliced(["image", "label"], num_samples=20, pos=0, neg=1)
    assert {3, 7}.isdisjoint(s["slice_index"] for s in only_bg(data))
    balanced = RandForegroundSliced(["image", "label"], num_samples=400, pos=1, neg=1)
    balanced.set_random_state(1)
    fraction = np.mean([s["slice_index"] in (3, 7) for s in balanced(data)])
    assert 0.4 < fraction < 0.6  # 2 of 10 slices hold foreground, yet half of the samples do
    empty = RandForegroundSliced(["image", "label"], num_samples=5, pos=1, neg=0)
    assert len(empty(_volume_with_foreground_slices([]))) == 5  # no foreground: background slices instead


def test_split_and_label_fraction_are_seeded_nested_and_checked():
    ids = [f"c{i}" for i in range(10)]
    split = split_cases(ids, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert [len(split[k]) for k in ("training", "validation", "testing")] == [7, 1, 2]
    assert sorted(sum(split.values(), [])) == sorted(ids)
    assert split == split_cases(ids, val_fraction=0.1, test_fraction=0.2, seed=3)
    items = list(range(20))
    tenth, quarter, half = (select_label_fraction(items, f, seed=1) for f in (0.1, 0.25, 0.5))
    assert (len(tenth), len(quarter), len(half)) == (2, 5, 10)
    assert set(tenth) <= set(quarter) <= set(half)
    assert select_label_fraction(items, 1.0) == items
    assert len(select_label_fraction(items[:3], 0.1)) == 1
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        select_label_fraction(items, 0.0)
    with pytest.raises(ValueError, match="too few"):
        split_cases(["a", "b"], 0.5, 0.5 - 1e-9)


def test_generic_datalist_pairs_images_and_labels(tmp_path, seg_data):
    write_nifti, SHAPE = seg_data.write_nifti, seg_data.SHAPE
    for case in ("a", "b", "c", "d", "e"):
        write_nifti(tmp_path / "imgs" / f"{case}.nii.gz", np.zeros(SHAPE, np.float32))
        write_nifti(tmp_path / "labs" / f"{case}_seg.nii.gz", np.zeros(SHAPE, np.uint8))
    out = make_datalist(
        str(tmp_path / "imgs"),
        str(tmp_path / "labs"),
        str(tmp_path / "dl.json"),
        label_suffix="_seg.nii.gz",
        val_fraction=0.2,
        test_fraction=0.2,
    )
    items = load_segmentation_datalist(out, "training", tmp_path)
    assert len(items) == 3 and all(Path(i["label"]).name == Path(i["image"]).name[:1] + "_seg.nii.gz" for i in items)
    write_nifti(tmp_path / "imgs" / "f.nii.gz", np.zeros(SHAPE, np.float32))
    with pytest.raises(FileNotFoundError, match=r"f\.nii\.gz has no label"):
        make_datalist(
            str(tmp_path / "imgs"), str(tmp_path / "labs"), str(tmp_path / "dl.json"), ".nii.gz", "_seg.nii.gz"
        )
    write_nifti(tmp_path / "labs" / "f_seg.nii.gz", np.zeros((3, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="different shapes"):
        make_datalist(
            str(tmp_path / "imgs"), str(tmp_path / "labs"), str(tmp_path / "dl.json"), label_suffix="_seg.nii.gz"
        )


def test_datalist_loading_errors_and_inference_inputs(tmp_path, seg_data):
    write_nifti, SHAPE = seg_data.write_nifti, seg_data.SHAPE
    with pytest.raises(FileNotFoundError, match="datalist not found"):
        load_segmentation_datalist(tmp_path / "none.json")
    path = tmp_path / "dl.json"
    path.write_text(json.dumps({"training": [{"image": "gone.nii.gz", "label": "gone.nii.gz"}], "testing": []}))
    with pytest.raises(ValueError, match="no 'testing' cases"):
        load_segmentation_datalist(path, "testing")
    with pytest.raises(FileNotFoundError, match="missing file: .*gone.nii.gz"):
        load_segmentation_datalist(path, "training", tmp_path)
    write_nifti(tmp_path / "vol.nii.gz", np.zeros(SHAPE, np.float32))
    assert inference_datalist(tmp_path) == [{"image": str(tmp_path / "vol.nii.gz")}]
    with pytest.raises(FileNotFoundError, match="no images to segment"):
        inference_datalist(tmp_path, pattern="*.mha")


def test_select_stratified_round_robin_nested_and_seeded():
    items = [{"case": f"{group}{i}", "group": group} for group in "abc" for i in range(3)] + [
        {"case": "d0", "group": "d"}
    ]
    three = select_stratified(items, 3, key="group", seed=4)
    assert sorted(item["group"] for item in three) == ["a", "b", "c"]  # one of each group first
    six = select_stratified(items, 6, key="group", seed=4)
    assert sorted(item["group"] for item in six) == ["a", "a", "b", "b", "c", "d"]  # groups take turns in order
    assert all(item in six for item in three)  # nested for one seed
    assert [items.index(item) for item in six] == sorted(items.index(item) for item in six)  # datalist order kept
    assert select_stratified(items, 3, key="group", seed=4) == three
    assert any(select_stratified(items, 3, key="group", seed=s) != three for s in range(5, 10))
    assert select_stratified(items, len(items), key="group") == items
    with pytest.raises(ValueError, match="count must be in"):
        select_stratified(items, 0, key="group")
    with pytest.raises(ValueError, match="no 'anatomy'"):
        select_stratified(items, 2, key="anatomy")
