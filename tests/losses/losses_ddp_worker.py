"""Worker of test_losses_distributed.py: the same computation on one process or on each rank of a gloo group.

Kept out of the test module so that ``torch.multiprocessing.spawn`` children can import it by name whatever pytest's
import mode (the test puts this folder on ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from custom_nets.engines import shutdown_distributed
from custom_nets.losses import DeepClusterV2Loss, JointLoss, SwAVLoss, sinkhorn_knopp
from custom_nets.losses.joint import host_process_group

NUM_IMAGES, NUM_SLICES, IN_DIM, DIM, PROTOTYPES = 6, 4, 10, 8, (5, 7)
DDP_MODELS: list[nn.Module] = []  # released before the process group is destroyed
UNEVEN_SPLIT = (3, 8)  # Sinkhorn items per rank: ranks may hold different numbers of items


class ToyClusteringHead(nn.Module):
    """Projection + prototype heads standing in for the network's 2D branch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.projection = nn.Linear(IN_DIM, DIM)
        self.prototypes = nn.ModuleList(nn.Linear(DIM, k, bias=False) for k in PROTOTYPES)

    def forward(self, views: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        projections = [F.normalize(self.projection(v), dim=1) for v in views]
        return projections, [[layer(p) for p in projections] for layer in self.prototypes]


def _rank_views(rank: int, world_size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Views 0/1: this rank's images then slices; view 2 (small crop): its images only. Items split by rank."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(NUM_IMAGES, IN_DIM, generator=generator)
    slices = torch.randn(NUM_SLICES, IN_DIM, generator=generator)
    noise = [0.3 * torch.randn(NUM_IMAGES + NUM_SLICES, IN_DIM, generator=generator) for _ in range(3)]
    image_part = slice(rank * NUM_IMAGES // world_size, (rank + 1) * NUM_IMAGES // world_size)
    slice_part = slice(rank * NUM_SLICES // world_size, (rank + 1) * NUM_SLICES // world_size)
    items = torch.cat([images[image_part], slices[slice_part]])
    ids = torch.cat([torch.arange(NUM_IMAGES)[image_part], NUM_IMAGES + torch.arange(NUM_SLICES)[slice_part]])
    image_noise = [n[:NUM_IMAGES][image_part] for n in noise]
    slice_noise = [n[NUM_IMAGES:][slice_part] for n in noise]
    views = [items + torch.cat([image_noise[v], slice_noise[v]]) for v in (0, 1)]
    views.append(images[image_part] + image_noise[2])
    return views, ids


def _gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    value = value.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def compute(rank: int, world_size: int) -> dict:
    """SwAV loss + gradients, DeepCluster-v2 centroids + loss + gradients, as seen by ``rank``."""
    views, ids = _rank_views(rank, world_size)
    distributed = dist.is_initialized()
    results: dict = {}

    scores = F.normalize(torch.randn(sum(UNEVEN_SPLIT), 6, generator=torch.Generator().manual_seed(2)), dim=1)
    scores = scores @ F.normalize(torch.randn(4, 6, generator=torch.Generator().manual_seed(3)), dim=1).t()
    if distributed:
        start = sum(UNEVEN_SPLIT[:rank])
        scores = scores[start : start + UNEVEN_SPLIT[rank]]
    results["sinkhorn_codes"] = sinkhorn_knopp(scores)

    head = ToyClusteringHead()
    model = DistributedDataParallel(head) if distributed else head
    DDP_MODELS.append(model)
    loss = SwAVLoss()(*model(views))
    loss.backward()
    results["swav_loss"] = _mean_over_ranks(loss)
    results["swav_grads"] = _gradients(head)

    head = ToyClusteringHead()
    model = DistributedDataParallel(head) if distributed else head
    DDP_MODELS.append(model)
    deepcluster = DeepClusterV2Loss(num_items=NUM_IMAGES + NUM_SLICES, embedding_dim=DIM, num_heads=len(PROTOTYPES))
    with torch.no_grad():
        deepcluster(*head(views), ids)  # fills the memory bank, as during an epoch
    results["centroids"] = deepcluster.update_clusters(head.prototypes, seed=3)
    results["assignments"] = deepcluster.assignments.clone()
    loss = deepcluster(*model(views), ids)
    loss.backward()
    results["deepcluster_loss"] = _mean_over_ranks(loss)
    results["deepcluster_grads"] = _gradients(head)

    if distributed:  # a batch mix that differs between ranks must fail clearly on every rank, not hang
        projections, scores = head(views)
        prediction = {"intra_projection": projections, "intra_scores": scores} if rank == 0 else {}
        try:
            JointLoss(intra=SwAVLoss())(prediction, {})
        except (RuntimeError, ValueError) as error:
            results["mismatch_error"] = str(error)
        with mock.patch("torch.distributed.get_backend", return_value="nccl"):  # as on GPUs: a gloo group of its own
            try:
                JointLoss(intra=SwAVLoss())(prediction, {})
            except (RuntimeError, ValueError) as error:
                results["mismatch_error_nccl"] = str(error)
            results["host_group_kept"] = host_process_group() is host_process_group() is not None
    return results


def run(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.save(compute(rank, world_size), Path(out_dir) / f"rank{rank}.pt")
    finally:
        shutdown_distributed(*DDP_MODELS)  # releases the DDP reducers first: no abort at exit
