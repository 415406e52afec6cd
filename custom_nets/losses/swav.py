"""SwAV swapped-prediction loss with multi-crop, several prototype heads and an optional feature queue."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from custom_nets.losses.clustering import ClusteringLoss, check_clustering_inputs, prototype_layers
from custom_nets.losses.sinkhorn import sinkhorn_knopp

__all__ = ["SwAVLoss", "soft_cross_entropy"]


def soft_cross_entropy(log_probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over items of ``-sum_k targets[i, k] * log_probabilities[i, k]``; both ``(M, K)``, ``M > 0``."""
    per_item = torch.einsum("ik,ik->i", targets, log_probabilities)  # row-wise dot: no (M, K) temporary
    return -per_item.sum() / log_probabilities.shape[0]


class SwAVLoss(ClusteringLoss):
    """Swapped prediction of Sinkhorn codes (SwAV, Caron et al. 2020, arXiv 2006.09882), the clustering objective
    of ``L_intra`` / ``L_inter`` in arXiv 2212.01893.

    For every head ``h`` and every assignment view ``a`` (views 0 and 1), codes ``q_a = sinkhorn(scores[h][a])`` are
    predicted from every other view ``v`` by ``softmax(scores[h][v] / temperature)``:
    ``loss_h = mean_a [ mean_{v != a, M_v > 0} CE(q_a[:M_v], scores[h][v] / temperature) ]``, and the loss is the
    mean over heads. Views ``v >= 2`` (small multi-crops) hold a prefix of the items of views 0/1, so they are
    compared with the first ``M_v`` codes. With equal view sizes this is exactly the SwAV multi-crop loss.

    Feature queue (optional, as in SwAV): the projections of the assignment views of the last ``queue_length`` items
    are kept per assignment view and, once the queue is full, scored with the CURRENT prototype weights and appended
    to the Sinkhorn input (only the batch's codes are used). The queue starts after ``queue_start_iteration``
    training-mode calls (e.g. ``epoch_queue_starts * iterations_per_epoch`` in a bundle config; the call count is a
    buffer, so it survives a resume when the loss's ``state_dict`` is checkpointed). The queue itself lives on this
    process only (not in ``state_dict``) and refills after a restart.

    Shapes (``forward(projections, scores, index=None)``):
        projections: per view ``v``, ``(M_v, P)`` L2-normalised projections (used for the queue only).
        scores: per head ``h``, per view ``v``, ``(M_v, K_h)`` = ``projections[v] @ C_h^T``.
        index: ignored; accepted so that every clustering loss has the same signature.
        returns: scalar float32 loss.

    After each call, for the collapse monitor: ``last_assignments`` (per head, ``(M_0,)`` nearest prototype of
    view 0), ``num_prototypes`` (per head) and ``last_loss`` (detached scalar).

    Args:
        temperature: softmax temperature of the predictions (0.1).
        epsilon: Sinkhorn regularisation (0.05).
        sinkhorn_iterations: Sinkhorn iterations (3).
        assignment_views: views whose codes are predicted (SwAV ``crops_for_assign``).
        queue_length: number of past items kept per assignment view; 0 disables the queue.
        queue_start_iteration: training-mode calls before the queue starts filling.
        prototypes: the prototype layers (e.g. ``"$@network_def.intra_prototypes"``); required with a queue. They
            are held by reference, not registered as sub-modules, so the loss does not own the network's weights.
        distributed: all-reduce the Sinkhorn sums across processes when ``torch.distributed`` is initialised.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        assignment_views: Sequence[int] = (0, 1),
        queue_length: int = 0,
        queue_start_iteration: int = 0,
        prototypes: nn.Module | Sequence[nn.Module] | None = None,
        distributed: bool = True,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if not assignment_views or any(view not in (0, 1) for view in assignment_views):
            raise ValueError(f"assignment_views must be a non-empty subset of (0, 1), got {assignment_views}.")
        if queue_length < 0 or queue_start_iteration < 0:
            raise ValueError("queue_length and queue_start_iteration must be >= 0.")
        if queue_length > 0 and prototypes is None:
            raise ValueError("a feature queue needs the prototype layers: pass prototypes=<the network's prototypes>.")
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.assignment_views = tuple(assignment_views)
        self.queue_length = queue_length
        self.queue_start_iteration = queue_start_iteration
        self.distributed = distributed
        self._prototype_layers = prototype_layers(prototypes) if prototypes is not None else []
        self.register_buffer("training_iterations", torch.zeros((), dtype=torch.long))  # kept by checkpoints
        self._queue: torch.Tensor | None = None  # (assignment views, queue_length, P), newest first
        self._queue_items = 0
        self._host_iterations: int | None = None  # training_iterations as a host integer (None: read it)

    def _iterations_so_far(self) -> int:
        """``training_iterations`` without a wait for the device at every step: the buffer is read once (after
        construction or a state-dict load), then counted on the host."""
        if self._host_iterations is None:
            self._host_iterations = int(self.training_iterations)
        return self._host_iterations

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._host_iterations = None

    def _queue_scores(self, head: int, slot: int) -> torch.Tensor | None:
        if self._queue is None or self._queue_items < self.queue_length:
            return None
        weight = self._prototype_layers[head].weight.detach().float()
        return self._queue[slot] @ weight.t()

    def _codes(self, head: int, head_scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Sinkhorn codes of every assignment view, solved in one batched call (views 0 and 1 hold the same items,
        and every slot's queue has the same length)."""
        sinkhorn_inputs = []
        for slot, view in enumerate(self.assignment_views):
            view_scores = head_scores[view].detach().float()
            queue_scores = self._queue_scores(head, slot)
            sinkhorn_inputs.append(view_scores if queue_scores is None else torch.cat([view_scores, queue_scores]))
        codes = sinkhorn_knopp(torch.stack(sinkhorn_inputs), self.epsilon, self.sinkhorn_iterations, self.distributed)
        num_items = head_scores[0].shape[0]  # views 0 and 1 hold the same items
        return [slot_codes[:num_items] for slot_codes in codes]

    @torch.no_grad()
    def _enqueue(self, projections: Sequence[torch.Tensor]) -> None:
        new = torch.stack([projections[view].detach().float() for view in self.assignment_views])
        if self._queue is None or self._queue.shape[-1] != new.shape[-1] or self._queue.device != new.device:
            self._queue = new.new_zeros(len(self.assignment_views), self.queue_length, new.shape[-1])
            self._queue_items = 0
        self._queue = torch.cat([new, self._queue], dim=1)[:, : self.queue_length]
        self._queue_items = min(self.queue_length, self._queue_items + new.shape[1])

    def forward(
        self,
        projections: Sequence[torch.Tensor],
        scores: Sequence[Sequence[torch.Tensor]],
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_clustering_inputs(projections, scores)
        if self.queue_length > 0 and len(self._prototype_layers) != len(scores):
            raise ValueError(f"{len(scores)} heads of scores but {len(self._prototype_layers)} prototype layers.")
        head_losses = []
        for head, head_scores in enumerate(scores):
            log_probabilities = [F.log_softmax(s.float() / self.temperature, dim=1) for s in head_scores]
            view_losses = []
            for assigned, codes in zip(self.assignment_views, self._codes(head, head_scores), strict=True):
                predictions = [
                    soft_cross_entropy(log_p, codes[: log_p.shape[0]])
                    for view, log_p in enumerate(log_probabilities)
                    if view != assigned and log_p.shape[0] > 0
                ]
                if predictions:
                    view_losses.append(torch.stack(predictions).mean())
            head_losses.append(
                torch.stack(view_losses).mean() if view_losses else sum(s.float().sum() for s in head_scores) * 0.0
            )
        loss = torch.stack(head_losses).mean()

        if self.training and self.queue_length > 0:
            if self._iterations_so_far() >= self.queue_start_iteration:
                self._enqueue(projections)
            self._host_iterations += 1
        if self.training:
            self.training_iterations += 1
        self._record(scores, loss)
        return loss
