"""DenseSwAVLoss and match_locations: hand-computed references, invariance to the order of locations, input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from custom_nets.losses import DenseSwAVLoss, JointLoss, SwAVLoss, match_locations, sinkhorn_knopp


def _features(generator: torch.Generator, items: int, locations: int, channels: int = 5) -> torch.Tensor:
    return torch.randn(items, locations, channels, generator=generator)


def test_match_locations_finds_each_location_in_a_permuted_and_rescaled_copy():
    generator = torch.Generator().manual_seed(0)
    query = _features(generator, 3, 6)
    permutation = torch.randperm(6, generator=generator)
    reference = 2.5 * query[:, permutation]  # reference[:, k] = query[:, permutation[k]]: cosine ignores the scale
    expected = permutation.argsort().expand(3, 6)
    torch.testing.assert_close(match_locations(query, reference), expected)


def test_match_locations_rejects_other_items_or_ranks():
    with pytest.raises(ValueError, match="same items"):
        match_locations(torch.zeros(2, 4, 3), torch.zeros(3, 4, 3))
    with pytest.raises(ValueError, match="same items"):
        match_locations(torch.zeros(2, 4), torch.zeros(2, 4))


def _reference_loss(scores, features, temperature=0.1, epsilon=0.05):
    """The loss written out one location at a time."""
    flat = [torch.cat([group.flatten(0, 1) for group in view]) for view in scores]
    total = []
    for assigned, other in ((0, 1), (1, 0)):
        codes = sinkhorn_knopp(flat[assigned], epsilon, 3, distributed=False)
        terms, offset = [], 0
        for group_scores, group_a, group_b in zip(scores[other], features[assigned], features[other], strict=True):
            items, locations = group_scores.shape[:2]
            for item in range(items):
                for location in range(locations):
                    similarity = F.cosine_similarity(group_b[item, location][None], group_a[item], dim=1)
                    target = codes[offset + item * locations + int(similarity.argmax())]
                    log_p = F.log_softmax(group_scores[item, location] / temperature, dim=0)
                    terms.append(-(target * log_p).sum())
            offset += items * locations
        total.append(torch.stack(terms).mean())
    return torch.stack(total).mean()


def _two_groups(generator: torch.Generator):
    sizes = ((3, 4), (2, 9))  # e.g. images with 2 x 2 maps, volume slices with 3 x 3 maps
    scores = [[torch.randn(m, n, 7, generator=generator, requires_grad=True) for m, n in sizes] for _ in range(2)]
    features = [[_features(generator, m, n) for m, n in sizes] for _ in range(2)]
    return scores, features


def test_dense_swav_equals_the_location_by_location_reference_and_trains_both_views():
    scores, features = _two_groups(torch.Generator().manual_seed(1))
    loss = DenseSwAVLoss(distributed=False)(scores, features)
    torch.testing.assert_close(loss, _reference_loss(scores, features))
    loss.backward()
    assert all(group.grad is not None and group.grad.abs().sum() > 0 for view in scores for group in view)


def test_dense_swav_does_not_depend_on_the_order_of_locations_within_a_view():
    scores, features = _two_groups(torch.Generator().manual_seed(2))
    permutations = [torch.randperm(group.shape[1]) for group in scores[1]]
    shuffled_scores = [scores[0], [g[:, p] for g, p in zip(scores[1], permutations, strict=True)]]
    shuffled_features = [features[0], [g[:, p] for g, p in zip(features[1], permutations, strict=True)]]
    loss = DenseSwAVLoss(distributed=False)
    torch.testing.assert_close(loss(shuffled_scores, shuffled_features), loss(scores, features))


def test_dense_swav_records_every_location_of_view_0_for_the_collapse_monitor():
    scores, features = _two_groups(torch.Generator().manual_seed(3))
    loss = DenseSwAVLoss(distributed=False)
    loss(scores, features)
    assert loss.num_prototypes == [7]
    assert loss.last_assignments[0].shape == (3 * 4 + 2 * 9,)


def test_dense_swav_rejects_mismatched_views():
    scores, features = _two_groups(torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="2 views"):
        DenseSwAVLoss()(scores[:1], features[:1])
    with pytest.raises(ValueError, match="same M and L"):
        DenseSwAVLoss()([scores[0], [scores[1][0][:, :3], scores[1][1]]], features)


def test_joint_loss_adds_the_weighted_dense_term_and_logs_it():
    generator = torch.Generator().manual_seed(5)
    scores, features = _two_groups(generator)
    projections = [F.normalize(torch.randn(m, 8, generator=generator), dim=1) for m in (4, 4)]
    prototypes = F.normalize(torch.randn(5, 8, generator=generator), dim=1)
    prediction = {
        "intra_projection": projections,
        "intra_scores": [[p @ prototypes.t() for p in projections]],
        "dense_scores": scores,
        "dense_features": features,
    }
    intra, dense = SwAVLoss(distributed=False), DenseSwAVLoss(distributed=False)
    joint = JointLoss(intra=intra, dense=dense, w_dense=0.5)
    total = joint(prediction)
    expected_dense = dense(scores, features)
    torch.testing.assert_close(total, intra(projections, prediction["intra_scores"]) + 0.5 * expected_dense)
    assert set(joint.terms) == {"intra", "inter", "mask", "dense", "total"}
    torch.testing.assert_close(joint.terms["dense"], expected_dense.detach())
