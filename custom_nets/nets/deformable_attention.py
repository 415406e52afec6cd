"""Multi-head deformable attention along the slice axis (``f_inter``'s attention, arXiv 2212.01893)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DeformableSliceAttention"]


class DeformableSliceAttention(nn.Module):
    """Deformable attention over the slices of a volume: each query reads a few learned positions, not all slices.

    For query slice ``i`` and head ``m``, ``num_points`` sampling locations ``ref_i + offset_mik`` (in slice units) and
    their weights (softmax over the points) are predicted from the query. Values are read at these fractional slice
    positions by linear interpolation between the two neighbouring slices, as one ``F.embedding_bag`` weighted sum of
    ``2 * num_points`` value rows per query and head; positions outside the volume or on padding slices read zeros.
    Cost and memory are ``O(N * heads * points * d)``: no ``N x N`` tensor is ever formed, unlike dense attention.

    The authors' public code applies a 1D deformable attention with the 640 features as the sequence axis; here the
    sequence axis is the slice axis, and any number of slices works.

    Shapes:
        query ``(B, N, d)``; value ``(B, N, d)`` (defaults to ``query``); ``slice_valid`` ``(B, N)`` bool with
        False on padding; output ``(B, N, d)`` (zero on padding positions).

    Args:
        embed_dim: token width ``d``; divisible by ``num_heads``.
        num_heads: attention heads ``M`` (8 as in Deformable-DETR).
        num_points: sampling points ``K`` per head (4 as in Deformable-DETR).

    References:
        arXiv 2212.01893 (f_inter); Zhu et al., "Deformable DETR", arXiv 2010.04159 (deformable attention).
    """

    def __init__(self, embed_dim: int = 640, num_heads: int = 8, num_points: int = 4) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}).")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_points = num_points
        self.head_dim = embed_dim // num_heads
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_points)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Start every head looking at its own spread of neighbours: head m reads ``+-(k+1) * (1 + m // 2)`` slices."""
        nn.init.zeros_(self.sampling_offsets.weight)
        heads = torch.arange(self.num_heads, dtype=torch.float32)
        direction = torch.where(heads % 2 == 0, 1.0, -1.0) * (1 + heads // 2)
        steps = torch.arange(1, self.num_points + 1, dtype=torch.float32)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_((direction[:, None] * steps[None, :]).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def sampling_locations(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampling positions in slice units ``(B, N, M, K)`` and their softmax weights ``(B, N, M, K)``."""
        batch, num_slices, _ = query.shape
        shape = (batch, num_slices, self.num_heads, self.num_points)
        offsets = self.sampling_offsets(query).view(shape)
        weights = self.attention_weights(query).view(shape).softmax(dim=-1)
        reference = torch.arange(num_slices, device=query.device, dtype=offsets.dtype).view(1, num_slices, 1, 1)
        return reference + offsets, weights

    def _interpolation_rows(
        self, locations: torch.Tensor, weights: torch.Tensor, batch: int, num_slices: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the flattened value table ``(B*N*M, head_dim)`` and their coefficients, both ``(B*N*M, 2K)``.

        Each sampling point reads its two neighbouring slices with linear-interpolation weights times its attention
        weight; neighbours outside ``[0, N)`` get coefficient 0 (zero padding). Row of (sample b, slice s, head m):
        ``(b * N + s) * M + m``.
        """
        lower = locations.floor()
        upper_fraction = locations - lower  # carries the gradient to the offsets
        neighbours = torch.stack((lower, lower + 1), dim=-1).long()  # (B, N, M, K, 2)
        coefficients = torch.stack((1.0 - upper_fraction, upper_fraction), dim=-1) * weights[..., None]
        coefficients = coefficients * ((neighbours >= 0) & (neighbours < num_slices))
        neighbours = neighbours.clamp(0, num_slices - 1)
        sample = torch.arange(batch, device=locations.device).view(batch, 1, 1, 1, 1)
        head = torch.arange(self.num_heads, device=locations.device).view(1, 1, self.num_heads, 1, 1)
        rows = (sample * num_slices + neighbours) * self.num_heads + head
        return rows.view(-1, 2 * self.num_points), coefficients.view(-1, 2 * self.num_points)

    def forward(
        self, query: torch.Tensor, value: torch.Tensor | None = None, slice_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        value = query if value is None else value
        batch, num_slices, _ = query.shape
        values = self.value_proj(value)
        if slice_valid is not None:
            values = values.masked_fill(~slice_valid[..., None], 0.0)
        locations, weights = self.sampling_locations(query)
        rows, coefficients = self._interpolation_rows(locations, weights, batch, num_slices)
        table = values.reshape(batch * num_slices * self.num_heads, self.head_dim)
        # one weighted sum of 2K value rows per (sample, slice, head): bags come out as (B, N, M, head_dim)
        attended = F.embedding_bag(rows, table, per_sample_weights=coefficients.to(table.dtype), mode="sum")
        output = self.output_proj(attended.view(batch, num_slices, self.embed_dim))
        if slice_valid is not None:
            output = output.masked_fill(~slice_valid[..., None], 0.0)
        return output

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_points={self.num_points}"
