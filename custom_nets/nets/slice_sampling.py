"""Deformable sampling along the slice axis: the core of ``f_inter``'s attention (arXiv 2212.01893).

Two implementations of one function, chosen by :func:`deformable_slice_sampling`:

* ``"torch"``: the reference, plain PyTorch (one ``F.embedding_bag`` weighted sum per query and head, computed in
  float32 whatever the input dtype). It runs on any device and is the test reference.
* ``"triton"``: one fused Triton kernel for the forward pass and one for the backward pass
  (:mod:`custom_nets.nets.slice_sampling_triton`), reading offsets and logits in place from the projection's output.
  The reference launches about 30 small kernels per pass, which makes
  it launch-bound on a GPU at the slice counts of real volumes; the fused path launches one (plus a zero fill in the
  backward pass). Values may be float32, bfloat16 or float16; sampling arithmetic and accumulation are float32.

``"auto"`` (the default) takes the Triton path for CUDA tensors when Triton is installed and
``torch.are_deterministic_algorithms_enabled()`` is off (its backward pass accumulates value gradients with atomic
adds, so float32 sums may differ in the last bits from run to run), and the reference otherwise.
"""

from __future__ import annotations

import importlib.util
from functools import cache

import torch
import torch.nn.functional as F

__all__ = ["SAMPLING_BACKENDS", "deformable_slice_sampling", "resolve_sampling_backend", "slice_sampling_reference"]

SAMPLING_BACKENDS = ("auto", "torch", "triton")


@cache
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (it ships with the CUDA builds of torch)."""
    return importlib.util.find_spec("triton") is not None


def resolve_sampling_backend(backend: str, values: torch.Tensor) -> str:
    """The implementation ``backend`` means for these values: ``"torch"`` or ``"triton"``."""
    if backend not in SAMPLING_BACKENDS:
        raise ValueError(f"sampling backend must be one of {SAMPLING_BACKENDS}, got {backend!r}.")
    if backend != "auto":
        return backend
    fused = values.is_cuda and triton_available() and not torch.are_deterministic_algorithms_enabled()
    return "triton" if fused else "torch"


def deformable_slice_sampling(
    values: torch.Tensor,
    sampling_parameters: torch.Tensor,
    slice_valid: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention-weighted reads of ``values`` at fractional slice positions, per query slice and head.

    ``sampling_parameters[:, :, 0]`` holds the offsets and ``sampling_parameters[:, :, 1]`` the attention logits (the
    layout of one linear projection to ``2 * M * K`` features, viewed as ``(B, N, 2, M, K)``). For query slice ``n``,
    head ``m`` and point ``k`` the read position is ``n + offsets[b, n, m, k]`` (slice units) and its weight is
    ``softmax_k(logits[b, n, m, :])``. A position between two slices reads both by linear interpolation; a slice
    outside ``[0, N)`` or marked False in ``slice_valid`` reads zeros and receives no gradient.

    Shapes:
        values ``(B, N, M, D)``; sampling_parameters ``(B, N, 2, M, K)``; slice_valid ``(B, N)`` bool or None;
        returns ``(B, N, M, D)`` in the dtype of ``values``.
    """
    expected = (*values.shape[:2], 2, values.shape[2]) if values.dim() == 4 else None
    if expected is None or sampling_parameters.dim() != 5 or tuple(sampling_parameters.shape[:4]) != expected:
        raise ValueError(
            f"expected values (B, N, M, D) and sampling parameters (B, N, 2, M, K) (offsets, then logits); got "
            f"{tuple(values.shape)} and {tuple(sampling_parameters.shape)}."
        )
    if resolve_sampling_backend(backend, values) == "triton":
        from custom_nets.nets.slice_sampling_triton import triton_slice_sampling

        return triton_slice_sampling(values, sampling_parameters, slice_valid)
    offsets, logits = sampling_parameters.unbind(2)
    return slice_sampling_reference(values, offsets, logits, slice_valid)


def slice_sampling_reference(
    values: torch.Tensor, offsets: torch.Tensor, logits: torch.Tensor, slice_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain-PyTorch :func:`deformable_slice_sampling`: one ``F.embedding_bag`` weighted sum of ``2K`` value rows.

    Computed in float32 (``embedding_bag`` has no reduced-precision backward on CUDA); the result is cast back.
    """
    batch, num_slices, num_heads, head_dim = values.shape
    table = values.float()
    if slice_valid is not None:
        table = table.masked_fill(~slice_valid[:, :, None, None], 0.0)
    reference = torch.arange(num_slices, device=values.device, dtype=torch.float32).view(1, num_slices, 1, 1)
    locations = reference + offsets.float()
    weights = logits.float().softmax(dim=-1)
    lower = locations.floor()
    upper_fraction = locations - lower  # carries the gradient to the offsets
    neighbours = torch.stack((lower, lower + 1), dim=-1).long()  # (B, N, M, K, 2)
    coefficients = torch.stack((1.0 - upper_fraction, upper_fraction), dim=-1) * weights[..., None]
    coefficients = coefficients * ((neighbours >= 0) & (neighbours < num_slices))
    neighbours = neighbours.clamp(0, num_slices - 1)
    sample = torch.arange(batch, device=values.device).view(batch, 1, 1, 1, 1)
    head = torch.arange(num_heads, device=values.device).view(1, 1, num_heads, 1, 1)
    rows = (sample * num_slices + neighbours) * num_heads + head  # row of (b, slice, m) in the flat table
    bag_size = 2 * offsets.shape[-1]
    attended = F.embedding_bag(
        rows.view(-1, bag_size),
        table.view(-1, head_dim),
        per_sample_weights=coefficients.view(-1, bag_size),
        mode="sum",
    )
    return attended.view(batch, num_slices, num_heads, head_dim).to(values.dtype)
