"""The pretraining optimiser: SGD with momentum (LARC is applied to its gradients by ``GradientControl``)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["build_sgd"]


def build_sgd(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    fused: bool = False,
) -> torch.optim.SGD:
    """:class:`torch.optim.SGD` (no dampening, no Nesterov), optionally with torch's fused kernel.

    Unfused, torch picks its multi-tensor (foreach) implementation for CUDA parameters and a per-parameter loop on
    CPU. ``fused=True`` runs one fused kernel per device and dtype. That kernel needs a momentum buffer for every
    parameter with a gradient as soon as any parameter has one, so a parameter whose first gradient comes later (the
    prototypes frozen for the first ``freeze_prototypes_iterations``) would stop the run; every buffer therefore starts
    at zero here. Without dampening, the first update from a zero buffer (``0 * momentum + g``) equals torch's
    first-step rule (buffer = ``g``), so the updates are those of the unfused optimiser up to rounding.

    Args:
        params: the parameters to train.
        lr, momentum, weight_decay: as :class:`torch.optim.SGD`.
        fused: use torch's fused SGD kernel.
    """
    params = list(params)
    optimizer = torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True if fused else None
    )
    if fused and momentum != 0:
        for param in params:
            optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return optimizer
