"""Deformable slice transformer ``f_inter``: slice embeddings in, per-slice tokens and one volume feature out."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from custom_nets.nets.deformable_attention import DeformableSliceAttention

__all__ = [
    "SliceTransformer",
    "SliceTransformerOutput",
    "SliceTransformerLayer",
    "check_every_volume_has_a_slice",
    "relative_positions",
    "slice_position_encoding",
]


class SliceTransformerOutput(NamedTuple):
    """Outputs of :class:`SliceTransformer`: ``tokens`` ``(B, N, d)``, ``volume_embedding`` ``(B, d)`` (unit norm)."""

    tokens: torch.Tensor
    volume_embedding: torch.Tensor


def slice_position_encoding(positions: torch.Tensor, dim: int, period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal encoding ``(B, N, dim)`` of slice positions ``(B, N)`` (mm or slice index), as in Vaswani et al."""
    if dim % 2:
        raise ValueError(f"position encoding needs an even width, got {dim}.")
    frequencies = torch.exp(
        torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) * (-math.log(period) / dim)
    )
    angles = positions.float()[..., None] * frequencies
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


class SliceTransformerLayer(nn.Module):
    """One post-norm encoder layer: deformable slice self-attention then a GELU feed-forward block.

    Shapes: tokens ``(B, N, d)``, position encoding ``(B, N, d)`` (added to the query only, as in Deformable-DETR),
    ``slice_valid`` ``(B, N)``; output ``(B, N, d)``.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_points: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.attention = DeformableSliceAttention(embed_dim, num_heads, num_points)
        self.attention_norm = nn.LayerNorm(embed_dim)
        self.feed_forward = nn.Sequential(
            nn.Linear(embed_dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, embed_dim)
        )
        self.feed_forward_norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, position: torch.Tensor, slice_valid: torch.Tensor) -> torch.Tensor:
        attended = self.attention(tokens + position, tokens, slice_valid)
        tokens = self.attention_norm(tokens + self.dropout(attended))
        return self.feed_forward_norm(tokens + self.dropout(self.feed_forward(tokens)))


class SliceTransformer(nn.Module):
    """Deformable slice transformer ``f_inter`` of arXiv 2212.01893.

    Slice tokens get a sinusoidal encoding of their position: the physical z in mm relative to the volume's first
    valid slice when ``slice_position`` is given, the slice index otherwise. ``num_layers`` deformable encoder layers
    follow. The volume feature is the mean of the valid output tokens, L2-normalised. Slices flagged in
    ``slice_mask`` are replaced by a learned mask token before encoding (masked slice prediction).

    Shapes:
        slice_embeddings ``(B, N, d)``; slice_valid ``(B, N)`` bool (False = padding; default all valid);
        slice_position ``(B, N)`` float; slice_mask ``(B, N)`` bool.
        Output tokens ``(B, N, d)`` (zero on padding) and volume_embedding ``(B, d)`` with unit norm.

    Args:
        embed_dim: token width ``d`` (640).
        num_layers: encoder layers (4).
        num_heads: attention heads (8).
        num_points: sampling points per head (4).
        ffn_dim: feed-forward width (720).
        dropout: dropout in attention residuals and feed-forward (0.1).
    """

    def __init__(
        self,
        embed_dim: int = 640,
        num_layers: int = 4,
        num_heads: int = 8,
        num_points: int = 4,
        ffn_dim: int = 720,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.layers = nn.ModuleList(
            SliceTransformerLayer(embed_dim, num_heads, num_points, ffn_dim, dropout) for _ in range(num_layers)
        )
        self.mask_token = nn.Parameter(torch.zeros(embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(
        self,
        slice_embeddings: torch.Tensor,
        slice_valid: torch.Tensor | None = None,
        slice_position: torch.Tensor | None = None,
        slice_mask: torch.Tensor | None = None,
    ) -> SliceTransformerOutput:
        if slice_embeddings.ndim != 3 or slice_embeddings.shape[-1] != self.embed_dim:
            raise ValueError(
                f"expected slice embeddings (B, N, {self.embed_dim}), got {tuple(slice_embeddings.shape)}."
            )
        batch, num_slices, _ = slice_embeddings.shape
        device = slice_embeddings.device
        if slice_valid is None:
            slice_valid = torch.ones(batch, num_slices, dtype=torch.bool, device=device)
        check_every_volume_has_a_slice(slice_valid)
        tokens = slice_embeddings
        if slice_mask is not None:
            tokens = torch.where(slice_mask[..., None], self.mask_token.to(tokens.dtype), tokens)
        position = relative_positions(slice_valid, slice_position)
        encoding = slice_position_encoding(position, self.embed_dim).to(tokens.dtype)
        tokens = tokens.masked_fill(~slice_valid[..., None], 0.0)
        for layer in self.layers:
            tokens = layer(tokens, encoding, slice_valid).masked_fill(~slice_valid[..., None], 0.0)
        counts = slice_valid.sum(dim=1, keepdim=True).to(tokens.dtype)
        volume_embedding = F.normalize(tokens.sum(dim=1) / counts, dim=-1)
        return SliceTransformerOutput(tokens, volume_embedding)


def check_every_volume_has_a_slice(slice_valid: torch.Tensor) -> None:
    """Fail if a row of ``(B, N)`` bool ``slice_valid`` is all False (its volume feature would be 0 / 0).

    An assertion that never makes the host wait for the device (``torch._assert_async``): on the CPU it raises a
    ``RuntimeError`` at once; on a GPU a failure surfaces at a later kernel launch and ends the process, so that the
    training step keeps no synchronisation. :class:`custom_nets.engines.JointPrepareBatch` checks the same on the host,
    with the volume's index in the batch, before the batch reaches the GPU.
    """
    torch._assert_async(
        slice_valid.any(dim=1).all(), "every volume needs at least one valid slice (slice_valid is all False for one)."
    )


def relative_positions(slice_valid: torch.Tensor, slice_position: torch.Tensor | None) -> torch.Tensor:
    """Positions ``(B, N)`` relative to each volume's lowest valid position: mm when given, slice index otherwise."""
    if slice_position is None:
        slice_position = torch.arange(slice_valid.shape[1], device=slice_valid.device).expand_as(slice_valid)
    slice_position = slice_position.float()
    first = slice_position.masked_fill(~slice_valid, float("inf")).amin(dim=1, keepdim=True)
    return (slice_position - first).masked_fill(~slice_valid, 0.0)
