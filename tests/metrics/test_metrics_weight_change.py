"""Relative weight change per slice-encoder stage against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from custom_nets.metrics.weight_change import relative_change_by_stage, trunk_weights
from custom_nets.nets.segmentation import SliceEncoderUNet
from custom_nets.nets.slice_encoder import SliceEncoder


def test_hand_computed_change_per_stage_ignores_prefixes_and_batch_norm() -> None:
    before = {
        "slice_encoder.trunk.conv1.weight": torch.full((2, 1, 3, 3), 2.0),  # norm 2 * sqrt(18)
        "slice_encoder.trunk.bn1.weight": torch.ones(2),  # 1-D: not counted
        "slice_encoder.trunk.layer1.0.conv1.weight": torch.tensor([[[[3.0]]], [[[4.0]]]]),  # norm 5
        "slice_encoder.trunk.layer1.0.conv2.weight": torch.zeros(1, 1, 1, 1),
        "slice_encoder.embedding_proj.weight": torch.ones(4, 4),  # outside the trunk
    }
    after = {
        "encoder.trunk.conv1.weight": torch.full((2, 1, 3, 3), 3.0),  # change 1 * sqrt(18): relative 0.5
        "encoder.trunk.bn1.weight": torch.full((2,), 9.0),
        "encoder.trunk.layer1.0.conv1.weight": torch.tensor([[[[3.0]]], [[[4.0]]]]),
        "encoder.trunk.layer1.0.conv2.weight": torch.tensor([[[[5.0]]]]),  # change 5 over the stage's norm 5
    }
    change = relative_change_by_stage(before, after)
    assert change == pytest.approx({"stem": 0.5, "layer1": 1.0})


def test_an_encoder_against_itself_and_a_fine_tuned_copy() -> None:
    torch.manual_seed(0)
    encoder = SliceEncoder(depth=18)
    network = SliceEncoderUNet(
        1, 3, depth=18, pretrained_ckpt={f"slice_encoder.{k}": v for k, v in encoder.state_dict().items()}
    )
    same = relative_change_by_stage(encoder.state_dict(), network.state_dict())
    assert set(same) == {"stem", "layer1", "layer2", "layer3", "layer4"} and max(same.values()) == 0.0
    snapshot = trunk_weights(network.state_dict())  # a copy: later training must not change it
    with torch.no_grad():
        network.encoder.trunk.layer4[0].conv1.weight.mul_(2.0)
    moved = relative_change_by_stage(snapshot, network.state_dict())  # 0 everywhere if the snapshot were a view
    assert moved["layer3"] == 0.0 and 0.0 < moved["layer4"] < 1.0


def test_refuses_states_without_a_trunk_or_with_another_architecture() -> None:
    with pytest.raises(ValueError, match="trunk"):
        trunk_weights({"head.weight": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="layer1.0.conv1.weight"):
        relative_change_by_stage(
            {"trunk.layer1.0.conv1.weight": torch.ones(2, 2)}, {"trunk.layer1.0.conv1.weight": torch.ones(3, 2)}
        )
