"""Sinkhorn-Knopp equipartitioned soft assignments (SwAV codes), correct under ``torch.distributed``."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["sinkhorn_knopp"]


def _distributed_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def sinkhorn_knopp(
    scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3, distributed: bool = True
) -> torch.Tensor:
    """Soft codes ``Q`` that split the items evenly over the prototypes (SwAV, Caron et al. 2020, arXiv 2006.09882),
    as used for the clustering losses of arXiv 2212.01893.

    ``Q`` is the transport plan for ``exp(scores / epsilon)`` after ``iterations`` alternating normalisations of the
    prototype marginal (target ``B / K`` for every prototype) and the item marginal (target 1 for every item); the
    item normalisation comes last, so every row of the result sums to exactly 1 and the prototype marginal approaches
    ``B / K`` as ``iterations`` grows. Constant factors of the classic formulation (total mass, ``1/K``, ``1/B``) are
    left out: each normalisation step cancels them, so the codes are the same with fewer passes over ``(B, K)``.

    The computation is in float32 whatever the input dtype (fp16/bf16 scores from autocast are safe): the global
    maximum is subtracted before ``exp`` (it cancels in the first normalisation), and marginals are clamped away from
    zero so an underflowed prototype or item gives zero codes, never NaN. When ``distributed`` is True and
    ``torch.distributed`` is initialised, the maximum and the prototype marginals are all-reduced, so the codes equal
    those of one process holding every rank's items (ranks may hold different numbers of items, even none); every
    rank must then call this function the same number of times.

    Leading dimensions hold independent problems (``(..., B, K)``, e.g. the two assignment views of SwAV): one call
    solves them all with the kernel launches of one, which is what bounds the time of these small tensors on a GPU.

    Args:
        scores: ``(B, K)`` similarities of ``B`` items to ``K`` prototypes (this rank's items), or ``(..., B, K)``.
        epsilon: entropic regularisation; smaller gives sharper codes (0.05 in SwAV).
        iterations: number of Sinkhorn-Knopp iterations (3 in SwAV).
        distributed: all-reduce the sums across processes when ``torch.distributed`` is initialised.

    Returns:
        float32 codes of the shape of ``scores``; each row sums to 1.
    """
    if scores.ndim < 2:
        raise ValueError(f"scores must be (items, prototypes) or (..., items, prototypes), got {tuple(scores.shape)}.")
    if epsilon <= 0 or iterations < 1:
        raise ValueError(f"epsilon must be > 0 and iterations >= 1, got epsilon={epsilon}, iterations={iterations}.")
    reduce = distributed and _distributed_active()
    scores = scores.detach().float()
    tiny = torch.finfo(torch.float32).tiny

    if scores.shape[-2] > 0:
        global_max = scores.amax(dim=(-2, -1), keepdim=True)
    else:
        global_max = scores.new_full((*scores.shape[:-2], 1, 1), float("-inf"))
    if reduce:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX)
    codes = torch.sub(scores, global_max).div_(epsilon).exp_()
    for _ in range(iterations):
        prototype_mass = codes.sum(dim=-2, keepdim=True)
        if reduce:
            dist.all_reduce(prototype_mass)
        codes /= prototype_mass.clamp_min_(tiny)
        codes /= codes.sum(dim=-1, keepdim=True).clamp_min_(tiny)
    return codes
