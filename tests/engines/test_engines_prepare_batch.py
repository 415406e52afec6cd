"""Global clustering item ids, batch preparation, checkpoints lookup, gradient control and loss-term logging."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from custom_nets.engines import JointItemIds, JointPrepareBatch, latest_checkpoint, plain_prepare_batch
from custom_nets.engines.handlers import GradientControl, LossTermsHandler, ratio_from_norms

KINDS = ["image", "volume", "image", "volume", "volume"]  # global datalist order


def test_item_ids_are_global_and_distinct() -> None:
    ids = JointItemIds(KINDS, num_slices=3)
    assert ids.num_intra_items == 5 + 3 * 3
    valid = torch.tensor([[True, True, False], [True, True, True]])
    intra = ids.intra_ids(torch.tensor([2, 0]), torch.tensor([4, 1]), valid)
    # images keep their datalist index; slice j of the r-th volume -> 5 + 3r + j (volume 4 is the 3rd volume, r=2)
    assert intra.tolist() == [2, 0, 5 + 6, 5 + 7, 5 + 0, 5 + 1, 5 + 2]
    assert ids.inter_ids(torch.tensor([4, 1, 3])).tolist() == [2, 0, 1]


def test_volume_listed_as_image_is_rejected() -> None:
    ids = JointItemIds(KINDS, num_slices=2)
    with pytest.raises(ValueError, match="kind"):
        ids.intra_ids(torch.zeros(0, dtype=torch.long), torch.tensor([0]), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="'image' or 'volume'"):
        JointItemIds(["image", "video"], num_slices=2)


def test_prepare_batch_moves_inputs_and_matches_ids_to_chosen_slices() -> None:
    batch = {
        "image_views": [torch.zeros(1, 1, 4, 4)] * 2,
        "image_index": torch.tensor([0]),
        "volume_views": [torch.zeros(2, 1, 3, 4, 4)] * 2,
        "slice_valid": torch.tensor([[True, True, True], [True, False, False]]),
        "slice_position": torch.zeros(2, 3),
        "volume_index": torch.tensor([1, 3]),
    }
    inputs, targets = JointPrepareBatch(JointItemIds(KINDS, 3), intra_slices_per_volume=2)(batch, "cpu")
    chosen = inputs["intra_slices"]
    assert chosen.sum(dim=1).tolist() == [2, 1]
    expected = [0] + [5 + j for j in range(3) if chosen[0, j]] + [5 + 3]
    assert targets["intra_index"].tolist() == expected
    assert targets["inter_index"].tolist() == [0, 1]
    assert inputs["slice_rows"].tolist() == [0, 1, 2, 3]  # flat (volume, slice) rows of the valid slices
    assert inputs["intra_rows"].tolist() == [j for j in range(3) if chosen[0, j]] + [3]  # among those 4


def test_prepare_batch_names_a_volume_without_valid_slices() -> None:
    batch = {
        "volume_views": [torch.zeros(2, 1, 3, 4, 4)] * 2,
        "slice_valid": torch.tensor([[True, True, False], [False, False, False]]),
        "slice_position": torch.zeros(2, 3),
        "volume_index": torch.tensor([1, 3]),
    }
    with pytest.raises(ValueError, match=r"volume\(s\) \[1\] of this batch have no valid slice"):
        JointPrepareBatch(JointItemIds(KINDS, 3))(batch, "cpu")


def test_latest_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        latest_checkpoint(tmp_path)
    for epoch in (2, 10):
        torch.save({}, tmp_path / f"checkpoint_epoch={epoch}.pt")
    assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=10.pt")  # by number, not by name order
    torch.save({}, tmp_path / "model_final.pt")
    final_time = (tmp_path / "model_final.pt").stat().st_mtime_ns
    os.utime(tmp_path / "checkpoint_epoch=10.pt", ns=(final_time - 10**9, final_time - 10**9))
    assert latest_checkpoint(tmp_path).endswith("model_final.pt")
    os.utime(tmp_path / "checkpoint_epoch=10.pt", ns=(final_time + 10**9, final_time + 10**9))  # saved after it
    assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=10.pt")


def test_larc_ratio_matches_hand_computation() -> None:
    weight, grad = torch.full((2, 2), 3.0), torch.full((2, 2), 4.0)  # norms 6 and 8
    expected = 0.001 * 6 / (8 + 0.5 * 6)
    torch.testing.assert_close(
        ratio_from_norms(weight.norm(), grad.norm(), 1.0, 0.5, 0.001, clip=False), torch.tensor(expected)
    )
    torch.testing.assert_close(
        ratio_from_norms(weight.norm(), grad.norm(), 1e-6, 0.5, 0.001, clip=True), torch.tensor(1.0)
    )


def test_gradient_control_applies_larc_as_one_sgd_step() -> None:
    layer = torch.nn.Linear(3, 2, bias=False)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, weight_decay=0.01)
    engine = Engine(lambda e, b: None)
    engine.network, engine.optimizer = layer, optimizer
    engine.state.output = {"loss": torch.tensor(1.0)}
    layer(torch.ones(1, 3)).sum().backward()
    weight, grad = layer.weight.detach().clone(), layer.weight.grad.clone()
    ratio = ratio_from_norms(weight.norm(), grad.norm(), 0.1, 0.01, 0.001, clip=True)
    GradientControl(trust_coefficient=0.001)(engine)
    optimizer.step()
    torch.testing.assert_close(layer.weight.detach(), weight - 0.1 * ratio * (grad + 0.01 * weight))


@pytest.mark.parametrize("clip", [True, False])
def test_gradient_control_scales_every_layer_as_the_one_layer_formula(clip: bool) -> None:
    """The grouped (foreach) LARC equals ``ratio_from_norms`` applied layer by layer: convolutions and linear layers
    scaled, 1-D parameters (norms, biases) and parameters without a gradient left alone, a zero weight kept at 1."""
    torch.manual_seed(0)
    network = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)
    )
    unused = torch.nn.Linear(2, 2)  # in the optimiser, never in the graph: no gradient
    with torch.no_grad():
        network[0].weight.mul_(5.0)
    optimizer = torch.optim.SGD([*network.parameters(), *unused.parameters()], lr=0.05, weight_decay=1e-3)
    network(torch.randn(2, 1, 8, 8)).square().sum().backward()
    with torch.no_grad():
        network[3].weight.zero_()  # a zero-norm layer: factor 1
    expected, raw = {}, {name: weight.grad.clone() for name, weight in network.named_parameters()}
    for name, weight in network.named_parameters():
        grad = raw[name]
        if weight.ndim > 1:
            ratio = ratio_from_norms(weight.norm(), grad.norm(), 0.05, 1e-3, 0.001, clip)
            grad = (grad + 1e-3 * weight) * ratio - 1e-3 * weight
        expected[name] = grad
    engine = Engine(lambda e, b: None)
    engine.network, engine.optimizer = network, optimizer
    GradientControl(trust_coefficient=0.001, clip_trust=clip)(engine)
    for name, weight in network.named_parameters():
        torch.testing.assert_close(weight.grad, expected[name], rtol=1e-6, atol=1e-9, msg=name)
    assert unused.weight.grad is None
    assert not torch.allclose(expected["0.weight"], raw["0.weight"])  # LARC changed the convolution's gradient
    torch.testing.assert_close(expected["3.weight"], raw["3.weight"])  # factor 1 on the zero weight


def test_loss_terms_become_epoch_means() -> None:
    class Loss:
        terms: dict = {}

    loss = Loss()
    values = iter([1.0, 3.0, 5.0, 7.0])

    def step(engine, batch):
        loss.terms = {"intra": torch.tensor(next(values))}
        return {"loss": torch.tensor(0.0)}

    engine = Engine(step)
    handler = LossTermsHandler(loss)
    handler.attach(engine)
    seen = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(e.state.metrics["loss_intra"]))
    engine.run([0, 1], max_epochs=2)
    assert seen == [2.0, 6.0]
    assert handler.history == [{"epoch": 1, "intra": 2.0}, {"epoch": 2, "intra": 6.0}]


def test_plain_prepare_batch_gives_plain_tensors_with_the_same_values() -> None:
    image, label = torch.randn(2, 1, 4, 4), torch.randint(0, 3, (2, 1, 4, 4))
    batch = {"image": MetaTensor(image, affine=torch.eye(4) * 2), "label": MetaTensor(label)}
    prepared_image, prepared_label = plain_prepare_batch(batch, torch.device("cpu"))
    assert type(prepared_image) is torch.Tensor and type(prepared_label) is torch.Tensor
    assert torch.equal(prepared_image, image) and torch.equal(prepared_label, label)
    image_only, no_label = plain_prepare_batch(MetaTensor(image), "cpu")
    assert type(image_only) is torch.Tensor and no_label is None


@pytest.mark.parametrize("bundle", ["finetune_heart", "finetune_brainseg", "finetune_nodule"])
def test_training_engines_prepare_plain_tensors(bundle: str) -> None:
    """The fine-tuning trainers strip the MetaTensor metadata (their outputs are never written as images); the
    evaluators keep MONAI's default, which their inverted and saved predictions need."""
    config = ConfigParser()
    config.read_config(Path(__file__).resolve().parents[2] / "bundles" / bundle / "configs" / "train.json")
    assert config["train"]["trainer"]["prepare_batch"] == "$custom_nets.engines.plain_prepare_batch"
    assert "prepare_batch" not in config["validate"]["evaluator"]
