"""JointLoss: weighted sum of the configured terms, batches with 2D items, volumes or both, logged terms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from custom_nets.losses import DeepClusterV2Loss, JointLoss, MaskedSlicePredictionLoss, SwAVLoss


def _two_d_part(generator: torch.Generator, items: int = 6) -> dict:
    projections = [F.normalize(torch.randn(m, 8, generator=generator), dim=1) for m in (items, items, 2)]
    prototypes = F.normalize(torch.randn(5, 8, generator=generator), dim=1)
    return {
        "intra_projection": projections,
        "intra_scores": [[(p @ prototypes.t()).requires_grad_() for p in projections]],
    }


def _volume_part(generator: torch.Generator, volumes: int = 2) -> dict:
    projections = [F.normalize(torch.randn(volumes, 6, generator=generator), dim=1) for _ in range(2)]
    prototypes = F.normalize(torch.randn(3, 6, generator=generator), dim=1)
    slice_mask = torch.zeros(volumes, 4, dtype=torch.bool)
    slice_mask[:, 1] = True
    return {
        "inter_projection": projections,
        "inter_scores": [[(p @ prototypes.t()).requires_grad_() for p in projections]],
        "mask_prediction": torch.randn(2, volumes, 4, 6, generator=generator).requires_grad_(),
        "mask_target": torch.randn(2, volumes, 4, 6, generator=generator),
        "slice_mask": slice_mask,
        "slice_valid": torch.ones(volumes, 4, dtype=torch.bool),
    }


def _components():
    return SwAVLoss(), SwAVLoss(), MaskedSlicePredictionLoss()


def test_weighted_sum_of_all_terms_and_logged_terms():
    generator = torch.Generator().manual_seed(0)
    prediction = {**_two_d_part(generator), **_volume_part(generator)}
    intra, inter, mask = _components()
    loss_fn = JointLoss(intra=intra, inter=inter, mask=mask, w_intra=1.0, w_inter=0.5, w_mask=2.0)
    total = loss_fn(prediction, {"intra_index": torch.arange(6), "inter_index": torch.arange(2)})
    expected_intra = intra(prediction["intra_projection"], prediction["intra_scores"])
    expected_inter = inter(prediction["inter_projection"], prediction["inter_scores"])
    expected_mask = mask(
        prediction["mask_prediction"], prediction["mask_target"], prediction["slice_mask"], prediction["slice_valid"]
    )
    torch.testing.assert_close(total, expected_intra + 0.5 * expected_inter + 2.0 * expected_mask)
    assert total.ndim == 0 and total.requires_grad
    assert set(loss_fn.terms) == {"intra", "inter", "mask", "total"}
    torch.testing.assert_close(loss_fn.terms["inter"], expected_inter.detach())
    assert all(not value.requires_grad for value in loss_fn.terms.values())
    total.backward()
    assert prediction["mask_prediction"].grad is not None and prediction["inter_scores"][0][0].grad is not None


def test_batch_with_only_2d_items_skips_volume_terms():
    prediction = _two_d_part(torch.Generator().manual_seed(1))
    loss_fn = JointLoss(*_components())
    total = loss_fn(prediction, {"intra_index": torch.arange(6), "inter_index": torch.zeros(0, dtype=torch.long)})
    torch.testing.assert_close(total, loss_fn.terms["intra"])
    assert float(loss_fn.terms["inter"]) == 0.0 and float(loss_fn.terms["mask"]) == 0.0


def test_batch_with_only_volumes_skips_the_2d_term():
    generator = torch.Generator().manual_seed(2)
    prediction = {"intra_projection": [], "intra_scores": [[]], **_volume_part(generator)}
    loss_fn = JointLoss(*_components())
    total = loss_fn(prediction, {"inter_index": torch.arange(2)})
    assert float(loss_fn.terms["intra"]) == 0.0
    torch.testing.assert_close(total, loss_fn.terms["inter"] + loss_fn.terms["mask"])


def test_deepcluster_components_receive_the_global_ids():
    generator = torch.Generator().manual_seed(3)
    prediction = {**_two_d_part(generator), **_volume_part(generator)}
    intra = DeepClusterV2Loss(num_items=20, embedding_dim=8, num_heads=1)
    inter = DeepClusterV2Loss(num_items=4, embedding_dim=6, num_heads=1)
    loss_fn = JointLoss(intra=intra, inter=inter)
    loss_fn(prediction, {"intra_index": torch.arange(6) + 10, "inter_index": torch.tensor([3, 1])})
    assert intra.bank_fresh.nonzero().squeeze(1).tolist() == list(range(10, 16))
    assert inter.bank_fresh.nonzero().squeeze(1).tolist() == [1, 3]
    torch.testing.assert_close(inter.bank[1, 3], prediction["inter_projection"][1][0])


def test_no_applicable_term_is_a_clear_error():
    prediction = _two_d_part(torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="no configured loss term"):
        JointLoss(mask=MaskedSlicePredictionLoss())(prediction, {})
    with pytest.raises(ValueError, match="at least one"):
        JointLoss()
