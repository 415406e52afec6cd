"""Masked slice prediction loss (``L_mask`` of arXiv 2212.01893)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MaskedSlicePredictionLoss"]

POSITIONS = ("masked", "all")
DISTANCES = ("mse", "cosine")


class MaskedSlicePredictionLoss(nn.Module):
    """BERT-style masked slice prediction (``L_mask``, arXiv 2212.01893): the slice transformer's decoder output at a
    position must reproduce the (detached) slice embedding that the mask token replaced.

    The error per position is the mean squared error over the ``d`` features (``distance="mse"``, default: the
    decoder is a linear ``d -> d`` regression onto the embeddings, whose scale carries information), or
    ``1 - cosine similarity`` (``distance="cosine"``, scale-free). It is averaged over the selected positions of
    every view: the masked valid slices (``positions="masked"``, default, as the paper describes), or every valid
    slice (``positions="all"``, what the public code does). Padding slices never count; predictions at unselected
    positions do not influence the value or the gradient (even NaN there is ignored). The target is detached here
    as well. Without any selected position the loss is a zero connected to the graph.

    Shapes (``forward(prediction, target, slice_mask, slice_valid)``):
        prediction, target: ``(V, B, N, d)`` (one per view) or ``(B, N, d)``.
        slice_mask: ``(B, N)`` bool, True where the slice was replaced by the mask token (same for all views).
        slice_valid: ``(B, N)`` bool, False for padding.
        returns: scalar float32 loss.

    Args:
        positions: ``"masked"`` or ``"all"``.
        distance: ``"mse"`` or ``"cosine"``.
    """

    def __init__(self, positions: str = "masked", distance: str = "mse") -> None:
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}.")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}.")
        self.positions = positions
        self.distance = distance

    def forward(
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        slice_mask: torch.Tensor,
        slice_valid: torch.Tensor,
    ) -> torch.Tensor:
        if prediction.shape != target.shape or prediction.ndim not in (3, 4):
            raise ValueError(
                f"prediction and target must both be (V, B, N, d) or (B, N, d), got {tuple(prediction.shape)} "
                f"and {tuple(target.shape)}."
            )
        positions_shape = prediction.shape[-3:-1]
        if slice_mask.shape != positions_shape or slice_valid.shape != positions_shape:
            raise ValueError(
                f"slice_mask {tuple(slice_mask.shape)} and slice_valid {tuple(slice_valid.shape)} must be "
                f"{tuple(positions_shape)} (volumes, slices)."
            )
        selected = slice_valid.bool()
        if self.positions == "masked":
            selected = selected & slice_mask.bool()
        # the mean over the selected positions of every view without boolean indexing, which would make the host wait
        # for the GPU to count them: unselected positions are zeroed before (no NaN reaches a gradient) and after
        selected = selected.expand(prediction.shape[:-1])
        predicted = torch.where(selected[..., None], prediction.float(), 0.0)
        expected = torch.where(selected[..., None], target.detach().float(), 0.0)
        if self.distance == "mse":
            errors = (predicted - expected).pow(2).mean(dim=-1)
        else:
            errors = 1.0 - F.cosine_similarity(predicted, expected, dim=-1)
        return torch.where(selected, errors, 0.0).sum() / selected.sum().clamp_min(1)
