"""SwAV loss: hand-written reference, lightly agreement, multi-crop prefixes, several heads, feature queue."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from custom_nets.losses import SwAVLoss


def plain_sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    q = torch.exp(scores.detach().double() / epsilon).t()
    q = q / q.sum()
    prototypes, items = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / prototypes
        q = q / q.sum(dim=0, keepdim=True) / items
    return (q * items).t().float()


def reference_swav(heads, temperature=0.1, queue_scores=None):
    """Literal SwAV: for each head, each assignment view a, the mean CE of every other view against q_a."""
    head_losses = []
    for head, views in enumerate(heads):
        per_assignment = []
        for a in (0, 1):
            if queue_scores is None:
                q = plain_sinkhorn(views[a])
            else:
                q = plain_sinkhorn(torch.cat([views[a].detach(), queue_scores[head][a]]))[: views[a].shape[0]]
            terms = []
            for v, s in enumerate(views):
                if v == a:
                    continue
                m = s.shape[0]
                log_p = torch.log(torch.softmax(s / temperature, dim=1))
                terms.append(-(q[:m] * log_p).sum(dim=1).mean())
            per_assignment.append(sum(terms) / len(terms))
        head_losses.append(sum(per_assignment) / 2)
    return sum(head_losses) / len(head_losses)


def _views(sizes, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(sizes[0], dim, generator=generator)
    return [F.normalize(base[:m] + 0.3 * torch.randn(m, dim, generator=generator), dim=1) for m in sizes]


def _prototypes(counts, dim=8, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(k, dim, generator=generator), dim=1) for k in counts]


def test_matches_hand_written_reference_with_small_crops_and_two_heads():
    projections = _views([12, 12, 5, 5])  # two global views, two small crops holding the first 5 items
    weights = _prototypes([6, 9])
    scores = [[(p @ w.t()).requires_grad_() for p in projections] for w in weights]
    reference_scores = [[s.detach().clone().requires_grad_() for s in head] for head in scores]

    loss = SwAVLoss()(projections, scores)
    expected = reference_swav(reference_scores)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)

    loss.backward()
    expected.backward()
    for head, reference_head in zip(scores, reference_scores, strict=True):
        for s, r in zip(head, reference_head, strict=True):
            torch.testing.assert_close(s.grad, r.grad, atol=1e-6, rtol=1e-4)


def test_matches_lightly_for_equal_views():
    lightly_loss = pytest.importorskip("lightly.loss")
    projections = _views([16, 16, 16])
    (weight,) = _prototypes([10])
    scores = [p @ weight.t() for p in projections]
    ours = SwAVLoss(temperature=0.1, epsilon=0.05, sinkhorn_iterations=3)(projections, [scores])
    theirs = lightly_loss.SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)(
        scores[:2], scores[2:]
    )
    torch.testing.assert_close(ours, theirs.squeeze(), atol=1e-5, rtol=1e-5)


def test_low_precision_scores_and_monitor_attributes():
    projections = _views([10, 10])
    (weight,) = _prototypes([4])
    scores = [(p @ weight.t()).to(torch.bfloat16) for p in projections]
    loss_fn = SwAVLoss()
    loss = loss_fn(projections, [scores])
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss_fn.num_prototypes == [4]
    torch.testing.assert_close(loss_fn.last_assignments[0], scores[0].float().argmax(dim=1))
    assert loss_fn.last_loss is not None and not loss_fn.last_loss.requires_grad


def test_empty_small_crops_are_skipped():
    projections = _views([7, 7, 0])  # a batch of volumes only: small crops hold no item
    (weight,) = _prototypes([5])
    scores = [[p @ weight.t() for p in projections]]
    expected = reference_swav([[s for s in scores[0][:2]]])
    torch.testing.assert_close(SwAVLoss()(projections, scores), expected, atol=1e-5, rtol=1e-5)


def test_queue_is_scored_with_the_current_prototypes():
    layer = nn.Linear(8, 6, bias=False)
    loss_fn = SwAVLoss(queue_length=8, prototypes=nn.ModuleList([layer]))
    batches = [_views([4, 4], seed=seed) for seed in range(3)]
    with torch.no_grad():
        for projections in batches[:2]:  # fills the queue (4 + 4 items); not used until full
            loss_fn(projections, [[p @ layer.weight.t() for p in projections]])
        layer.weight.mul_(-1.0).add_(0.1)  # the prototypes move after the queue was filled

    projections = batches[2]
    scores = [[p @ layer.weight.detach().t() for p in projections]]
    queued = [torch.cat([batches[1][a], batches[0][a]]) @ layer.weight.detach().t() for a in (0, 1)]
    expected = reference_swav(scores, queue_scores=[queued])
    loss = loss_fn(projections, scores)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(loss, reference_swav(scores), atol=1e-4)


def test_queue_waits_for_the_start_iteration_and_eval_mode_does_not_fill_it():
    layer = nn.Linear(8, 6, bias=False)
    loss_fn = SwAVLoss(queue_length=4, queue_start_iteration=2, prototypes=layer)
    projections = _views([4, 4])
    scores = [[p @ layer.weight.detach().t() for p in projections]]
    loss_fn.eval()
    loss_fn(projections, scores)
    loss_fn.train()
    for _ in range(2):
        torch.testing.assert_close(loss_fn(projections, scores), reference_swav(scores))
    other = _views([4, 4], seed=5)  # the queue must differ from the batch (duplicated columns keep the codes)
    loss_fn(other, [[p @ layer.weight.detach().t() for p in other]])  # third training call: fills the queue
    assert not torch.allclose(loss_fn(projections, scores), reference_swav(scores), atol=1e-4)


def test_queue_start_counts_on_the_host_and_survives_a_state_dict_load():
    """With a queue, the call count is read from its buffer once (a device wait on a GPU), then counted on the host;
    a state-dict load (a resumed run) makes it read the buffer again, so the queue starts at the same call."""
    spec = importlib.util.spec_from_file_location("measure", Path(__file__).parents[2] / "benchmarks" / "measure.py")
    measure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(measure)
    layer = nn.Linear(8, 6, bias=False)
    projections, other = _views([4, 4]), _views([4, 4], seed=5)  # the queue must differ from the scored batch
    scores, other_scores = ([[p @ layer.weight.detach().t() for p in views]] for views in (projections, other))
    loss_fn = SwAVLoss(queue_length=4, queue_start_iteration=3, prototypes=layer)
    loss_fn(projections, scores)
    counter = measure.OperatorCounter()
    with counter:
        loss_fn(projections, scores)
    assert dict(counter.host_syncs) == {}
    resumed = SwAVLoss(queue_length=4, queue_start_iteration=3, prototypes=layer)
    resumed(projections, scores)  # its own count (1) is now on the host ...
    resumed.load_state_dict(loss_fn.state_dict())  # ... and the load brings 2
    resumed(other, other_scores)  # call 2: before the start
    torch.testing.assert_close(resumed(other, other_scores), reference_swav(other_scores))  # call 3: fills the queue
    assert not torch.allclose(resumed(projections, scores), reference_swav(scores), atol=1e-4)  # call 4: uses it


def test_invalid_inputs_are_rejected():
    projections = _views([6, 6, 3])
    (weight,) = _prototypes([4])
    scores = [[p @ weight.t() for p in projections]]
    with pytest.raises(ValueError, match="same items"):
        SwAVLoss()([projections[0], projections[2]], [[scores[0][0], scores[0][2]]])
    with pytest.raises(ValueError, match="views"):
        SwAVLoss()(projections, [scores[0][:2]])
    with pytest.raises(ValueError, match="prototype layers"):
        SwAVLoss(queue_length=16)
    with pytest.raises(ValueError, match="assignment_views"):
        SwAVLoss(assignment_views=(2,))
