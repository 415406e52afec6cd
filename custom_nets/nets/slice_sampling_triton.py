"""Fused Triton kernels for deformable sampling along the slice axis (``f_inter``'s attention, arXiv 2212.01893).

Same function as :func:`custom_nets.nets.slice_sampling.slice_sampling_reference`, in one kernel per pass:

* forward: per row ``(b, n, m)`` the softmax of the ``K`` logits, the ``K`` read positions ``n + offset``, the two
  neighbouring value rows of each (zero outside ``[0, N)`` or on invalid slices) and their weighted sum;
* backward: from the output gradient ``g``, the gradients of the logits (through the softmax), of the offsets
  (``weight * g . (v_upper - v_lower)``) and of the values (``coefficient * g``, added with float32 atomics).

Offsets and logits are read from, and their gradients written to, one ``(B, N, 2, M, K)`` tensor (the output of the
attention's single sampling projection), so no copy splits it.

Programs handle ``BLOCK_ROWS`` rows of ``(b, n, m)`` times the whole head width. Arithmetic is float32 whatever the
dtype of the values. The kernels also run on CPU tensors under ``TRITON_INTERPRET=1`` (the tests do that).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["triton_slice_sampling"]

TILE_ELEMENTS = 2048  # BLOCK_ROWS * BLOCK_DIM per program


@triton.jit
def _point_read(
    values_ptr,
    valid_ptr,
    location,
    sample_start,
    head,
    dims,
    row_mask,
    dim_mask,
    num_slices,
    num_heads,
    head_dim,
    HAS_VALID: tl.constexpr,
):
    """Lower and upper neighbour of a read position: slice index, in-volume mask, value tile (float32)."""
    lower_float = tl.floor(location)
    lower = lower_float.to(tl.int64)
    upper = lower + 1
    lower_inside = row_mask & (lower >= 0) & (lower < num_slices)
    upper_inside = row_mask & (upper >= 0) & (upper < num_slices)
    if HAS_VALID:
        lower_inside = lower_inside & (tl.load(valid_ptr + sample_start + lower, mask=lower_inside, other=0) != 0)
        upper_inside = upper_inside & (tl.load(valid_ptr + sample_start + upper, mask=upper_inside, other=0) != 0)
    lower_rows = ((sample_start + lower) * num_heads + head) * head_dim
    upper_rows = ((sample_start + upper) * num_heads + head) * head_dim
    lower_tile = lower_inside[:, None] & dim_mask[None, :]
    upper_tile = upper_inside[:, None] & dim_mask[None, :]
    lower_values = tl.load(values_ptr + lower_rows[:, None] + dims[None, :], mask=lower_tile, other=0.0)
    upper_values = tl.load(values_ptr + upper_rows[:, None] + dims[None, :], mask=upper_tile, other=0.0)
    return (
        location - lower_float,
        lower_rows,
        upper_rows,
        lower_tile,
        upper_tile,
        lower_values.to(tl.float32),
        upper_values.to(tl.float32),
    )


@triton.jit
def _softmax_rows(logits_ptr, point_rows, point_mask):
    """Softmax over the points of each row: ``(BLOCK_ROWS, BLOCK_POINTS)`` float32, zero on padding points."""
    logits = tl.load(logits_ptr + point_rows, mask=point_mask, other=float("-inf")).to(tl.float32)
    largest = tl.max(logits, axis=1)
    largest = tl.where(largest == float("-inf"), 0.0, largest)  # rows beyond the end: all points masked
    exponentials = tl.where(point_mask, tl.exp(logits - largest[:, None]), 0.0)
    total = tl.sum(exponentials, axis=1)
    return exponentials / tl.where(total > 0, total, 1.0)[:, None]


@triton.jit
def _sampling_forward_kernel(
    values_ptr,
    offsets_ptr,
    logits_ptr,
    valid_ptr,
    output_ptr,
    num_rows,
    num_slices,
    num_heads,
    head_dim,
    HAS_VALID: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    BLOCK_POINTS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < num_rows
    dims = tl.arange(0, BLOCK_DIM)
    dim_mask = dims < head_dim
    points = tl.arange(0, BLOCK_POINTS)
    point_mask = row_mask[:, None] & (points[None, :] < NUM_POINTS)
    head = rows % num_heads
    sample_slice = rows // num_heads
    query_slice = sample_slice % num_slices
    sample_start = sample_slice - query_slice
    parameter_rows = sample_slice * (2 * num_heads * NUM_POINTS) + head * NUM_POINTS
    weights = _softmax_rows(logits_ptr, parameter_rows[:, None] + points[None, :], point_mask)
    accumulated = tl.zeros((BLOCK_ROWS, BLOCK_DIM), dtype=tl.float32)
    for point in tl.static_range(NUM_POINTS):
        weight = tl.sum(tl.where(points[None, :] == point, weights, 0.0), axis=1)
        offset = tl.load(offsets_ptr + parameter_rows + point, mask=row_mask, other=0.0).to(tl.float32)
        fraction, _, _, _, _, lower_values, upper_values = _point_read(
            values_ptr,
            valid_ptr,
            query_slice.to(tl.float32) + offset,
            sample_start,
            head,
            dims,
            row_mask,
            dim_mask,
            num_slices,
            num_heads,
            head_dim,
            HAS_VALID,
        )
        accumulated += (weight * (1.0 - fraction))[:, None] * lower_values + (weight * fraction)[:, None] * upper_values
    tile = row_mask[:, None] & dim_mask[None, :]
    output = output_ptr + rows[:, None] * head_dim + dims[None, :]
    tl.store(output, accumulated.to(output_ptr.dtype.element_ty), mask=tile)


@triton.jit
def _sampling_backward_kernel(
    grad_output_ptr,
    values_ptr,
    offsets_ptr,
    logits_ptr,
    valid_ptr,
    grad_values_ptr,
    grad_offsets_ptr,
    grad_logits_ptr,
    num_rows,
    num_slices,
    num_heads,
    head_dim,
    HAS_VALID: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    BLOCK_POINTS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < num_rows
    dims = tl.arange(0, BLOCK_DIM)
    dim_mask = dims < head_dim
    points = tl.arange(0, BLOCK_POINTS)
    point_mask = row_mask[:, None] & (points[None, :] < NUM_POINTS)
    head = rows % num_heads
    sample_slice = rows // num_heads
    query_slice = sample_slice % num_slices
    sample_start = sample_slice - query_slice
    parameter_rows = sample_slice * (2 * num_heads * NUM_POINTS) + head * NUM_POINTS
    point_rows = parameter_rows[:, None] + points[None, :]
    tile = row_mask[:, None] & dim_mask[None, :]
    grad_output = tl.load(grad_output_ptr + rows[:, None] * head_dim + dims[None, :], mask=tile, other=0.0)
    grad_output = grad_output.to(tl.float32)
    weights = _softmax_rows(logits_ptr, point_rows, point_mask)
    grad_weights = tl.zeros((BLOCK_ROWS, BLOCK_POINTS), dtype=tl.float32)
    for point in tl.static_range(NUM_POINTS):
        weight = tl.sum(tl.where(points[None, :] == point, weights, 0.0), axis=1)
        offset = tl.load(offsets_ptr + parameter_rows + point, mask=row_mask, other=0.0).to(tl.float32)
        fraction, lower_rows, upper_rows, lower_tile, upper_tile, lower_values, upper_values = _point_read(
            values_ptr,
            valid_ptr,
            query_slice.to(tl.float32) + offset,
            sample_start,
            head,
            dims,
            row_mask,
            dim_mask,
            num_slices,
            num_heads,
            head_dim,
            HAS_VALID,
        )
        lower_dot = tl.sum(grad_output * lower_values, axis=1)
        upper_dot = tl.sum(grad_output * upper_values, axis=1)
        grad_weight = (1.0 - fraction) * lower_dot + fraction * upper_dot
        grad_weights = tl.where(points[None, :] == point, grad_weight[:, None], grad_weights)
        tl.store(grad_offsets_ptr + parameter_rows + point, weight * (upper_dot - lower_dot), mask=row_mask)
        lower_target = grad_values_ptr + lower_rows[:, None] + dims[None, :]
        upper_target = grad_values_ptr + upper_rows[:, None] + dims[None, :]
        tl.atomic_add(lower_target, (weight * (1.0 - fraction))[:, None] * grad_output, mask=lower_tile)
        tl.atomic_add(upper_target, (weight * fraction)[:, None] * grad_output, mask=upper_tile)
    weighted_mean = tl.sum(weights * grad_weights, axis=1)
    grad_logits = weights * (grad_weights - weighted_mean[:, None])
    tl.store(grad_logits_ptr + point_rows, grad_logits, mask=point_mask)


def _launch_shape(values: torch.Tensor, num_points: int) -> dict[str, int]:
    block_dim = triton.next_power_of_2(values.shape[-1])
    return {
        "NUM_POINTS": num_points,
        "BLOCK_POINTS": triton.next_power_of_2(num_points),
        "BLOCK_ROWS": max(1, TILE_ELEMENTS // block_dim),
        "BLOCK_DIM": block_dim,
    }


def _launch(kernel, arguments: tuple, values: torch.Tensor, num_points: int, has_valid: bool) -> None:
    batch, num_slices, num_heads, head_dim = values.shape
    num_rows = batch * num_slices * num_heads
    shape = _launch_shape(values, num_points)
    grid = (triton.cdiv(num_rows, shape["BLOCK_ROWS"]),)
    kernel[grid](*arguments, num_rows, num_slices, num_heads, head_dim, HAS_VALID=has_valid, **shape)


@torch.library.custom_op("custom_nets::slice_sampling", mutates_args=())
def slice_sampling_op(values: torch.Tensor, parameters: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Forward kernel as an operator: values ``(B, N, M, D)``, parameters ``(B, N, 2, M, K)`` and ``valid``
    ``(B, N)`` int8 or None, all contiguous; returns ``(B, N, M, D)`` in the dtype of ``values``."""
    output = torch.empty_like(values)
    arguments = (values, parameters[:, :, 0], parameters[:, :, 1], values if valid is None else valid, output)
    _launch(_sampling_forward_kernel, arguments, values, parameters.shape[-1], valid is not None)
    return output


@slice_sampling_op.register_fake
def _(values: torch.Tensor, parameters: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    return torch.empty_like(values)


@torch.library.custom_op("custom_nets::slice_sampling_backward", mutates_args=())
def slice_sampling_backward_op(
    grad_output: torch.Tensor, values: torch.Tensor, parameters: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward kernel as an operator: the float32 gradients of ``values`` and ``parameters`` (same shapes)."""
    grad_values = torch.zeros(values.shape, device=values.device, dtype=torch.float32)
    grad_parameters = torch.empty(parameters.shape, device=parameters.device, dtype=torch.float32)
    arguments = (
        grad_output,
        values,
        parameters[:, :, 0],
        parameters[:, :, 1],
        values if valid is None else valid,
        grad_values,
        grad_parameters[:, :, 0],
        grad_parameters[:, :, 1],
    )
    _launch(_sampling_backward_kernel, arguments, values, parameters.shape[-1], valid is not None)
    return grad_values, grad_parameters


@slice_sampling_backward_op.register_fake
def _(
    grad_output: torch.Tensor, values: torch.Tensor, parameters: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return values.new_empty(values.shape, dtype=torch.float32), parameters.new_empty(
        parameters.shape, dtype=torch.float32
    )


def _setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
    values, parameters, valid = ctx.saved_tensors
    grad_values, grad_parameters = slice_sampling_backward_op(grad_output.contiguous(), values, parameters, valid)
    return grad_values.to(values.dtype), grad_parameters.to(parameters.dtype), None


slice_sampling_op.register_autograd(_backward, setup_context=_setup_context)


def triton_slice_sampling(
    values: torch.Tensor, sampling_parameters: torch.Tensor, slice_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Fused :func:`custom_nets.nets.slice_sampling.deformable_slice_sampling` (same shapes and semantics).

    The kernels run as the operators ``torch.ops.custom_nets.slice_sampling`` and ``slice_sampling_backward``
    (``torch.library`` custom ops with fake tensor rules), so ``torch.compile`` traces through them without a graph
    break and CUDA graphs capture them (neither makes the host wait for the device)."""
    valid = None if slice_valid is None else slice_valid.to(device=values.device, dtype=torch.int8).contiguous()
    return slice_sampling_op(values.contiguous(), sampling_parameters.contiguous(), valid)
