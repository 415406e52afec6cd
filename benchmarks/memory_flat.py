"""Memory of a long pretraining run: resident set size (RSS) per epoch of ``pretrain_joint`` over a large datalist.

Issue 15, section 6: a pretraining run over a datalist of 10,000 small items must keep its memory flat, with no
growth per epoch from caches or handlers. The script generates ``--num_items`` items (half 16^3 CT NIfTI volumes,
half 32 x 32 radiograph PNGs, random content) with their datalist, runs ``pretrain_joint`` through
``monai.bundle.create_workflow`` in this process (CPU, a small network, the bundle's handlers, checkpoints and
TensorBoard as configured, ``cache none``, the start-up datalist check on), and reads this process's RSS
(``VmRSS`` of ``/proc/self/status``) when training starts, after the first iteration and after every epoch. It prints
the figures, the growth per epoch from epoch 2 on (epoch 1 includes one-off allocations: allocator pools, the
checkpoint and TensorBoard writers, the first batches) and writes them as JSON.

``--trace`` also follows Python's own allocations (``tracemalloc``, slower) and prints the source lines whose
allocations grew most from the end of epoch 2 to the end of the run: growth there is a Python-level cache or history;
RSS growth without it is native (the C allocator, PyTorch or the readers).

Example (the figure in docs/benchmarks.md)::

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/memory_flat.py --num_items 10000 --epochs 4 \
        --output /tmp/memory_flat
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Events
from monai.bundle import create_workflow
from PIL import Image

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "pretrain_joint"
SMALL = {
    "encoder_depth": 18,
    "embed_dim": 32,
    "projection_dim": 16,
    "image_size": 32,
    "volume_size": 16,
    "num_slices": 8,
    "small_crop_size": 16,
    "num_small_crops": 1,
    "intra_prototypes": [8],
    "inter_prototypes": [4],
    "freeze_prototypes_iterations": 0,
    "warmup_epochs": 0,
    "larc_trust": None,
    "amp": False,
    "pin_memory": False,
    "persistent_workers": False,
    "cache": "none",
    "rank_interval": 50,
}


def rss_mib() -> float:
    """Resident set size of this process in MiB (``VmRSS`` of ``/proc/self/status``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's machine type."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.machine()


def make_items(root: Path, num_items: int, seed: int = 0) -> Path:
    """``num_items`` items, alternately a 16^3 CT volume (NIfTI) and a 32 px radiograph (PNG); their datalist."""
    rng = np.random.default_rng(seed)
    (root / "volumes").mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for index in range(num_items):
        if index % 2 == 0:
            name = f"volumes/ct_{index:05d}.nii.gz"
            volume = rng.normal(0.0, 300.0, (16, 16, 16)).astype(np.float32)
            nib.save(nib.Nifti1Image(volume, np.eye(4)), root / name)
            items.append({"image": name, "modality": "CT", "kind": "volume"})
        else:
            name = f"images/xr_{index:05d}.png"
            Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(root / name)
            items.append({"image": name, "modality": "XR", "kind": "image"})
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps({"name": "memory_flat", "training": items}))
    return datalist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_items", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images_per_batch", type=int, default=64)
    parser.add_argument("--volumes_per_batch", type=int, default=64)
    parser.add_argument("--output", type=Path, default=Path("memory_flat"))
    parser.add_argument("--trace", action="store_true", help="report Python allocation growth (tracemalloc)")
    args = parser.parse_args()

    start = time.perf_counter()
    datalist = args.output / "data" / "datalist.json"
    if not datalist.is_file() or len(json.loads(datalist.read_text())["training"]) != args.num_items:
        datalist = make_items(args.output / "data", args.num_items)
    generated_s = time.perf_counter() - start

    workflow = create_workflow(
        config_file=str(BUNDLE / "configs" / "train.json"),
        workflow_type="train",
        bundle_root=str(BUNDLE),
        dataset_dir=str(datalist.parent),
        datalist=str(datalist),
        output_dir=str(args.output / "run"),
        device="cpu",
        epochs=args.epochs,
        images_per_batch=args.images_per_batch,
        volumes_per_batch=args.volumes_per_batch,
        num_workers=0,
        **SMALL,
    )
    started_s = time.perf_counter() - start
    marks: dict[str, float] = {}
    epoch_rss: list[float] = []
    epoch_s: list[float] = []
    trainer = workflow.trainer
    trainer.add_event_handler(Events.STARTED, lambda _: marks.update(started=rss_mib()))
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda _: marks.update(first_iteration=rss_mib()))
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda _: epoch_s.append(time.perf_counter()))
    snapshots: dict[int, tracemalloc.Snapshot] = {}
    traced_mib: list[float] = []

    def trace(engine) -> None:
        """Python's traced memory now; a snapshot (tracemalloc's own allocations left out) at epoch 2 and the last."""
        traced_mib.append(round(tracemalloc.get_traced_memory()[0] / 2**20, 2))
        if engine.state.epoch in (2, args.epochs):
            own = tracemalloc.Filter(False, tracemalloc.__file__)
            snapshots[engine.state.epoch] = tracemalloc.take_snapshot().filter_traces([own])

    if args.trace:
        tracemalloc.start(1)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, trace)
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED,
        lambda engine: (
            epoch_rss.append(rss_mib()),
            epoch_s.__setitem__(-1, time.perf_counter() - epoch_s[-1]),
            print(f"epoch {engine.state.epoch}: RSS {epoch_rss[-1]:.1f} MiB ({epoch_s[-1]:.0f} s)", flush=True),
        ),
    )
    workflow.run()
    workflow.finalize()

    growth = np.diff(epoch_rss[1:]) if len(epoch_rss) > 2 else np.array([])
    result = {
        "num_items": args.num_items,
        "epochs": args.epochs,
        "iterations_per_epoch": len(workflow.parser.get_parsed_content("train#dataloader")),
        "images_per_batch": args.images_per_batch,
        "volumes_per_batch": args.volumes_per_batch,
        "rss_at_start_mib": round(marks["started"], 1),
        "rss_after_first_iteration_mib": round(marks["first_iteration"], 1),
        "rss_after_epoch_mib": [round(v, 1) for v in epoch_rss],
        "growth_per_epoch_from_epoch_2_mib": [round(float(v), 1) for v in growth],
        "mean_growth_per_epoch_from_epoch_2_mib": round(float(growth.mean()), 2) if growth.size else None,
        "seconds": {"generate": round(generated_s, 1), "build": round(started_s - generated_s, 1)},
        "seconds_per_epoch": [round(v, 1) for v in epoch_s],
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), 1-minute load average {os.getloadavg()[0]:.1f} at the end",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if args.trace and len(snapshots) == 2:
        growth_sites = snapshots[args.epochs].compare_to(snapshots[2], "lineno")[:10]
        result["python_allocation_growth_from_epoch_2"] = [str(stat) for stat in growth_sites]
        result["python_traced_mib_after_epoch"] = traced_mib
    (args.output / "memory_flat.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
