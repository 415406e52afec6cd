"""Worker of test_engines_distributed.py: one DDP step on gloo, then shutdown_distributed (imported by plain name, as
spawned processes re-import it; the test puts this folder on ``sys.path``)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from custom_nets.engines import shutdown_distributed


def run(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = DistributedDataParallel(torch.nn.Linear(4, 2))
    model(torch.randn(3, 4)).sum().backward()
    kept = [model]  # as a bundle's config parser and trainer keep the network to the end of the process
    shutdown_distributed(*kept)
    usable = model.module(torch.ones(1, 4)).shape == (1, 2)
    Path(out_dir, f"rank{rank}.txt").write_text(f"{dist.is_initialized()} {hasattr(model, 'reducer')} {usable}")
