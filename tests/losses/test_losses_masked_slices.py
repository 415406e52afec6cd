"""Masked slice prediction loss: zero at the target, blind to unselected positions, options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from custom_nets.losses import MaskedSlicePredictionLoss


def _inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    target = torch.randn(2, 3, 5, 4, generator=generator)
    prediction = torch.randn(2, 3, 5, 4, generator=generator)
    slice_valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    slice_mask = torch.tensor([[0, 1, 0, 0, 1], [1, 0, 0, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    return prediction, target, slice_mask, slice_valid


def test_zero_when_prediction_equals_target():
    _, target, slice_mask, slice_valid = _inputs()
    for distance in ("mse", "cosine"):
        loss = MaskedSlicePredictionLoss(distance=distance)(target.clone(), target, slice_mask, slice_valid)
        assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_unchanged_by_unmasked_positions_in_value_and_gradient():
    prediction, target, slice_mask, slice_valid = _inputs()
    loss_fn = MaskedSlicePredictionLoss()
    changed = prediction.clone()
    changed[:, ~slice_mask] = float("nan")
    changed_target = target.clone()
    changed_target[:, ~slice_mask] = 1e6
    first = prediction.clone().requires_grad_()
    second = changed.clone().requires_grad_()
    loss_a = loss_fn(first, target, slice_mask, slice_valid)
    loss_b = loss_fn(second, changed_target, slice_mask, slice_valid)
    torch.testing.assert_close(loss_a, loss_b)
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(first.grad, second.grad)
    assert (first.grad[:, ~slice_mask] == 0).all()


def test_masked_mse_matches_hand_computation_and_all_positions_option():
    prediction, target, slice_mask, slice_valid = _inputs()
    squared = (prediction - target).pow(2).mean(dim=-1)  # (V, B, N)
    masked = squared[:, slice_mask & slice_valid].mean()
    every_valid = squared[:, slice_valid].mean()
    torch.testing.assert_close(MaskedSlicePredictionLoss()(prediction, target, slice_mask, slice_valid), masked)
    loss_all = MaskedSlicePredictionLoss(positions="all")(prediction, target, slice_mask, slice_valid)
    torch.testing.assert_close(loss_all, every_valid)


def test_cosine_distance_and_single_view_shape():
    prediction, target, slice_mask, slice_valid = _inputs()
    loss = MaskedSlicePredictionLoss(distance="cosine")(prediction[0], target[0], slice_mask, slice_valid)
    expected = (1 - F.cosine_similarity(prediction[0], target[0], dim=-1))[slice_mask & slice_valid].mean()
    torch.testing.assert_close(loss, expected)


def test_padding_is_never_counted_and_target_is_detached():
    prediction, target, slice_mask, slice_valid = _inputs()
    padded_mask = slice_mask.clone()
    padded_mask[1, 4] = True  # a masked padding slice is ignored
    target = target.clone().requires_grad_()
    loss_fn = MaskedSlicePredictionLoss()
    loss = loss_fn(prediction, target, padded_mask, slice_valid)
    torch.testing.assert_close(loss, loss_fn(prediction, target, slice_mask, slice_valid))
    assert not loss.requires_grad


def test_no_selected_position_gives_connected_zero_and_bad_shapes_fail():
    prediction, target, slice_mask, slice_valid = _inputs()
    prediction.requires_grad_()
    loss = MaskedSlicePredictionLoss()(prediction, target, torch.zeros_like(slice_mask), slice_valid)
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    with pytest.raises(ValueError, match="slice_mask"):
        MaskedSlicePredictionLoss()(prediction, target, slice_mask[:, :4], slice_valid)
    with pytest.raises(ValueError, match="prediction and target"):
        MaskedSlicePredictionLoss()(prediction, target[0], slice_mask, slice_valid)
    with pytest.raises(ValueError, match="positions"):
        MaskedSlicePredictionLoss(positions="unmasked")
