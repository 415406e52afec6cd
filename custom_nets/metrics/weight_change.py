"""How far training moved the slice encoder's weights, stage by stage.

A pretrained encoder can only help a downstream task with what fine-tuning leaves of it. Comparing the relative weight
change that pretraining made (initialisation -> export) with the one that fine-tuning makes afterwards (export ->
fine-tuned model) shows which stages keep their pretraining: where fine-tuning moves a stage much further than
pretraining did, the downstream network is close to a fresh random initialisation there.

The stages are those of the ResNet trunk of ``f_intra`` (arXiv 2212.01893): the stem (``conv1``) and ``layer1`` to
``layer4``; only convolution and linear weights (tensors of two or more dimensions) count, so batch-norm affine
parameters and running statistics do not dilute the figure.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["ENCODER_STAGES", "trunk_weights", "relative_change_by_stage"]

ENCODER_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")

_TRUNK = "trunk."


def trunk_weights(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The convolution / linear weights of the ResNet trunk in ``state``, keyed from ``trunk.`` on.

    Any prefix before ``trunk.`` is dropped, so a pretraining export (``slice_encoder.trunk.*``) and a fine-tuned
    U-Net (``encoder.trunk.*``) give the same keys.

    Raises:
        ValueError: when ``state`` holds no trunk weights.
    """
    weights = {}
    for key, value in state.items():
        position = key.find(_TRUNK)
        if position >= 0 and value.ndim >= 2 and value.is_floating_point():
            weights[key[position:]] = value.detach().float().clone()
    if not weights:
        raise ValueError("no slice-encoder trunk weights ('...trunk.*' tensors of 2+ dimensions) in the state dict.")
    return weights


def _stage_of(key: str) -> str:
    name = key[len(_TRUNK) :].split(".", 1)[0]
    return name if name in ENCODER_STAGES else "stem"


def relative_change_by_stage(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``||W_after - W_before|| / ||W_before||`` per encoder stage (Frobenius norms over all the stage's weights).

    Args:
        before / after: state dicts holding the slice-encoder trunk (any prefix before ``trunk.``).

    Returns:
        ``{stage: relative change}`` for the stages of ``ENCODER_STAGES`` found in both.

    Raises:
        ValueError: when a trunk weight is missing from ``after`` or has another shape.
    """
    first, second = trunk_weights(before), trunk_weights(after)
    squared_change: dict[str, float] = {}
    squared_norm: dict[str, float] = {}
    for key, value in first.items():
        if key not in second or second[key].shape != value.shape:
            raise ValueError(f"trunk weight {key} is missing or has another shape in the second state dict.")
        stage = _stage_of(key)
        squared_change[stage] = squared_change.get(stage, 0.0) + float((second[key] - value).pow(2).sum())
        squared_norm[stage] = squared_norm.get(stage, 0.0) + float(value.pow(2).sum())
    return {
        stage: (squared_change[stage] / squared_norm[stage]) ** 0.5
        for stage in ENCODER_STAGES
        if stage in squared_norm and squared_norm[stage] > 0
    }
