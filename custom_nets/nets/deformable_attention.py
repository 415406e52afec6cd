"""Multi-head deformable attention along the slice axis (``f_inter``'s attention, arXiv 2212.01893)."""

from __future__ import annotations

import torch
from torch import nn

from custom_nets.nets.slice_sampling import SAMPLING_BACKENDS, deformable_slice_sampling

__all__ = ["DeformableSliceAttention", "merge_sampling_projections"]

LEGACY_PROJECTIONS = ("sampling_offsets", "attention_weights")  # the two projections that sampling_proj replaces


def merge_sampling_projections(state: dict, prefix: str = "") -> dict:
    """Rewrite, in place, the weights of a :class:`DeformableSliceAttention` saved before its offset and
    attention-weight projections became one (``<prefix>sampling_offsets.*`` and ``<prefix>attention_weights.*`` ->
    ``<prefix>sampling_proj.*``, rows concatenated in that order), so that weight files from earlier versions load.
    With an empty ``prefix`` every attention layer in ``state`` is rewritten. Returns ``state``."""
    suffix = f"{LEGACY_PROJECTIONS[0]}.weight"
    for key in [k for k in state if k.startswith(prefix) and k.endswith(suffix)]:
        base = key[: -len(suffix)]
        for tensor in ("weight", "bias"):
            parts = [f"{base}{name}.{tensor}" for name in LEGACY_PROJECTIONS]
            if all(part in state for part in parts):
                state[f"{base}sampling_proj.{tensor}"] = torch.cat([state.pop(part) for part in parts])
    return state


class DeformableSliceAttention(nn.Module):
    """Deformable attention over the slices of a volume: each query reads a few learned positions, not all slices.

    For query slice ``i`` and head ``m``, ``num_points`` sampling locations ``ref_i + offset_mik`` (in slice units) and
    their weights (softmax over the points) are predicted from the query by one linear projection (``sampling_proj``:
    offsets and logits together, one kernel instead of two on a GPU; weight files with the two projections of earlier
    versions load, see :func:`merge_sampling_projections`). Values are read at these fractional slice positions by
    linear interpolation between the two neighbouring slices (:func:`deformable_slice_sampling`: a fused Triton kernel
    on CUDA, plain PyTorch elsewhere); positions outside the volume or on padding slices read zeros.
    Cost and memory are ``O(N * heads * points * d)``: no ``N x N`` tensor is ever formed, unlike dense attention.
    The sampling runs in float32 under autocast; the projections follow autocast.

    The authors' public code applies a 1D deformable attention with the 640 features as the sequence axis; here the
    sequence axis is the slice axis, and any number of slices works.

    Shapes:
        query ``(B, N, d)``; value ``(B, N, d)`` (defaults to ``query``); ``slice_valid`` ``(B, N)`` bool with
        False on padding; output ``(B, N, d)`` (zero on padding positions).

    Args:
        embed_dim: token width ``d``; divisible by ``num_heads``.
        num_heads: attention heads ``M`` (8 as in Deformable-DETR).
        num_points: sampling points ``K`` per head (4 as in Deformable-DETR).
        sampling_backend: ``"auto"`` (fused Triton kernels for CUDA tensors, PyTorch otherwise), ``"torch"`` or
            ``"triton"``; see :mod:`custom_nets.nets.slice_sampling`.

    References:
        arXiv 2212.01893 (f_inter); Zhu et al., "Deformable DETR", arXiv 2010.04159 (deformable attention).
    """

    def __init__(
        self, embed_dim: int = 640, num_heads: int = 8, num_points: int = 4, sampling_backend: str = "auto"
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}).")
        if sampling_backend not in SAMPLING_BACKENDS:
            raise ValueError(f"sampling_backend must be one of {SAMPLING_BACKENDS}, got {sampling_backend!r}.")
        self.sampling_backend = sampling_backend
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_points = num_points
        self.head_dim = embed_dim // num_heads
        self.sampling_proj = nn.Linear(embed_dim, 2 * num_heads * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Start every head looking at its own spread of neighbours: head m reads ``+-(k+1) * (1 + m // 2)`` slices,
        all points weighted alike."""
        heads = torch.arange(self.num_heads, dtype=torch.float32)
        direction = torch.where(heads % 2 == 0, 1.0, -1.0) * (1 + heads // 2)
        steps = torch.arange(1, self.num_points + 1, dtype=torch.float32)
        offsets = (direction[:, None] * steps[None, :]).flatten()
        nn.init.zeros_(self.sampling_proj.weight)
        with torch.no_grad():
            self.sampling_proj.bias.copy_(torch.cat([offsets, torch.zeros_like(offsets)]))
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def sampling_locations(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampling positions in slice units ``(B, N, M, K)`` and their softmax weights ``(B, N, M, K)``."""
        offsets, logits = self.sampling_parameters(query).unbind(2)
        reference = torch.arange(query.shape[1], device=query.device, dtype=torch.float32).view(1, -1, 1, 1)
        return reference + offsets.float(), logits.float().softmax(dim=-1)

    def sampling_parameters(self, query: torch.Tensor) -> torch.Tensor:
        """Offsets (slice units, relative to the query slice) and attention logits from one projection of the query:
        ``(B, N, 2, M, K)``, offsets at index 0 of dimension 2, logits at index 1."""
        return self.sampling_proj(query).view(*query.shape[:2], 2, self.num_heads, self.num_points)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        merge_sampling_projections(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self, query: torch.Tensor, value: torch.Tensor | None = None, slice_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        value = query if value is None else value
        batch, num_slices, _ = query.shape
        values = self.value_proj(value).view(batch, num_slices, self.num_heads, self.head_dim)
        parameters = self.sampling_parameters(query)
        attended = deformable_slice_sampling(values, parameters, slice_valid, backend=self.sampling_backend)
        output = self.output_proj(attended.view(batch, num_slices, self.embed_dim))
        if slice_valid is not None:
            output = output.masked_fill(~slice_valid[..., None], 0.0)
        return output

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_points={self.num_points}"
