"""Engine handlers of the objectives: prototype normalise/freeze, epoch-start k-means, collapse monitor."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from torch import nn

from custom_nets.engines.handlers import (
    ClusterCollapseMonitor,
    DeepClusterKMeansHandler,
    PrototypeHandler,
    assignment_statistics,
)
from custom_nets.losses import DeepClusterV2Loss, JointLoss, SwAVLoss

IN_DIM, DIM = 6, 4


class ToyNet(nn.Module):
    """A 2D branch in miniature: returns the ``intra_*`` keys of the network dict."""

    def __init__(self, prototypes=(5,), collapsed: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.projection = nn.Linear(IN_DIM, DIM)
        if collapsed:  # every input gets the same projection
            nn.init.zeros_(self.projection.weight)
        self.intra_prototypes = nn.ModuleList(nn.Linear(DIM, k, bias=False) for k in prototypes)

    def forward(self, views):
        projections = [F.normalize(self.projection(v), dim=1) for v in views]
        scores = [[layer(p) for p in projections] for layer in self.intra_prototypes]
        return {"intra_projection": projections, "intra_scores": scores}


def _batches(count: int = 4, items: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for step in range(count):
        x = torch.randn(items, IN_DIM, generator=generator)
        views = [x + 0.1 * torch.randn(items, IN_DIM, generator=generator) for _ in range(2)]
        batches.append({"views": views, "index": torch.arange(items) + step * items})
    return batches


def _prepare_batch(batch, device=None, non_blocking=False, **kwargs):
    return batch["views"], {"intra_index": batch["index"]}


def _trainer(net, loss, batches, epochs=1, lr=0.5):
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3)
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=batches,
        network=net,
        optimizer=optimizer,
        loss_function=loss,
        prepare_batch=_prepare_batch,
    )


def test_prototypes_frozen_for_the_first_iterations_then_trained_and_rows_normalised():
    net = ToyNet()
    trainer = _trainer(net, JointLoss(intra=SwAVLoss()), _batches(4))
    PrototypeHandler(net.intra_prototypes, freeze_iterations=2).attach(trainer)
    snapshots = []

    @trainer.on(Events.ITERATION_STARTED)
    def _rows_are_unit(engine):
        torch.testing.assert_close(net.intra_prototypes[0].weight.norm(dim=1), torch.ones(5))

    @trainer.on(Events.ITERATION_COMPLETED)
    def _snapshot(engine):
        snapshots.append((net.intra_prototypes[0].weight.detach().clone(), net.projection.weight.detach().clone()))

    trainer.run()
    assert trainer.state.iteration == 4
    torch.testing.assert_close(snapshots[0][0], snapshots[1][0], atol=0, rtol=0)  # frozen during iterations 1-2
    assert not torch.equal(snapshots[0][1], snapshots[1][1])  # while the rest trains
    assert not torch.allclose(snapshots[1][0], snapshots[2][0])  # iteration 3 updates the prototypes


def test_freezing_needs_a_monai_engine():
    handler = PrototypeHandler(nn.Linear(DIM, 3, bias=False), freeze_iterations=5)
    with pytest.raises(ValueError, match="BACKWARD_COMPLETED"):
        handler.attach(Engine(lambda engine, batch: None))
    with pytest.raises(ValueError, match="bias"):
        PrototypeHandler(nn.Linear(DIM, 3))


def test_kmeans_handler_clusters_at_epoch_start_and_trains_afterwards():
    net = ToyNet(prototypes=(3, 4))
    deepcluster = DeepClusterV2Loss(num_items=32, embedding_dim=DIM, num_heads=2)
    loss = JointLoss(intra=deepcluster)
    trainer = _trainer(net, loss, _batches(4), epochs=2, lr=0.05)
    DeepClusterKMeansHandler(deepcluster, net.intra_prototypes, seed=0).attach(trainer)
    epoch_losses: dict[int, list[float]] = {1: [], 2: []}
    prototypes_at_start, banks_at_start = {}, {}

    @trainer.on(Events.EPOCH_STARTED)
    def _record_prototypes(engine):  # runs after the k-means handler (attached first)
        prototypes_at_start[engine.state.epoch] = [layer.weight.detach().clone() for layer in net.intra_prototypes]
        banks_at_start[engine.state.epoch] = deepcluster.bank.clone()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record_loss(engine):
        epoch_losses[engine.state.epoch].append(float(loss.terms["intra"]))

    trainer.run()
    assert epoch_losses[1] == [0.0] * 4  # empty bank during the first epoch
    assert all(value > 0 for value in epoch_losses[2])
    assert (deepcluster.assignments >= 0).all()  # every item of epoch 1 has a cluster
    for head, layer in enumerate(net.intra_prototypes):
        centroids = prototypes_at_start[2][head]
        torch.testing.assert_close(centroids.norm(dim=1), torch.ones(layer.weight.shape[0]))
        bank = banks_at_start[2][head % 2]
        targets = deepcluster.assignments[head]
        # epoch 2 started from centroids of the bank: each item's target is its nearest centroid
        torch.testing.assert_close(targets, (bank @ centroids.t()).argmax(dim=1))


def test_kmeans_handler_rejects_the_joint_loss():
    net = ToyNet(prototypes=(3,))
    joint = JointLoss(intra=DeepClusterV2Loss(num_items=8, embedding_dim=DIM, num_heads=1))
    with pytest.raises(TypeError, match=r"\$@loss.intra"):
        DeepClusterKMeansHandler(joint, net.intra_prototypes)
    with pytest.raises(ValueError, match="heads"):
        DeepClusterKMeansHandler(
            joint.intra, nn.ModuleList([nn.Linear(DIM, 3, bias=False), nn.Linear(DIM, 3, bias=False)])
        )


def test_assignment_statistics():
    assert assignment_statistics(torch.tensor([5, 5, 5, 5])) == (pytest.approx(1.0), 4)
    assert assignment_statistics(torch.tensor([0, 20, 0, 0])) == (0.0, 1)
    assert assignment_statistics(torch.tensor([3, 1, 0, 0]))[1] == 2
    assert assignment_statistics(torch.zeros(3, dtype=torch.long)) == (0.0, 0)


class _Recorder:
    def __init__(self) -> None:
        self.scalars: dict[str, list[tuple[int, float]]] = {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, value))


def _monitored_run(collapsed: bool, caplog, stop_on_collapse: bool = True):
    net = ToyNet(prototypes=(6,), collapsed=collapsed)
    swav = SwAVLoss()
    trainer = _trainer(net, JointLoss(intra=swav), _batches(3, items=12), epochs=3, lr=0.0)
    recorder = _Recorder()
    monitor = ClusterCollapseMonitor(swav, name="intra", summary_writer=recorder, stop_on_collapse=stop_on_collapse)
    monitor.attach(trainer)
    with caplog.at_level(logging.WARNING):
        trainer.run()
    return trainer, monitor, recorder


def test_collapse_monitor_fires_and_stops_a_collapsed_model(caplog):
    trainer, monitor, recorder = _monitored_run(collapsed=True, caplog=caplog)
    assert "clustering collapse [intra]" in caplog.text
    assert trainer.state.epoch == 1  # stopped after the first check
    statistics = monitor.last_statistics[0]
    assert statistics["prototypes_in_use"] == 1 and statistics["entropy"] == 0.0
    assert set(recorder.scalars) == {
        "collapse/intra/head0/entropy",
        "collapse/intra/head0/prototypes_in_use",
        "collapse/intra/head0/loss_over_log_k",
    }


def test_collapse_monitor_stays_quiet_on_a_healthy_model(caplog):
    trainer, monitor, recorder = _monitored_run(collapsed=False, caplog=caplog)
    assert "clustering collapse" not in caplog.text
    assert trainer.state.epoch == 3
    assert monitor.last_statistics[0]["entropy"] > 0.5 and monitor.last_statistics[0]["prototypes_in_use"] >= 3
    assert [step for step, _ in recorder.scalars["collapse/intra/head0/entropy"]] == [1, 2, 3]


def test_collapse_monitor_warns_without_stopping_and_checks_its_source(caplog):
    trainer, _, _ = _monitored_run(collapsed=True, caplog=caplog, stop_on_collapse=False)
    assert trainer.state.epoch == 3 and caplog.text.count("clustering collapse [intra]") == 3
    with pytest.raises(TypeError, match="last_assignments"):
        ClusterCollapseMonitor(JointLoss(intra=SwAVLoss()))


def test_handlers_and_losses_build_from_a_bundle_config():
    from monai.bundle import ConfigParser

    config = {
        "imports": ["$import torch"],
        "network_def": {
            "_target_": "torch.nn.ModuleDict",
            "modules": {
                "intra_prototypes": "$torch.nn.ModuleList(torch.nn.Linear(4, 3, bias=False) for _ in range(2))"
            },
        },
        "loss": {
            "_target_": "custom_nets.losses.JointLoss",
            "intra": {
                "_target_": "custom_nets.losses.DeepClusterV2Loss",
                "num_items": 10,
                "embedding_dim": 4,
                "num_heads": 2,
            },
            "mask": {"_target_": "custom_nets.losses.MaskedSlicePredictionLoss", "positions": "all"},
            "w_mask": 0.5,
        },
        "handlers": [
            {
                "_target_": "custom_nets.engines.handlers.PrototypeHandler",
                "prototypes": "$@network_def.intra_prototypes",
                "freeze_iterations": 3,
            },
            {
                "_target_": "custom_nets.engines.handlers.DeepClusterKMeansHandler",
                "loss": "$@loss.intra",
                "prototypes": "$@network_def.intra_prototypes",
                "seed": 7,
            },
            {
                "_target_": "custom_nets.engines.handlers.ClusterCollapseMonitor",
                "loss": "$@loss.intra",
                "stop_on_collapse": True,
            },
        ],
    }
    parser = ConfigParser(config)
    network, loss = parser.get_parsed_content("network_def"), parser.get_parsed_content("loss")
    freeze, kmeans, monitor = parser.get_parsed_content("handlers")
    assert freeze.layers == list(network["intra_prototypes"]) and freeze.freeze_iterations == 3
    assert kmeans.loss is loss.intra and kmeans.layers == list(network["intra_prototypes"]) and kmeans.seed == 7
    assert monitor.loss is loss.intra and monitor.stop_on_collapse
    assert loss.mask.positions == "all" and loss.weights["mask"] == 0.5
