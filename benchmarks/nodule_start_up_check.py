"""Time of finetune_nodule's start-up checks at LUNA16 scale (issue 15): the training check over the whole datalist,
and the inference check of one scan.

**Training** (``train.json``, ``validate_data: true``): ``custom_nets.data.usable_datalist`` of the folds
``train_subsets + val_subsets`` (subsets 0-8 by default) against the bundle's ``data_expectations``. For every
candidate it reads the cube's ``.npy`` header (``numpy.lib.format``), checks its shape, label and seriesuid and
that no cube is listed twice; for every scan it reads the header (ITK ImageIO), checks its geometry and that each of
its candidates lies inside it. LUNA16 has 888 scans and 754,975 candidates (``candidates_V2.csv``), one cube each
after ``prepare_luna16``.

Generated here, in prepare_luna16's layout under ``--output``: ``--num_scans`` MetaImage headers in
``subset0`` ... ``subset9`` (512 x 512 pixels of 0.5 - 0.98 mm, 100 - 400 slices of 0.625 - 2.5 mm: LUNA16's
ranges; the ``.raw`` files are not written, the check reads headers only), ``--num_candidates`` candidates spread
evenly over the scans, inside them, each its own cube file, and the datalist. The cubes are ``--cube_size`` int16
(default 2 x 2 x 2, so that 754,975 files fit in about 3 GB: one file-system block each): the check reads a
cube's header without its voxels, so a real 32 x 64 x 64 int16 cube costs the same open + header read. The files
were just written, so they are in the page cache: this is the warm figure (a cold cache adds the disk's latency per
file).
Wall and CPU time are both printed: on a shared machine the wall time also counts the waits for a core.

The check is timed on the datalists of the first 1 %, 10 % and 100 % of the scans (``--fractions``) with their
candidates, to show how it scales. ``--profile`` prints the functions that took the most time in the full run.

**Inference** (``inference.json``, ``--inference``): one scan of 512 x 512 x ``--slices`` int16 voxels and
``--scan_candidates`` candidates (LUNA16 has 850 per scan on average) in a candidates CSV; times
``luna16.checked_scan_candidates`` (the start-up check: reads the scan, checks it and every candidate) and
``luna16.scan_candidates`` (reads the scan again and cuts the bundle's 32 x 64 x 64 cubes at 1 mm), so the cost of
the check's read of the scan stands beside the work inference does anyway.

Example (the figures in docs/benchmarks.md)::

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/nodule_start_up_check.py --output /tmp/nodule_check --profile \
        --inference
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import io
import json
import platform
import pstats
import time
from pathlib import Path

import numpy as np

from custom_nets.data.datalist import usable_datalist
from custom_nets.data.validate_data import bundle_expectations
from custom_nets.datasets import luna16

LUNA16_SCANS = 888
LUNA16_CANDIDATES = 754_975

MHD_HEADER = """ObjectType = Image
NDims = 3
BinaryData = True
BinaryDataByteOrderMSB = False
CompressedData = False
TransformMatrix = 1 0 0 0 1 0 0 0 1
Offset = {origin}
CenterOfRotation = 0 0 0
AnatomicalOrientation = RAI
ElementSpacing = {spacing}
DimSize = {size}
ElementType = MET_SHORT
ElementDataFile = {raw}
"""


def _cube_bytes(cube_size: list[int]) -> bytes:
    """The ``.npy`` file of one int16 cube (the same bytes serve every candidate: files are told apart by path)."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(cube_size, dtype=np.int16))
    return buffer.getvalue()


def generate(output: Path, num_scans: int, num_candidates: int, cube_size: list[int], seed: int = 0) -> dict:
    """Write the scans' headers, the cubes and the datalist content (returned, not written) under ``output``."""
    rng = np.random.default_rng(seed)
    blob = _cube_bytes(cube_size)
    per_scan = np.full(num_scans, num_candidates // num_scans)
    per_scan[: num_candidates % num_scans] += 1
    content: dict = {
        "name": "LUNA16 (generated)",
        "cube_size": cube_size,
        "spacing_mm": [1.0, 1.0, 1.0],
        "scans": {},
        **{f"subset{s}": [] for s in range(10)},
    }
    for scan in range(num_scans):
        uid = f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{100000 + scan}"
        subset = scan % 10
        size = np.array([512, 512, int(rng.integers(100, 401))])
        spacing = np.array([*(2 * [float(rng.uniform(0.5, 0.98))]), float(rng.choice([0.625, 1.25, 2.5]))])
        origin = -size * spacing / 2.0
        header = output / f"subset{subset}" / f"{uid}.mhd"
        header.parent.mkdir(parents=True, exist_ok=True)
        text = MHD_HEADER.format(
            origin=" ".join(f"{v:g}" for v in origin),
            spacing=" ".join(f"{v:g}" for v in spacing),
            size=" ".join(str(v) for v in size),
            raw=f"{uid}.raw",
        )
        header.write_text(text)
        content["scans"][uid] = {"image": str(header.relative_to(output)), "subset": subset}
        folder = output / "cubes" / uid
        folder.mkdir(parents=True, exist_ok=True)
        worlds = origin + rng.uniform(0.05, 0.95, size=(per_scan[scan], 3)) * (size - 1) * spacing
        for row, world in enumerate(worlds):
            (folder / f"{row}.npy").write_bytes(blob)
            content[f"subset{subset}"].append(
                {
                    "image": f"cubes/{uid}/{row}.npy",
                    "label": int(row == 0),
                    "seriesuid": uid,
                    "coordX": float(world[0]),
                    "coordY": float(world[1]),
                    "coordZ": float(world[2]),
                    "candidate": row,
                    "subset": subset,
                }
            )
    return content


def _first_scans(content: dict, fraction: float) -> dict:
    """The datalist restricted to the first ``fraction`` of the scans (at least one per subset) and their candidates."""
    uids = list(content["scans"])
    kept = set(uids[: max(10, round(fraction * len(uids)))])
    folds = {f"subset{s}": [c for c in content[f"subset{s}"] if c["seriesuid"] in kept] for s in range(10)}
    scans = {uid: scan for uid, scan in content["scans"].items() if uid in kept}
    return {**content, "scans": scans, **folds}


def time_training_check(output: Path, content: dict, fraction: float, profile: bool = False) -> dict:
    """Write the datalist of ``fraction`` of the scans and time train.json's start-up check on it (``profile``: under
    cProfile, which slows it, and print the costliest functions)."""
    part = _first_scans(content, fraction)
    datalist = output / f"datalist_{fraction:g}.json"
    datalist.write_text(json.dumps(part, indent=1))
    keys = luna16.fold_keys(range(8), [8])  # train.json's train_subsets + val_subsets
    expectations = bundle_expectations("finetune_nodule")
    profiler = cProfile.Profile() if profile else None
    start, cpu = time.perf_counter(), time.process_time()
    if profiler is not None:
        profiler.enable()
    usable_datalist(datalist, output, output / "run", keys=keys, expectations=expectations)
    if profiler is not None:
        profiler.disable()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    checked = sum(len(part[key]) for key in keys)
    scans = sum(1 for scan in part["scans"].values() if scan["subset"] in range(9))
    result = {"fraction": fraction, "scans": scans, "candidates": checked}
    result |= {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2)}
    result["us_per_candidate"] = round(1e6 * seconds / checked, 1)
    if profiler is None:
        print(
            f"  {scans:4d} scans, {checked:7d} candidates: {seconds:7.1f} s wall, {cpu:7.1f} s CPU "
            f"({result['us_per_candidate']} us of wall time per candidate)"
        )
    else:
        print(f"  profile of the check of {scans} scans, {checked} candidates ({seconds:.1f} s under cProfile):")
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(20)
        print(text.getvalue())
    return result


def time_inference_check(output: Path, slices: int, num_candidates: int, seed: int = 0) -> dict:
    """One LUNA16-sized scan and its candidates: the inference check, then reading the scan and cutting the cubes."""
    import itk

    rng = np.random.default_rng(seed)
    array = rng.integers(-1024, 400, size=(slices, 512, 512), dtype=np.int16)
    image = itk.image_from_array(array)
    image.SetSpacing([0.7, 0.7, 1.25])
    image.SetOrigin([-179.2, -179.2, -0.625 * slices])
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.999999"
    scan = output / "inference" / f"{uid}.mhd"
    scan.parent.mkdir(parents=True, exist_ok=True)
    itk.imwrite(image, str(scan))
    extent = np.array([512 * 0.7, 512 * 0.7, slices * 1.25])
    origin = np.array([-179.2, -179.2, -0.625 * slices])
    table = scan.parent / "candidates.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["seriesuid", "coordX", "coordY", "coordZ", "class"])
        for world in origin + rng.uniform(0.1, 0.9, size=(num_candidates, 3)) * extent:
            writer.writerow([uid, *world.round(2), 0])
    expectations = bundle_expectations("finetune_nodule")
    start = time.process_time()
    rows = luna16.checked_scan_candidates(scan, table, expectations)
    checked = time.process_time() - start
    start = time.process_time()
    luna16.scan_candidates(scan, rows, (32, 64, 64), (1.0, 1.0, 1.0))
    cut = time.process_time() - start
    result = {"slices": slices, "candidates": num_candidates, "check_cpu_s": round(checked, 2)}
    result["cubes_cpu_s"] = round(cut, 2)
    print(
        f"  inference, one scan of 512 x 512 x {slices} voxels, {num_candidates} candidates (CPU time): start-up "
        f"check {checked:.2f} s, then reading the scan and cutting the cubes {cut:.2f} s"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="an empty folder for the generated data")
    parser.add_argument("--num_scans", type=int, default=LUNA16_SCANS)
    parser.add_argument("--num_candidates", type=int, default=LUNA16_CANDIDATES)
    parser.add_argument("--cube_size", type=int, nargs=3, default=[2, 2, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--profile", action="store_true", help="profile the check of 10 %% of the scans once more")
    parser.add_argument("--inference", action="store_true", help="also time the inference check of one scan")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--scan_candidates", type=int, default=850)
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    if any(args.output.iterdir()):
        raise SystemExit(f"{args.output} is not empty: give an empty folder (the benchmark writes many files there)")
    start = time.perf_counter()
    content = generate(args.output, args.num_scans, args.num_candidates, args.cube_size)
    print(f"generated {args.num_scans} scan headers, {args.num_candidates} cubes: {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    luna16.scan_geometry(args.output / next(iter(content["scans"].values()))["image"])
    print(f"one-off: loading ITK's readers {time.perf_counter() - start:.1f} s (paid by the first scan header)")
    print("training start-up check (train.json: folds 0-8, finetune_nodule's data_expectations):")
    training = [time_training_check(args.output, content, fraction) for fraction in args.fractions]
    results = {"machine": platform.platform(), "training": training}
    if args.profile:
        time_training_check(args.output, content, 0.1, profile=True)
    if args.inference:
        results["inference"] = time_inference_check(args.output, args.slices, args.scan_candidates)
    (args.output / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results in {args.output / 'results.json'}")


if __name__ == "__main__":
    main()
