"""shutdown_distributed: a gloo run with DistributedDataParallel ends with exit status 0 on every rank.

Without it, the DDP reducer outlives the process group and aborts the process at interpreter exit in about one run of
five on this machine kind (9 of 40 two-process runs, 2026-11-29; see custom_nets.engines.distributed).
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))  # spawned processes import the worker function from this module


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from custom_nets.engines import shutdown_distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = DistributedDataParallel(torch.nn.Linear(4, 2))
    model(torch.randn(3, 4)).sum().backward()
    kept = [model]  # as a bundle's config parser and trainer keep the network to the end of the process
    shutdown_distributed(*kept)
    state = {"initialized": dist.is_initialized(), "reducer": hasattr(model, "reducer")}
    usable = model.module(torch.ones(1, 4)).shape == (1, 2)
    Path(out_dir, f"rank{rank}.txt").write_text(f"{state['initialized']} {state['reducer']} {usable}")


def test_ddp_run_ends_cleanly_on_every_rank(tmp_path) -> None:
    for attempt in range(3):  # each spawn fails the test if a process exits with a signal
        out_dir = tmp_path / str(attempt)
        out_dir.mkdir()
        mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=2, join=True)
        for rank in range(2):
            assert (out_dir / f"rank{rank}.txt").read_text() == "False False True"


def test_nothing_to_do_without_a_process_group() -> None:
    from custom_nets.engines import shutdown_distributed

    shutdown_distributed()  # a single-process run: returns quietly
