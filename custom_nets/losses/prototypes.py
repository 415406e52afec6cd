"""Access to the prototype layers of a clustering head (the rows of ``nn.Linear(dim, K, bias=False)`` weights)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["prototype_layers"]


def prototype_layers(prototypes: nn.Module | Sequence[nn.Module]) -> list[nn.Linear]:
    """Return the bias-free ``nn.Linear`` layers whose weight rows are prototypes, in head order.

    Args:
        prototypes: one ``nn.Linear``, an ``nn.ModuleList`` of them (e.g. ``JointSSLNet.intra_prototypes``) or any
            module / sequence of modules containing them.

    Raises:
        ValueError: when no ``nn.Linear`` is found or one of them has a bias (a prototype score is ``z @ C^T`` only).
    """
    modules = [prototypes] if isinstance(prototypes, nn.Module) else list(prototypes)
    layers = [layer for module in modules for layer in module.modules() if isinstance(layer, nn.Linear)]
    if not layers:
        raise ValueError(f"no nn.Linear prototype layer found in {type(prototypes).__name__}.")
    for layer in layers:
        if layer.bias is not None:
            raise ValueError(
                f"prototype layer {layer} has a bias; prototype layers must be nn.Linear(..., bias=False)."
            )
    return layers
