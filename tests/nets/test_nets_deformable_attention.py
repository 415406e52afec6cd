"""DeformableSliceAttention: shapes, padding, exact reads, gradients, batch independence and linear memory."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from custom_nets.nets import DeformableSliceAttention


def make_attention(dim: int = 32, heads: int = 4, points: int = 2, seed: int = 0) -> DeformableSliceAttention:
    torch.manual_seed(seed)
    attention = DeformableSliceAttention(dim, heads, points)
    with torch.no_grad():  # non-trivial offsets and weights that depend on the query
        attention.sampling_proj.weight.normal_(std=0.3)
    return attention.eval()


@pytest.mark.parametrize("num_slices", [1, 2, 7, 64, 300])
def test_shapes(num_slices: int) -> None:
    attention = make_attention()
    tokens = torch.randn(2, num_slices, 32)
    assert attention(tokens).shape == (2, num_slices, 32)


def test_padding_does_not_change_valid_outputs() -> None:
    attention = make_attention()
    short = torch.randn(1, 5, 32)
    padded = torch.cat([short, 100 * torch.randn(1, 4, 32)], dim=1)  # garbage in the padding
    valid = torch.tensor([[True] * 5 + [False] * 4])
    expected = attention(short)
    out = attention(padded, slice_valid=valid)
    torch.testing.assert_close(out[:, :5], expected, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(out[:, 5:]) == 0


def test_mixed_lengths_in_one_batch_match_single_runs() -> None:
    attention = make_attention()
    first, second = torch.randn(1, 7, 32), torch.randn(1, 3, 32)
    batch = torch.zeros(2, 7, 32)
    batch[0], batch[1, :3] = first[0], second[0]
    valid = torch.zeros(2, 7, dtype=torch.bool)
    valid[0], valid[1, :3] = True, True
    out = attention(batch, slice_valid=valid)
    torch.testing.assert_close(out[0:1], attention(first), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1:2, :3], attention(second), rtol=1e-5, atol=1e-5)


def test_zero_offsets_single_point_reads_reference_slice() -> None:
    attention = DeformableSliceAttention(16, num_heads=2, num_points=1).eval()
    with torch.no_grad():
        attention.sampling_proj.weight.zero_()
        attention.sampling_proj.bias[:2].zero_()  # the offsets of both heads (the logits follow)
    tokens = torch.randn(3, 11, 16)
    expected = attention.output_proj(attention.value_proj(tokens))
    torch.testing.assert_close(attention(tokens), expected, rtol=1e-5, atol=1e-5)


def test_fractional_offset_interpolates_linearly() -> None:
    attention = DeformableSliceAttention(8, num_heads=1, num_points=1).eval()
    with torch.no_grad():
        attention.sampling_proj.weight.zero_()
        attention.sampling_proj.bias[0] = 0.25  # the one offset (index 1 is the one logit)
        attention.value_proj.weight.copy_(torch.eye(8))
        attention.output_proj.weight.copy_(torch.eye(8))
    tokens = torch.randn(1, 4, 8)
    out = attention(tokens)
    expected = 0.75 * tokens[:, :3] + 0.25 * tokens[:, 1:]
    torch.testing.assert_close(out[:, :3], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 3], 0.75 * tokens[:, 3], rtol=1e-5, atol=1e-5)  # beyond the end reads zeros


def test_gradients_reach_offsets_and_weights() -> None:
    attention = make_attention().train()
    attention(torch.randn(2, 9, 32)).square().sum().backward()
    offset_rows, logit_rows = attention.sampling_proj.weight.grad.view(2, -1, 32)
    assert offset_rows.abs().sum() > 0 and logit_rows.abs().sum() > 0


def test_initial_offsets_and_uniform_weights() -> None:
    attention = DeformableSliceAttention(16, num_heads=4, num_points=2)
    locations, weights = attention.sampling_locations(torch.randn(1, 5, 16))
    expected = torch.tensor([[1.0, 2.0], [-1.0, -2.0], [2.0, 4.0], [-2.0, -4.0]])  # head m: +-(k+1) * (1 + m // 2)
    torch.testing.assert_close(locations[0, 0], expected)
    torch.testing.assert_close(weights, torch.full_like(weights, 0.5))


def test_weights_saved_with_two_sampling_projections_load() -> None:
    """Earlier versions had sampling_offsets and attention_weights; their files load into sampling_proj, exactly."""
    attention = make_attention()
    state = attention.state_dict()
    legacy = {k: v for k, v in state.items() if not k.startswith("sampling_proj")}
    for tensor in ("weight", "bias"):
        offsets, logits = state[f"sampling_proj.{tensor}"].chunk(2)
        legacy[f"sampling_offsets.{tensor}"], legacy[f"attention_weights.{tensor}"] = offsets, logits
    loaded = DeformableSliceAttention(32, 4, 2)
    loaded.load_state_dict(legacy)  # strict: no key missing or left over
    tokens = torch.randn(2, 6, 32)
    torch.testing.assert_close(loaded.eval()(tokens), attention(tokens))


def test_sample_independent_of_batch() -> None:
    attention = make_attention()
    batch = torch.randn(4, 6, 32)
    torch.testing.assert_close(attention(batch)[2:3], attention(batch[2:3]), rtol=1e-5, atol=1e-5)


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any operator produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.numel())
        return out


def test_never_allocates_n_by_n() -> None:
    num_slices, dim = 2048, 32
    attention = make_attention(dim=dim, heads=2, points=2).train()
    tokens = torch.randn(1, num_slices, dim, requires_grad=True)
    with LargestTensor() as recorder:
        attention(tokens).sum().backward()
    assert recorder.largest < num_slices * num_slices / 16
    assert recorder.largest <= num_slices * dim * 2  # linear in N: tokens x points
