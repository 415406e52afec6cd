"""LUNA16 adapter: world <-> voxel conversion against ITK and MONAI's reader, cube cutting, preparation and its
errors, on generated MetaImage scans with a rotated direction matrix and anisotropic spacing."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from custom_nets.datasets import luna16


def test_world_voxel_round_trip_matches_itk(tmp_path, luna_data):
    import gc

    import itk

    values = np.arange(np.prod(luna_data.SIZE), dtype=np.int16).reshape(luna_data.SIZE[::-1])
    path = luna_data.write_scan(tmp_path / "subset0" / "scan.mhd", values)
    array, geometry = luna16.read_scan(path)
    gc.collect()
    np.testing.assert_array_equal(array, values)  # the array owns its memory (no view of a freed ITK image)
    assert array.shape == luna_data.SIZE[::-1] and geometry.size == luna_data.SIZE
    np.testing.assert_allclose(geometry.direction, luna_data.DIRECTION)
    indices = np.array([[0.0, 0.0, 0.0], [3.25, 17.5, 9.0], [27.0, 23.0, 11.0]])
    world = luna16.voxel_to_world(indices, geometry)
    np.testing.assert_allclose(luna16.world_to_voxel(world, geometry), indices, atol=1e-9)
    image = itk.imread(str(path))
    for index, point in zip(indices, world, strict=True):
        continuous = itk.ContinuousIndex[itk.D, 3]()
        for axis, value in enumerate(index):
            continuous.SetElement(axis, float(value))
        np.testing.assert_allclose(point, list(image.TransformContinuousIndexToPhysicalPoint(continuous)), atol=1e-9)
    # hand-computed: x runs along -j, y along +i (DIRECTION), scaled by the spacing, from the origin
    np.testing.assert_allclose(world[1], [40.0 - 17.5 * 1.5, -30.0 + 3.25 * 1.2, -100.0 + 9.0 * 2.5])


def test_monai_itk_reader_affine_is_ras_of_the_same_points(tmp_path, luna_data):
    """MONAI's ITKReader gives a RAS affine: the LPS points of this module with x and y negated."""
    from monai.transforms import LoadImage

    path = luna_data.write_scan(tmp_path / "subset0" / "scan.mhd", np.zeros(luna_data.SIZE[::-1], np.int16))
    image = LoadImage(reader="ITKReader", image_only=True)(str(path))
    _, geometry = luna16.read_scan(path)
    index = np.array([3.0, 17.0, 9.0])
    ras = (np.asarray(image.affine) @ np.append(index, 1.0))[:3]
    np.testing.assert_allclose(ras * [-1, -1, 1], luna16.voxel_to_world(index, geometry), atol=1e-6)


def test_candidate_cube_centres_the_planted_nodule(tmp_path, luna_data):
    rng = np.random.default_rng(0)
    nodule = (10, 14, 6)
    path = luna_data.write_scan(tmp_path / "scan.mhd", luna_data.planted_scan([nodule], rng))
    array, geometry = luna16.read_scan(path)
    world = luna_data.index_to_world(nodule)
    cube = luna16.candidate_cube(array, geometry, world, cube_size=(5, 9, 9), spacing_mm=(2.5, 1.0, 1.0))
    assert cube.shape == (5, 9, 9) and cube.dtype == np.float32
    assert cube[2, 4, 4] == pytest.approx(40.0)  # the centre voxel is on the grid: exact
    assert cube[0, 0, 0] < -600  # 4 mm + off the centre diagonally: lung
    far = luna16.candidate_cube(array, geometry, luna16.voxel_to_world(np.zeros(3), geometry), (4, 4, 4), (5, 5, 5))
    assert far[0, 0, 0] == luna16.AIR_HU  # outside the scan reads air


def test_prepare_writes_folds_and_cuts_each_cube_once(tmp_path, luna_data):
    raw = luna_data.make_luna_folder(tmp_path / "raw", num_scans=3)
    out = tmp_path / "prepared"
    datalist = luna16.prepare(str(raw.root), str(out), cube_size=(4, 8, 8), spacing_mm=(2.0, 1.0, 1.0))
    content = json.loads(open(datalist).read())
    assert content["cube_size"] == [4, 8, 8] and sorted(content["scans"]) == raw.uids
    assert [len(content[f"subset{s}"]) for s in range(10)] == [5, 5, 5, 0, 0, 0, 0, 0, 0, 0]
    first = content["subset0"][0]
    assert first["label"] == 1 and first["seriesuid"] == raw.uids[0] and first["candidate"] == 0
    cube = np.load(out / first["image"])
    assert cube.shape == (4, 8, 8) and cube.dtype == np.int16
    items = luna16.load_folds(datalist, [1, 2], out)
    assert len(items) == 10 and all(item["image"].startswith(str(out)) for item in items)
    assert luna16.scan_ids(datalist, [0, 2]) == [raw.uids[0], raw.uids[2]]
    assert luna16.annotation_file(datalist, "annotations_excluded") == str(raw.root / "annotations_excluded.csv")
    luna16.check_prepared(datalist, [4, 8, 8], [2.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"holds cubes of size \[4, 8, 8\] at \[2.0, 1.0, 1.0\] mm"):
        luna16.check_prepared(datalist, [32, 64, 64], [1.0, 1.0, 1.0])
    stamp = (out / first["image"]).stat().st_mtime_ns
    luna16.prepare(str(raw.root), str(out), cube_size=(4, 8, 8), spacing_mm=(2.0, 1.0, 1.0))
    assert (out / first["image"]).stat().st_mtime_ns == stamp  # reused, not cut again
    with pytest.raises(ValueError, match="holds cubes of"):  # never reuse cubes of another geometry
        luna16.prepare(str(raw.root), str(out), cube_size=(4, 8, 8), spacing_mm=(1.0, 1.0, 1.0))


def test_prepare_subsamples_negatives_and_subsets(tmp_path, luna_data):
    raw = luna_data.make_luna_folder(tmp_path / "raw", num_scans=2)
    datalist = luna16.prepare(str(raw.root), str(tmp_path / "out"), cube_size=(2, 4, 4), subsets=[1],
                              allow_missing_scans=True, max_negatives_per_scan=1)  # fmt: skip
    content = json.loads(open(datalist).read())
    assert list(content["scans"]) == [raw.uids[1]] and content["subset0"] == []
    assert [e["label"] for e in content["subset1"]] == [1, 1, 0]


def _append_candidate(root, row) -> None:
    with open(root / "candidates_V2.csv", "a", newline="") as handle:
        csv.writer(handle).writerow(row)


def test_prepare_errors_name_the_file(tmp_path, luna_data):
    raw = luna_data.make_luna_folder(tmp_path / "raw", num_scans=2)
    _append_candidate(raw.root, ["1.2.3.no.such.scan", 0.0, 0.0, 0.0, 0])
    with pytest.raises(FileNotFoundError, match=r"candidates_V2.csv: seriesuid 1.2.3.no.such.scan \(row 10\)"):
        luna16.prepare(str(raw.root), str(tmp_path / "out"), cube_size=(2, 4, 4))

    raw = luna_data.make_luna_folder(tmp_path / "raw2", num_scans=2)
    _append_candidate(raw.root, [raw.uids[1], 500.0, 0.0, 0.0, 0])
    with pytest.raises(ValueError, match=rf"candidate row 10 of .*candidates_V2.csv.*{raw.uids[1]}.mhd lies outside"):
        luna16.prepare(str(raw.root), str(tmp_path / "out2"), cube_size=(2, 4, 4))

    raw = luna_data.make_luna_folder(tmp_path / "raw3", num_scans=2)
    broken = raw.root / "subset1" / f"{raw.uids[1]}.raw"
    broken.write_bytes(broken.read_bytes()[:100])
    with pytest.raises(RuntimeError, match=rf"could not read the scan .*{raw.uids[1]}.mhd"):
        luna16.prepare(str(raw.root), str(tmp_path / "out3"), cube_size=(2, 4, 4))


def test_scan_candidates_cuts_like_prepare(tmp_path, luna_data):
    raw = luna_data.make_luna_folder(tmp_path / "raw", num_scans=2)
    out = tmp_path / "out"
    datalist = luna16.prepare(str(raw.root), str(out), cube_size=(4, 8, 8), spacing_mm=(2.0, 1.0, 1.0))
    items = luna16.scan_candidates(raw.root / "subset1" / f"{raw.uids[1]}.mhd", raw.root / "candidates_V2.csv",
                                   cube_size=(4, 8, 8), spacing_mm=(2.0, 1.0, 1.0))  # fmt: skip
    prepared = json.loads(open(datalist).read())["subset1"]
    assert [i["candidate"] for i in items] == [e["candidate"] for e in prepared]
    for item, entry in zip(items, prepared, strict=True):
        assert item["image"].shape == (1, 4, 8, 8)
        np.testing.assert_allclose(item["image"][0], np.load(out / entry["image"]), atol=0.5)


def test_label_fraction_keeps_both_classes_and_is_nested():
    items = [{"label": int(i % 10 == 0), "i": i} for i in range(40)]  # 4 nodules, 36 non-nodules
    tenth = luna16.select_fraction_per_class(items, 0.1, seed=1)
    half = luna16.select_fraction_per_class(items, 0.5, seed=1)
    assert sorted(i["label"] for i in tenth) == [0, 0, 0, 0, 1]  # ceil(3.6) + ceil(0.4)
    assert {i["i"] for i in tenth} <= {i["i"] for i in half}
    weights = luna16.class_balanced_weights(half)
    assert sum(w for w, i in zip(weights, half, strict=True) if i["label"]) == pytest.approx(1.0)
    assert sum(w for w, i in zip(weights, half, strict=True) if not i["label"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="only class"):
        luna16.class_balanced_weights([{"label": 0}])


def test_dicom_series_reads_like_the_mhd_scan(tmp_path, luna_data):
    """A DICOM series folder (seriesuid from its header) gives the same HU, geometry and cubes as the .mhd scan."""
    uid = "1.2.826.0.1.3680043.8.498.777"
    array = luna_data.planted_scan([(10, 12, 6)], np.random.default_rng(0))
    axial = (luna_data.SPACING, luna_data.ORIGIN)  # DICOM axial slices: identity direction
    mhd = luna_data.write_scan(tmp_path / "mhd" / f"{uid}.mhd", array, *axial, direction=np.eye(3))
    root = tmp_path / "raw"
    dicom = luna_data.write_dicom_series(root / "subset0" / "series", array, uid, *axial)
    assert luna16.scan_seriesuid(dicom) == uid and luna16.scan_seriesuid(mhd) == uid
    dicom_array, dicom_geometry = luna16.read_scan(dicom)
    np.testing.assert_array_equal(dicom_array, array)
    np.testing.assert_allclose(dicom_geometry.spacing, luna_data.SPACING)
    np.testing.assert_allclose(dicom_geometry.origin, luna_data.ORIGIN)
    np.testing.assert_allclose(dicom_geometry.direction, np.eye(3))
    header = "seriesuid,coordX,coordY,coordZ"
    points = [np.asarray(luna_data.ORIGIN) + np.asarray(i) * luna_data.SPACING for i in ((10, 12, 6), (3, 20, 2))]
    rows = [f"{uid},{x},{y},{z}" for x, y, z in points]
    (root / "candidates_V2.csv").write_text("\n".join([f"{header},class", f"{rows[0]},1", f"{rows[1]},0"]) + "\n")
    (root / "annotations.csv").write_text(f"{header},diameter_mm\n{rows[0]},8.0\n")
    from_mhd = luna16.scan_candidates(mhd, root / "candidates_V2.csv", (4, 8, 8))
    from_dicom = luna16.scan_candidates(dicom, root / "candidates_V2.csv", (4, 8, 8))
    assert len(from_dicom) == 2 and from_dicom[0]["seriesuid"] == uid
    for a, b in zip(from_mhd, from_dicom, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    datalist = luna16.prepare(str(root), str(tmp_path / "out"), cube_size=(2, 4, 4))
    content = json.loads(open(datalist).read())
    assert content["scans"][uid]["image"].endswith("subset0/series") and len(content["subset0"]) == 2


def test_the_cube_check_reads_headers_only_yet_finds_bad_cubes_and_duplicates_through_links(tmp_path):
    """The training check takes a cube's shape and type from its ``.npy`` header, resolves each folder once, and still
    finds a truncated file, a wrong shape, NaN in a float cube (read for that), and one cube listed under four paths
    (a ``..`` path, a linked folder, a linked file); a format 2.0 header reads like 1.0."""
    cubes = tmp_path / "cubes"
    cubes.mkdir()
    good = np.full((4, 6, 6), -800, np.int16)
    np.save(cubes / "a.npy", good)
    with open(cubes / "v2.npy", "wb") as handle:
        np.lib.format.write_array(handle, good, version=(2, 0))
    nan = good.astype(np.float32)
    nan[1, 2, 3] = np.nan
    np.save(cubes / "nan.npy", nan)
    np.save(cubes / "shape.npy", good[:2])
    (cubes / "cut.npy").write_bytes((cubes / "a.npy").read_bytes()[:-10])
    (tmp_path / "alias").symlink_to(cubes, target_is_directory=True)
    (tmp_path / "link.npy").symlink_to(cubes / "a.npy")
    images = ["a.npy", "v2.npy", "nan.npy", "shape.npy", "cut.npy", "../cubes/a.npy"]
    images = [f"cubes/{name}" for name in images] + ["alias/a.npy", "link.npy"]
    entries = [{"image": image, "label": 0, "seriesuid": "1.2.3"} for image in images]
    content = {"cube_size": [4, 6, 6], "scans": {"1.2.3": {"image": "absent.mhd"}}, "subset0": entries}
    files, problems, count = luna16.candidate_datalist_problems(content, ["subset0"], tmp_path)
    assert count == 8
    assert [file for file, _, _ in files] == [str((tmp_path / image).resolve()) for image in images]
    assert [file for file, _, _ in files].count(str(cubes / "a.npy")) == 4
    lines = [line for line, _ in problems]
    refresh = "delete it and run prepare_luna16 again (it cuts the missing cubes anew)"
    assert lines == [
        f"[subset0] {tmp_path / 'cubes/nan.npy'}: NaN or infinite values in the cube; {refresh}",
        f"[subset0] {tmp_path / 'cubes/shape.npy'}: cube of shape (2, 6, 6), the datalist's cube_size is (4, 6, 6) "
        f"(slices, rows, columns); {refresh}",
        f"[subset0] {tmp_path / 'cubes/cut.npy'}: not a readable .npy cube (ValueError: truncated: 278 bytes of "
        f"values, its header announces 288); {refresh}",
    ]
