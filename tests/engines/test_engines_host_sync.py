"""The joint training step never makes the host wait for the device between the batch copy and the optimiser.

On a GPU, the slice transformer, heads and losses work on small tensors: their kernels are short and the host's
launches bound them. Without a synchronisation the host queues them while the GPU still runs the slice encoder's
long convolutions; one ``.item()``, ``bool(tensor)`` or boolean mask in forward, loss or backward forces the host to
wait for the encoder first and then feed the rest one kernel at a time. The check counts, on the CPU, the operators
that synchronise a GPU (``benchmarks/measure.py``'s ``OperatorCounter``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from custom_nets.engines import JointItemIds, JointPrepareBatch
from custom_nets.losses import DeepClusterV2Loss, DenseSwAVLoss, JointLoss, MaskedSlicePredictionLoss, SwAVLoss
from custom_nets.nets import JointSSLNet

MEASURE = Path(__file__).resolve().parents[2] / "benchmarks" / "measure.py"
spec = importlib.util.spec_from_file_location("measure", MEASURE)
measure = importlib.util.module_from_spec(spec)
sys.modules["measure"] = measure
spec.loader.exec_module(measure)


def _batch(generator: torch.Generator) -> dict[str, object]:
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2, [False] + [True] * 5])
    return {
        "image_views": [torch.randn(3, 1, 32, 32, generator=generator) for _ in range(2)]
        + [torch.randn(3, 1, 16, 16, generator=generator) for _ in range(2)],
        "image_index": torch.arange(3),
        "volume_views": [torch.randn(3, 1, 6, 32, 32, generator=generator) for _ in range(2)],
        "slice_valid": valid,
        "slice_position": torch.arange(6.0).expand(3, 6) * 2.5,
        "volume_index": torch.arange(3, 6),
    }


ITEM_IDS = JointItemIds(["image"] * 3 + ["volume"] * 3, num_slices=6)  # the items of _batch


def _network(**overrides: object) -> JointSSLNet:
    torch.manual_seed(0)
    options = {"encoder_depth": 18, "embed_dim": 32, "projection_hidden_dim": 64, "projection_dim": 16}
    options.update(intra_prototypes=(8,), inter_prototypes=(4,), mask_ratio=0.3)
    return JointSSLNet(**{**options, **overrides}).train()


def _counted_step(network: JointSSLNet, loss: JointLoss, inputs, targets) -> None:
    """Forward, loss and backward under the operator counter; asserts that it saw the step and no host wait."""
    counter = measure.OperatorCounter()
    with counter:
        value = loss(network(inputs), targets)
        value.backward()
    assert counter.kernels > 100  # the counter saw the step
    assert dict(counter.host_syncs) == {}
    assert torch.isfinite(value.detach())


@pytest.mark.parametrize(
    ("inter_slice_scale", "intra_slices_per_volume", "group_views"),
    [(None, None, False), (None, 2, False), ((0.5, 1.0), None, False), ((0.5, 1.0), 2, False), ((0.5, 1.0), 2, True)],
)
def test_joint_step_never_waits_for_the_device(inter_slice_scale, intra_slices_per_volume, group_views) -> None:
    network = _network(inter_slice_scale=inter_slice_scale, group_views=group_views)
    loss = JointLoss(intra=SwAVLoss(), inter=SwAVLoss(), mask=MaskedSlicePredictionLoss())
    prepare = JointPrepareBatch(ITEM_IDS, intra_slices_per_volume)
    inputs, targets = prepare(_batch(torch.Generator().manual_seed(1)), "cpu")  # host work, by design
    _counted_step(network, loss, inputs, targets)
    assert all(p.grad is not None for p in network.slice_transformer.parameters())


@pytest.mark.parametrize("clustered", [False, True])
def test_deepcluster_step_never_waits_for_the_device(clustered: bool) -> None:
    """The DeepCluster-v2 variant (``loss_family`` deepcluster) too: before the first k-means (no item has a cluster)
    and after it. Only the first call reads device values once, to log an empty bank."""
    network = _network(intra_prototypes=(8, 8), inter_prototypes=(2,))
    intra = DeepClusterV2Loss(ITEM_IDS.num_intra_items, embedding_dim=16, num_heads=2)
    inter = DeepClusterV2Loss(ITEM_IDS.num_volumes, embedding_dim=16, num_heads=1)
    loss = JointLoss(intra=intra, inter=inter, mask=MaskedSlicePredictionLoss())
    inputs, targets = JointPrepareBatch(ITEM_IDS)(_batch(torch.Generator().manual_seed(1)), "cpu")
    loss(network(inputs), targets)  # the first call: fills the bank, logs the empty bank
    if clustered:
        intra.update_clusters(network.intra_prototypes)
        inter.update_clusters(network.inter_prototypes)
    _counted_step(network, loss, inputs, targets)
    assert all((float(term.last_loss) > 0) == clustered for term in (intra, inter))  # 0 until the first k-means


def test_dense_term_step_never_waits_for_the_device() -> None:
    """The optional dense clustering term (``dense_prototypes`` > 0, ``w_dense``) too: unmatched locations are masked
    by value, so the count of matched ones never goes to the host."""
    network = _network(dense_prototypes=6, dense_stage=3)
    dense = DenseSwAVLoss()
    loss = JointLoss(intra=SwAVLoss(), inter=SwAVLoss(), mask=MaskedSlicePredictionLoss(), dense=dense)
    batch = _batch(torch.Generator().manual_seed(1))
    batch["image_view_geometry"] = [torch.eye(3).expand(3, 3, 3) for _ in range(4)]
    batch["volume_view_geometry"] = [torch.eye(3).expand(3, 3, 3) for _ in range(2)]
    inputs, targets = JointPrepareBatch(ITEM_IDS)(batch, "cpu")
    _counted_step(network, loss, inputs, targets)
    assert float(dense.last_matched_fraction) == 1.0  # identical geometry: every location is matched


def test_counter_sees_each_kind_of_host_sync() -> None:
    values = torch.tensor([0.5, -1.0, 2.0])
    counter = measure.OperatorCounter()
    with counter:
        float(values.sum())
        values[values > 0]
        values.nonzero()
        torch.tensor([1.0, 2.0])
        values.index_select(0, torch.arange(2))  # long indices: no wait
    kinds = {name for name, _ in counter.host_syncs}
    assert kinds == {"_local_scalar_dense", "index (boolean mask)", "nonzero", "lift_fresh"}
