"""Gradient clipping and LARC trust-ratio scaling between ``backward()`` and ``optimizer.step()``."""

from __future__ import annotations

import logging

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents

__all__ = ["GradientControl", "ratio_from_norms"]

logger = logging.getLogger(__name__)


def ratio_from_norms(
    weight_norm: torch.Tensor,
    grad_norm: torch.Tensor,
    lr: float,
    weight_decay: float,
    trust: float,
    clip: bool,
    eps: float = 1e-8,
) -> torch.Tensor:
    """LARC's per-layer factor ``trust * ||w|| / (||g|| + wd * ||w||)`` (with ``clip``, ``min(factor / lr, 1)``), from
    the norms, elementwise: ``(P,)`` weight and gradient norms of ``P`` layers -> ``(P,)`` factors (1 where either norm
    is 0).

    Reference: You et al., "Large Batch Training of Convolutional Networks", arXiv 1708.03888 (as used by SwAV).
    """
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
        """All layers of a parameter group at once (``torch._foreach_*``, as torch's optimisers do): a handful of
        kernels per group instead of about a dozen per layer (85 layers in the paper's network), so that the GPU step
        does not pay a thousand kernel launches for it. The same arithmetic as :func:`ratio_from_norms` per layer."""
        for group in optimizer.param_groups:
            weight_decay = group.get("weight_decay", 0.0)
            layers: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for weight in group["params"]:
                if weight.grad is not None and weight.ndim > 1:
                    layers.setdefault((weight.device, weight.dtype), []).append(weight)
            for weights in layers.values():
                grads = [weight.grad for weight in weights]
                ratios = ratio_from_norms(
                    torch.stack(torch._foreach_norm(weights)),
                    torch.stack(torch._foreach_norm(grads)),
                    group["lr"],
                    weight_decay,
                    self.trust_coefficient,
                    self.clip_trust,
                )
                # (g + wd * w) * ratio - wd * w, as g * ratio + wd * (ratio - 1) * w: two passes over the gradients
                torch._foreach_mul_(grads, list(ratios.unbind()))
                if weight_decay:
                    torch._foreach_addcmul_(grads, weights, list((weight_decay * (ratios - 1)).unbind()))
