"""shutdown_distributed: a gloo run with DistributedDataParallel ends with exit status 0 on every rank.

Without it, the DDP reducer outlives the process group and aborts the process at interpreter exit in about one run of
five on this machine kind (9 of 40 two-process runs, 2026-11-29; see custom_nets.engines.distributed).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch.multiprocessing as mp

from custom_nets.engines import shutdown_distributed


def test_ddp_run_ends_cleanly_on_every_rank(tmp_path, monkeypatch, bundle_checks) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    worker = importlib.import_module("ddp_shutdown_worker")
    for attempt in range(3):  # each spawn fails the test if a process exits with a signal or an error
        out_dir = tmp_path / str(attempt)
        out_dir.mkdir()
        mp.spawn(worker.run, args=(bundle_checks.free_port(), str(out_dir)), nprocs=2, join=True)
        for rank in range(2):
            assert (out_dir / f"rank{rank}.txt").read_text() == "False False True"


def test_nothing_to_do_without_a_process_group() -> None:
    shutdown_distributed()  # a single-process run: returns quietly
