"""Data-parallel scaling of the joint pretraining step: throughput with 1 and 2 processes (torch.distributed, DDP).

Issue 11, goal 4. Each process runs the joint step of ``pretrain_step.py`` (network, SwAV losses with the distributed
Sinkhorn, masked-slice loss, SGD) on its own synthetic batch of the same shape (weak scaling, as the bundles'
``multi_gpu_train.json`` runs: the per-process batch stays, the global batch grows), wrapped in
``DistributedDataParallel`` over gloo (CPU) or NCCL (CUDA, one GPU per process). Reported: median seconds per step
over ``--repeats`` steps after ``--warmup``, 2D inputs (crops + slices) per second over all processes, and the ratio
of the 2-process throughput to the 1-process throughput (2.0 = perfect scaling). On CPU the cores are shared out:
each process gets ``cores / processes`` torch threads, so on a machine with few cores the ratio shows the cost of
the gradient all-reduce and of the collectives in the losses more than any gain.

Example (the figure in docs/benchmarks.md)::

    .venv/bin/python benchmarks/ddp_scaling.py --device cpu
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pretrain_step import StepShape, build_training, synthetic_batch, synthetic_item_ids, training_step
from torch.nn.parallel import DistributedDataParallel


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker(rank: int, world_size: int, port: int, args: argparse.Namespace, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world_size))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    shape = StepShape(depth=args.depth, volumes_per_batch=args.volumes_per_batch, images_per_batch=args.images)
    training = build_training(shape, synthetic_item_ids(shape), device, seed=0)
    training.network = DistributedDataParallel(training.network, device_ids=[rank] if device.type == "cuda" else None)
    batch = synthetic_batch(shape, seed=rank)
    times = []
    for step in range(args.warmup + args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        start = time.perf_counter()
        training_step(training, batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    if rank == 0:
        inputs = shape.images_per_batch * (2 + shape.num_small_crops) + 2 * shape.volumes_per_batch * shape.num_slices
        results[world_size] = (statistics.median(times), inputs * world_size, torch.get_num_threads())
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--depth", type=int, default=18, help="ResNet depth (default: 18, the cpu_demo preset)")
    parser.add_argument("--images", type=int, default=8, help="2D images per process and batch (default: 8)")
    parser.add_argument("--volumes-per-batch", type=int, default=2, help="volumes per process and batch (default: 2)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        parser.error("--device cuda needs 2 GPUs")
    results = mp.Manager().dict()
    for world_size in (1, 2):
        mp.spawn(worker, args=(world_size, free_port(), args, results), nprocs=world_size, join=True)
    print(
        f"torch {torch.__version__}, {args.device}, {len(os.sched_getaffinity(0))} cores available, ResNet-{args.depth}"
    )
    print("| processes | torch threads per process | s per step | 2D inputs per s (all processes) | throughput ratio |")
    print("|---:|---:|---:|---:|---:|")
    single = results[1][1] / results[1][0]
    for world_size in (1, 2):
        seconds, inputs, threads = results[world_size]
        throughput = inputs / seconds
        print(f"| {world_size} | {threads} | {seconds:.3f} | {throughput:.1f} | {throughput / single:.2f} |")


if __name__ == "__main__":
    main()
