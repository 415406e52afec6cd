"""DenseSwAVLoss and match_locations: hand-computed references, invariance to the order of locations, input checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from custom_nets.losses import DenseSwAVLoss, JointLoss, SwAVLoss, match_locations, sinkhorn_knopp


def test_match_locations_pairs_the_same_points_and_rejects_points_the_other_view_misses():
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand(2, 6, 2, generator=generator) * 100.0
    permutation = torch.randperm(6, generator=generator)
    query = reference[:, permutation] + 0.5  # the same points, 0.7 px apart, in another order
    query[1, 0] = torch.tensor([500.0, 500.0])  # a point the reference view does not show
    index, valid = match_locations(query, reference, torch.tensor([4.0, 4.0]))
    torch.testing.assert_close(index[0], permutation)
    torch.testing.assert_close(index[1, 1:], permutation[1:])
    assert valid[0].all() and valid[1, 1:].all() and not valid[1, 0]
    # half a cell diagonal is the limit: 0.7 px apart matches with cells of 1 px (0.707), not of 0.9 px (0.636)
    assert match_locations(query[:1], reference[:1], torch.tensor([1.0]))[1].all()
    assert not match_locations(query[:1], reference[:1], torch.tensor([0.9]))[1].any()


def test_match_locations_rejects_other_items_or_shapes():
    with pytest.raises(ValueError, match="same items"):
        match_locations(torch.zeros(2, 4, 2), torch.zeros(3, 4, 2), torch.ones(3))
    with pytest.raises(ValueError, match="same items"):
        match_locations(torch.zeros(2, 4, 3), torch.zeros(2, 4, 3), torch.ones(2))


def _reference_loss(scores, coordinates, cells, temperature=0.1, epsilon=0.05):
    """The loss written out one location at a time."""
    flat = [torch.cat([group.flatten(0, 1) for group in view]) for view in scores]
    terms = []
    for assigned, other in ((0, 1), (1, 0)):
        codes = sinkhorn_knopp(flat[assigned], epsilon, 3, distributed=False)
        offset = 0
        for group in range(len(scores[0])):
            items, locations = scores[assigned][group].shape[:2]
            for item in range(items):
                for location in range(locations):
                    point = coordinates[other][group][item, location]
                    distances = (coordinates[assigned][group][item] - point).norm(dim=1)
                    if distances.min() > cells[assigned][group][item] * math.sqrt(0.5):
                        continue
                    target = codes[offset + item * locations + int(distances.argmin())]
                    log_p = F.log_softmax(scores[other][group][item, location] / temperature, dim=0)
                    terms.append(-(target * log_p).sum())
            offset += items * locations
    return torch.stack(terms).mean()


def _grid(side: int, cell: float) -> torch.Tensor:
    axis = (torch.arange(side, dtype=torch.float32) + 0.5) * cell
    return torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)


def _two_groups(generator: torch.Generator):
    """Images with 2 x 2 maps and slices with 3 x 3 maps; view 1 is shifted by about half a map in places."""
    sizes = ((3, 2, 8.0), (2, 3, 6.0))  # items, map side, cell side in source pixels
    scores = [[torch.randn(m, side**2, 7, generator=generator, requires_grad=True) for m, side, _ in sizes]]
    scores.append([torch.randn(m, side**2, 7, generator=generator, requires_grad=True) for m, side, _ in sizes])
    coordinates = [[_grid(side, cell).expand(m, -1, -1) for m, side, cell in sizes]]
    shift = [torch.rand(m, 1, 2, generator=generator) * side * cell * 0.6 for m, side, cell in sizes]
    coordinates.append([grid + offset for grid, offset in zip(coordinates[0], shift, strict=True)])
    cells = [[torch.full((m,), cell) for m, _, cell in sizes] for _ in range(2)]
    return scores, coordinates, cells


def test_dense_swav_equals_the_location_by_location_reference_and_trains_both_views():
    scores, coordinates, cells = _two_groups(torch.Generator().manual_seed(1))
    loss_fn = DenseSwAVLoss(distributed=False)
    loss = loss_fn(scores, coordinates, cells)
    torch.testing.assert_close(loss, _reference_loss(scores, coordinates, cells))
    assert 0.0 < loss_fn.last_matched_fraction < 1.0  # the shifts leave some locations unmatched
    loss.backward()
    assert all(group.grad is not None and group.grad.abs().sum() > 0 for view in scores for group in view)


def test_dense_swav_does_not_depend_on_the_order_of_locations_within_a_view():
    scores, coordinates, cells = _two_groups(torch.Generator().manual_seed(2))
    permutations = [torch.randperm(group.shape[1]) for group in scores[1]]
    shuffled_scores = [scores[0], [g[:, p] for g, p in zip(scores[1], permutations, strict=True)]]
    shuffled_coordinates = [coordinates[0], [g[:, p] for g, p in zip(coordinates[1], permutations, strict=True)]]
    loss = DenseSwAVLoss(distributed=False)
    torch.testing.assert_close(loss(shuffled_scores, shuffled_coordinates, cells), loss(scores, coordinates, cells))


def test_dense_swav_without_a_shared_point_is_zero_and_still_backpropagates():
    scores, coordinates, cells = _two_groups(torch.Generator().manual_seed(3))
    far = [coordinates[0], [group + 1000.0 for group in coordinates[1]]]
    loss_fn = DenseSwAVLoss(distributed=False)
    loss = loss_fn(scores, far, cells)
    assert float(loss.detach()) == 0.0 and loss_fn.last_matched_fraction == 0.0
    loss.backward()


def test_dense_swav_records_every_location_of_view_0_for_the_collapse_monitor():
    scores, coordinates, cells = _two_groups(torch.Generator().manual_seed(4))
    loss = DenseSwAVLoss(distributed=False)
    loss(scores, coordinates, cells)
    assert loss.num_prototypes == [7]
    assert loss.last_assignments[0].shape == (3 * 4 + 2 * 9,)


def test_dense_swav_rejects_mismatched_inputs():
    scores, coordinates, cells = _two_groups(torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="2 views"):
        DenseSwAVLoss()(scores[:1], coordinates[:1], cells[:1])
    with pytest.raises(ValueError, match="do not match"):
        DenseSwAVLoss()(scores, [coordinates[0], [coordinates[1][0][:, :3], coordinates[1][1]]], cells)
    with pytest.raises(ValueError, match="same items"):
        DenseSwAVLoss()(
            [scores[0], [scores[1][0][:2], scores[1][1]]],
            [coordinates[0], [coordinates[1][0][:2], coordinates[1][1]]],
            [cells[0], [cells[1][0][:2], cells[1][1]]],
        )


def test_joint_loss_adds_the_weighted_dense_term_and_logs_it():
    generator = torch.Generator().manual_seed(6)
    scores, coordinates, cells = _two_groups(generator)
    projections = [F.normalize(torch.randn(m, 8, generator=generator), dim=1) for m in (4, 4)]
    prototypes = F.normalize(torch.randn(5, 8, generator=generator), dim=1)
    prediction = {
        "intra_projection": projections,
        "intra_scores": [[p @ prototypes.t() for p in projections]],
        "dense_scores": scores,
        "dense_coordinates": coordinates,
        "dense_cell_size": cells,
    }
    intra, dense = SwAVLoss(distributed=False), DenseSwAVLoss(distributed=False)
    joint = JointLoss(intra=intra, dense=dense, w_dense=0.5)
    total = joint(prediction)
    expected_dense = dense(scores, coordinates, cells)
    torch.testing.assert_close(total, intra(projections, prediction["intra_scores"]) + 0.5 * expected_dense)
    assert set(joint.terms) == {"intra", "inter", "mask", "dense", "total"}
    torch.testing.assert_close(joint.terms["dense"], expected_dense.detach())
