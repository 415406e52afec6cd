"""Gradient clipping and LARC trust-ratio scaling between ``backward()`` and ``optimizer.step()``."""

from __future__ import annotations

import logging

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents

__all__ = ["GradientControl", "trust_ratio"]

logger = logging.getLogger(__name__)


def trust_ratio(
    weight: torch.Tensor,
    grad: torch.Tensor,
    lr: float,
    weight_decay: float,
    trust: float,
    clip: bool,
    eps: float = 1e-8,
) -> torch.Tensor:
    """LARC's per-layer factor ``trust * ||w|| / (||g|| + wd * ||w||)``; with ``clip``, ``min(factor / lr, 1)``.

    Reference: You et al., "Large Batch Training of Convolutional Networks", arXiv 1708.03888 (as used by SwAV).
    """
    weight_norm = torch.linalg.vector_norm(weight)
    grad_norm = torch.linalg.vector_norm(grad)
    ratio = trust * weight_norm / (grad_norm + weight_decay * weight_norm + eps)
    ratio = torch.where((weight_norm > 0) & (grad_norm > 0), ratio, torch.ones_like(ratio))
    return torch.clamp(ratio / lr, max=1.0) if clip else ratio


class GradientControl:
    """Ignite handler on ``IterationEvents.BACKWARD_COMPLETED`` of a MONAI trainer: unscale AMP gradients once,
    clip the global gradient norm, then apply LARC. (A non-finite loss is handled before, by
    :class:`~custom_nets.engines.handlers.nan_guard.NonFiniteLossGuard`.)

    LARC (the paper's optimiser, trust 0.001) is applied so that plain SGD with weight decay ``wd`` then performs the
    LARC update: each multi-dimensional parameter's gradient becomes ``(g + wd * w) * ratio - wd * w`` and SGD adds
    ``wd * w`` back. Biases and norm parameters (one dimension) are not scaled.

    Args:
        max_norm: clip the global L2 gradient norm to this value; ``None`` disables clipping.
        trust_coefficient: LARC trust; ``None`` disables LARC.
        clip_trust: clip the adaptive rate at the scheduled rate (SwAV's ``larc_clip``).
    """

    def __init__(
        self, max_norm: float | None = None, trust_coefficient: float | None = None, clip_trust: bool = True
    ) -> None:
        self.max_norm = max_norm
        self.trust_coefficient = trust_coefficient
        self.clip_trust = clip_trust

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        scaler = getattr(engine, "scaler", None) if getattr(engine, "amp", False) else None
        if self.max_norm is None and self.trust_coefficient is None:
            return
        if scaler is not None:
            scaler.unscale_(engine.optimizer)
        if self.max_norm is not None:
            torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)
        if self.trust_coefficient is not None:
            self._apply_trust_ratio(engine.optimizer)

    def _apply_trust_ratio(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            weight_decay = group.get("weight_decay", 0.0)
            for weight in group["params"]:
                if weight.grad is None or weight.ndim <= 1:
                    continue
                ratio = trust_ratio(
                    weight, weight.grad, group["lr"], weight_decay, self.trust_coefficient, self.clip_trust
                )
                weight.grad.add_(weight, alpha=weight_decay).mul_(ratio).sub_(weight, alpha=weight_decay)
