"""DeepCluster-v2: spherical k-means on a memory bank keyed by GLOBAL item id, and the cross-entropy to its clusters."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from custom_nets.losses.clustering import ClusteringLoss, check_clustering_inputs, prototype_layers

__all__ = ["DeepClusterV2Loss", "spherical_kmeans"]

logger = logging.getLogger(__name__)

KMEANS_INITS = ("k-means++", "random")


def _distributed_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device(default: torch.device) -> torch.device:
    """NCCL reduces CUDA tensors only: use this rank's GPU there, else keep ``default``."""
    if _distributed_active() and dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return default


def _nearest_centroid(embeddings: torch.Tensor, centroids: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Index of the most similar centroid for every row, computed in chunks to bound the ``(N, K)`` memory."""
    return torch.cat(
        [(chunk @ centroids.t()).argmax(dim=1) for chunk in embeddings.split(chunk_size)]
        if embeddings.shape[0] > 0
        else [embeddings.new_zeros(0, dtype=torch.long)]
    )


def _kmeans_plus_plus(embeddings: torch.Tensor, num_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding for cosine distance: each next seed is drawn with probability proportional to ``d^2``."""
    num_items = embeddings.shape[0]
    first = int(torch.randint(num_items, (1,), generator=generator))
    chosen = [first]
    distance = (1.0 - embeddings @ embeddings[first]).clamp_min(0.0)
    for _ in range(1, num_clusters):
        weights = (distance.double() ** 2).cumsum(0)
        if weights[-1] <= 0:  # every item coincides with a seed: fall back to uniform draws
            weights = torch.arange(1, num_items + 1, dtype=torch.float64, device=embeddings.device)
        threshold = float(torch.rand(1, generator=generator, dtype=torch.float64)) * float(weights[-1])
        pick = int(torch.searchsorted(weights, weights.new_tensor([threshold]), right=True).clamp_max(num_items - 1))
        chosen.append(pick)
        distance = torch.minimum(distance, (1.0 - embeddings @ embeddings[pick]).clamp_min(0.0))
    return torch.tensor(chosen, device=embeddings.device)


def spherical_kmeans(
    embeddings: torch.Tensor,
    num_clusters: int,
    iterations: int = 10,
    seed: int = 0,
    init: str = "k-means++",
    chunk_size: int = 16384,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means (cosine similarity, unit-norm centroids) as in DeepCluster-v2 (Caron et al. 2020).

    ``iterations`` rounds of (assign every item to its most similar centroid, replace every non-empty cluster's
    centroid by the normalised mean of its members; an empty cluster keeps its centroid), then a final assignment, so
    the returned assignments belong to the returned centroids. Deterministic for a given ``seed``.

    Args:
        embeddings: ``(N, P)`` items (normalised inside).
        num_clusters: ``K <= N``.
        iterations: update rounds (10 in DeepCluster-v2).
        seed: seed of the initialisation.
        init: ``"k-means++"`` (default; rarely merges well-separated clusters, at the price of ``K`` passes over the
            items: about as long as the 10 update rounds on a CPU, negligible on a GPU) or ``"random"`` (``K``
            distinct items drawn uniformly, as the public DeepCluster-v2 code does).
        chunk_size: rows per similarity block, bounding memory to ``chunk_size x K``.

    Returns:
        ``(K, P)`` unit-norm centroids and ``(N,)`` long assignments.
    """
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (items, dim), got shape {tuple(embeddings.shape)}.")
    num_items = embeddings.shape[0]
    if not 0 < num_clusters <= num_items:
        raise ValueError(
            f"k-means needs 1 <= num_clusters <= number of items, got {num_clusters} clusters for {num_items} items: "
            "use fewer prototypes or more data."
        )
    if init not in KMEANS_INITS:
        raise ValueError(f"init must be one of {KMEANS_INITS}, got {init!r}.")
    embeddings = F.normalize(embeddings.float(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    if init == "random":
        seeds = torch.randperm(num_items, generator=generator)[:num_clusters].to(embeddings.device)
    else:
        seeds = _kmeans_plus_plus(embeddings, num_clusters, generator)
    centroids = embeddings[seeds].clone()
    for _ in range(iterations):
        assignments = _nearest_centroid(embeddings, centroids, chunk_size)
        sums = torch.zeros_like(centroids).index_add_(0, assignments, embeddings)
        non_empty = torch.bincount(assignments, minlength=num_clusters) > 0
        centroids[non_empty] = F.normalize(sums[non_empty], dim=1)
    return centroids, _nearest_centroid(embeddings, centroids, chunk_size)


def _clustered_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``(M, K)`` ``logits`` over the items whose ``(M,)`` target is a cluster (>= 0); 0, still
    connected to the graph, when none is. Masks by value instead of selecting rows, so the host never waits to learn
    how many items are clustered."""
    clustered = targets >= 0
    per_item = F.cross_entropy(logits, targets.clamp_min(0), reduction="none")
    return torch.where(clustered, per_item, 0.0).sum() / clustered.sum().clamp_min(1)


class DeepClusterV2Loss(ClusteringLoss):
    """DeepCluster-v2 loss (Caron et al. 2020, arXiv 2006.09882), the clustering objective of the DeepCluster variant
    of arXiv 2212.01893 (``L_intra`` over 2D images and slices, ``L_inter`` over volume features).

    A memory bank holds, for every item (GLOBAL id in ``[0, num_items)``: 2D images and every slice of every volume
    have distinct ids, so concatenated datasets never overwrite each other, unlike the public code), the last
    projections of views 0 and 1, written by every forward call. :meth:`update_clusters` (run at each epoch start by
    :class:`custom_nets.engines.handlers.DeepClusterKMeansHandler`) runs spherical k-means per head on the bank (head
    ``h`` clusters view ``h % 2``), copies the centroids into the prototype layers and stores each item's cluster.
    The loss is, per head, the cross-entropy of ``scores[h][v] / temperature`` against the item's cluster over all
    views (small crops hold a prefix of the items), then the mean over heads.

    Before the first k-means (the first epoch, when the bank is still empty) no item has a cluster: such items are
    ignored and a batch without any clustered item gives a zero loss that is still connected to the graph (zero
    gradients), so the other terms of :class:`JointLoss` train alone during that epoch. This is logged at the first
    call. Nothing in a training call makes the host wait for the device (no ``.item()``, no boolean row selection); on
    an accelerator an out-of-range item id fails an asynchronous assertion (on the CPU: a ``ValueError`` with the
    ids' range).

    Under ``torch.distributed`` each rank writes the items it sees; :meth:`update_clusters` merges the banks (items
    seen by several ranks are averaged), every rank runs the same seeded k-means, and rank 0's centroids and
    assignments are broadcast so all ranks hold bit-identical prototypes and targets. The bank, its flags and the
    assignments are buffers, so saving the loss's ``state_dict`` with the checkpoint lets a resumed run keep them.

    Shapes (``forward(projections, scores, index)``):
        projections: per view ``v``, ``(M_v, P)`` (views 0/1 are stored in the bank).
        scores: per head ``h``, per view ``v``, ``(M_v, K_h)``.
        index: ``(M_0,)`` long global item ids of the items of views 0/1.
        returns: scalar float32 loss.

    After each call, for the collapse monitor: ``last_assignments`` (per head, ``(M_0,)`` nearest prototype of
    view 0), ``num_prototypes`` and ``last_loss``.

    Args:
        num_items: number of distinct global item ids (size of the bank).
        embedding_dim: ``P``, dimension of the projections.
        num_heads: number of prototype heads (3 in DeepCluster-v2).
        temperature: softmax temperature (0.1).
        kmeans_iterations: k-means update rounds per epoch (10).
        kmeans_init: ``"k-means++"`` or ``"random"`` (see :func:`spherical_kmeans`).
    """

    def __init__(
        self,
        num_items: int,
        embedding_dim: int = 128,
        num_heads: int = 3,
        temperature: float = 0.1,
        kmeans_iterations: int = 10,
        kmeans_init: str = "k-means++",
    ) -> None:
        super().__init__()
        if num_items < 1 or embedding_dim < 1 or num_heads < 1:
            raise ValueError(
                f"num_items, embedding_dim, num_heads must be >= 1, got {num_items, embedding_dim, num_heads}."
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if kmeans_init not in KMEANS_INITS:
            raise ValueError(f"kmeans_init must be one of {KMEANS_INITS}, got {kmeans_init!r}.")
        self.num_items = num_items
        self.num_heads = num_heads
        self.temperature = temperature
        self.kmeans_iterations = kmeans_iterations
        self.kmeans_init = kmeans_init
        self.register_buffer("bank", torch.zeros(2, num_items, embedding_dim))
        self.register_buffer("bank_valid", torch.zeros(num_items, dtype=torch.bool))  # holds an embedding
        self.register_buffer("bank_fresh", torch.zeros(num_items, dtype=torch.bool))  # written since last k-means
        self.register_buffer("assignments", torch.full((num_heads, num_items), -1, dtype=torch.long))
        self._checked_clusters = False

    def _check_index(self, index: torch.Tensor | None, num_items: int) -> torch.Tensor:
        if index is None:
            raise ValueError("DeepClusterV2Loss needs the global item ids (targets 'intra_index' / 'inter_index').")
        if index.ndim != 1 or index.shape[0] != num_items:
            raise ValueError(f"index must be ({num_items},) global item ids, got shape {tuple(index.shape)}.")
        advice = (
            "num_items must count every 2D image and every slice (or every volume for the 3D head) of the datalist."
        )
        message = f"item ids must lie in [0, {self.num_items}): {advice}"
        try:  # asynchronous on an accelerator (reading the range would make the host wait at every step)
            torch._assert_async(((index >= 0) & (index < self.num_items)).all(), message)
        except RuntimeError as error:  # raised at once on the CPU, where reading the range costs nothing
            low, high = int(index.min()), int(index.max())
            raise ValueError(f"item ids must lie in [0, {self.num_items}), got [{low}, {high}]: {advice}") from error
        return index.to(self.bank.device, torch.long)

    @torch.no_grad()
    def _store(self, projections: Sequence[torch.Tensor], index: torch.Tensor) -> None:
        if projections[0].shape[1] != self.bank.shape[2]:
            raise ValueError(f"projections have dim {projections[0].shape[1]} but embedding_dim={self.bank.shape[2]}.")
        for view in (0, 1):
            self.bank[view, index] = projections[view].detach().to(self.bank)
        self.bank_fresh.index_fill_(0, index, True)

    def forward(
        self,
        projections: Sequence[torch.Tensor],
        scores: Sequence[Sequence[torch.Tensor]],
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        num_items = check_clustering_inputs(projections, scores)
        if len(scores) != self.num_heads:
            raise ValueError(f"got scores of {len(scores)} heads but num_heads={self.num_heads}.")
        if self.bank.device != projections[0].device:
            self.to(projections[0].device)  # the bank follows the network (NCCL reduces device tensors only)
        index = self._check_index(index, num_items)
        if self.training:
            self._store(projections, index)

        head_losses = []
        for head, head_scores in enumerate(scores):
            targets = self.assignments[head, index].to(head_scores[0].device)
            logits = torch.cat([s.float() for s in head_scores]) / self.temperature
            view_targets = torch.cat([targets[: s.shape[0]] for s in head_scores])
            head_losses.append(_clustered_cross_entropy(logits, view_targets))
        loss = torch.stack(head_losses).mean()
        if not self._checked_clusters:  # once: a host read of device values, which a GPU step should not repeat
            self._checked_clusters = True
            if not bool((self.assignments[:, index] >= 0).any()):
                logger.info("DeepCluster-v2: no item of this batch has a k-means cluster yet (empty bank); loss is 0.")

        self._record(scores, loss)
        return loss

    @torch.no_grad()
    def _merge_banks(self) -> None:
        """Make the bank identical on all ranks; rows written this epoch are averaged over the ranks that wrote them."""
        fresh = self.bank_fresh.to(self.bank.dtype)
        if _distributed_active():
            contributions = self.bank * fresh[None, :, None]
            dist.all_reduce(contributions)
            dist.all_reduce(fresh)
            written = fresh > 0
            self.bank[:, written] = F.normalize(contributions[:, written] / fresh[written][None, :, None], dim=-1)
        else:
            written = fresh > 0
        self.bank_valid |= written
        self.bank_fresh.zero_()

    @torch.no_grad()
    def update_clusters(self, prototypes: nn.Module | Sequence[nn.Module], seed: int = 0) -> list[torch.Tensor]:
        """Cluster the memory bank, copy the centroids into ``prototypes`` and set the targets of every item.

        Collective under ``torch.distributed``: call it on every rank (e.g. at each epoch start). Items never written
        keep no cluster (target ignored). Does nothing and returns ``[]`` while the bank is empty.

        Args:
            prototypes: the prototype layers, one ``nn.Linear(P, K_h, bias=False)`` per head.
            seed: k-means initialisation seed (use a different one per epoch, e.g. ``base_seed + epoch``).

        Returns:
            per head, the ``(K_h, P)`` centroids written into the prototype weights.
        """
        layers = prototype_layers(prototypes)
        if len(layers) != self.num_heads:
            raise ValueError(f"got {len(layers)} prototype layers but num_heads={self.num_heads}.")
        self.to(_collective_device(self.bank.device))
        self._merge_banks()
        valid_ids = self.bank_valid.nonzero().squeeze(1)
        if valid_ids.numel() == 0:
            return []
        self.assignments.fill_(-1)
        all_centroids = []
        for head, layer in enumerate(layers):
            centroids, assignments = spherical_kmeans(
                self.bank[head % 2, valid_ids],
                layer.weight.shape[0],
                self.kmeans_iterations,
                seed=seed + head,
                init=self.kmeans_init,
            )
            if _distributed_active():
                dist.broadcast(centroids, src=0)
                dist.broadcast(assignments, src=0)
            self.assignments[head, valid_ids] = assignments
            layer.weight.copy_(centroids.to(layer.weight))
            all_centroids.append(centroids)
        return all_centroids
