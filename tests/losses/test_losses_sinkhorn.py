"""Sinkhorn-Knopp codes: marginals, precision handling, numerical safety."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from custom_nets.losses import sinkhorn_knopp


def _unit_scores(items: int, prototypes: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(items, dim, generator=generator), dim=1)
    c = F.normalize(torch.randn(prototypes, dim, generator=generator), dim=1)
    return z @ c.t()


def test_marginals_are_uniform():
    scores = _unit_scores(96, 12)
    codes = sinkhorn_knopp(scores, epsilon=0.05, iterations=200)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(96), atol=1e-4, rtol=0)
    torch.testing.assert_close(codes.sum(dim=0), torch.full((12,), 96 / 12), atol=1e-4, rtol=0)
    assert (codes >= 0).all()


def test_three_iterations_give_exact_item_marginal_and_move_prototype_marginal_towards_uniform():
    scores = _unit_scores(64, 8)
    codes = sinkhorn_knopp(scores)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(64), atol=1e-5, rtol=0)

    def imbalance(q: torch.Tensor) -> float:
        return float((q.sum(dim=0) - 64 / 8).abs().max())

    softmax_codes = torch.softmax(scores / 0.05, dim=1)
    assert imbalance(codes) < imbalance(sinkhorn_knopp(scores, iterations=1))
    assert imbalance(codes) < imbalance(softmax_codes)


def test_matches_plain_double_precision_reference():
    scores = _unit_scores(40, 7)
    q = torch.exp(scores.double() / 0.05).t()
    q = q / q.sum()
    for _ in range(3):
        q = q / q.sum(dim=1, keepdim=True) / 7
        q = q / q.sum(dim=0, keepdim=True) / 40
    reference = (q * 40).t()
    torch.testing.assert_close(sinkhorn_knopp(scores).double(), reference, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_computed_in_float32(dtype):
    scores = _unit_scores(128, 30)
    low = scores.to(dtype)
    codes = sinkhorn_knopp(low)
    assert codes.dtype == torch.float32
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes, sinkhorn_knopp(low.float()), atol=0, rtol=0)


def test_large_scores_do_not_overflow_and_shift_does_not_matter():
    scores = _unit_scores(32, 6)
    torch.testing.assert_close(sinkhorn_knopp(scores + 1.0), sinkhorn_knopp(scores), atol=1e-6, rtol=1e-5)
    wild = scores * 500.0  # exp(x / eps) would overflow without the max subtraction
    codes = sinkhorn_knopp(wild)
    assert torch.isfinite(codes).all()


def test_does_not_track_gradients_and_rejects_bad_shapes():
    scores = _unit_scores(8, 4).requires_grad_()
    assert not sinkhorn_knopp(scores).requires_grad
    with pytest.raises(ValueError, match="items, prototypes"):
        sinkhorn_knopp(torch.zeros(4))
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_knopp(torch.zeros(2, 3), epsilon=0.0)


def test_leading_dimensions_are_independent_problems():
    problems = torch.stack([_unit_scores(8, 4), 3.0 * _unit_scores(8, 4).flip(0), torch.zeros(8, 4)])
    batched = sinkhorn_knopp(problems.view(3, 1, 8, 4), iterations=5)
    assert batched.shape == (3, 1, 8, 4)
    for index, scores in enumerate(problems):
        torch.testing.assert_close(batched[index, 0], sinkhorn_knopp(scores, iterations=5), atol=1e-7, rtol=1e-6)
    empty = sinkhorn_knopp(torch.zeros(2, 0, 4))
    assert empty.shape == (2, 0, 4)
