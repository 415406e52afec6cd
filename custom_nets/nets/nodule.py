"""Nodule classifier on the joint encoder: ``f_intra`` per slice, ``f_inter`` over the slices, a linear head
(LUNA16 false-positive reduction, arXiv 2212.01893, METHOD.md section 4)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
from torch import nn

from custom_nets.nets.slice_encoder import SliceEncoder
from custom_nets.nets.slice_transformer import SliceTransformer
from custom_nets.weights import WeightLoadReport, load_slice_encoder_weights, load_slice_transformer_weights

__all__ = ["NoduleClassifier"]

logger = logging.getLogger(__name__)


class NoduleClassifier(nn.Module):
    """Candidate cube -> nodule logit, through the pretrained slice encoder and slice transformer.

    Each of the N slices of a cube is embedded by ``f_intra`` (:class:`SliceEncoder`); ``f_inter``
    (:class:`SliceTransformer`) turns the N slice embeddings, placed at their physical positions (``slice_spacing_mm``
    apart), into the unit-norm volume feature ``Z``; a linear head maps ``Z`` to one logit (nodule vs not), the
    protocol of the paper's LUNA16 experiment.

    Shapes: ``(B, C, N, H, W)`` -> logits ``(B, 1)`` (``sigmoid`` gives the nodule probability).

    Args:
        in_channels: input channels (1 for CT).
        encoder_depth, embed_dim: ``f_intra`` (ResNet 18/34/50, embedding width ``d``); must match the checkpoint.
        transformer_layers, num_heads, num_points, ffn_dim, dropout: ``f_inter`` (see :class:`SliceTransformer`).
        slice_spacing_mm: distance between the cube's slices, for the slice position encoding (the pretraining
            encodes physical z in mm).
        head_dropout: dropout on the volume feature before the head.
        pretrained_ckpt: ``None`` (random initialisation, the baseline) or a pretrain_joint export / checkpoint with
            ``slice_encoder.*`` and ``slice_transformer.*`` keys. Every tensor of both must load (the first
            convolution is adapted to ``in_channels``), otherwise a ``RuntimeError`` names the missing keys; the two
            reports are kept in ``self.weight_reports`` and logged.
        freeze_backbone: keep ``f_intra`` and ``f_inter`` fixed (no gradients, batch norm and dropout in eval mode):
            only the head trains (linear evaluation of the pretrained features).

    Reference: Nguyen et al., "Joint Self-Supervised Image-Volume Representation Learning with Intra-Inter
    Contrastive Clustering", AAAI 2023, arXiv 2212.01893.
    """

    def __init__(
        self,
        in_channels: int = 1,
        encoder_depth: int = 50,
        embed_dim: int = 640,
        transformer_layers: int = 4,
        num_heads: int = 8,
        num_points: int = 4,
        ffn_dim: int = 720,
        dropout: float = 0.1,
        slice_spacing_mm: float = 1.0,
        head_dropout: float = 0.0,
        pretrained_ckpt: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.slice_spacing_mm = float(slice_spacing_mm)
        self.slice_encoder = SliceEncoder(depth=encoder_depth, in_channels=in_channels, embed_dim=embed_dim)
        self.slice_transformer = SliceTransformer(
            embed_dim, transformer_layers, num_heads, num_points, ffn_dim, dropout
        )
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(embed_dim, 1))
        self.freeze_backbone = freeze_backbone
        self.weight_reports: dict[str, WeightLoadReport] = {}
        if pretrained_ckpt is not None:
            self.weight_reports = self.load_pretrained(pretrained_ckpt)
        if freeze_backbone:
            self.backbone_modules().requires_grad_(False)

    def backbone_modules(self) -> nn.ModuleList:
        """``f_intra`` and ``f_inter`` together."""
        return nn.ModuleList([self.slice_encoder, self.slice_transformer])

    def load_pretrained(self, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, WeightLoadReport]:
        """Load ``f_intra`` and ``f_inter`` from a pretrain_joint export; raise unless every tensor of both loaded."""
        origin = "the given state dict" if isinstance(source, Mapping) else str(source)
        reports = {
            "slice_encoder": load_slice_encoder_weights(self.slice_encoder, source),
            "slice_transformer": load_slice_transformer_weights(self.slice_transformer, source),
        }
        for name, report in reports.items():
            if report.missing:
                raise RuntimeError(
                    f"the pretrained {name} did not load completely from {origin}: {report.summary()}\n"
                    "Build the network with the checkpoint's encoder_depth, embed_dim and transformer sizes."
                )
            logger.info("%s weights loaded from %s: %s", name, origin, report.summary())
        return reports

    def parameter_groups(self, backbone_lr: float) -> list[dict]:
        """Optimizer groups: trainable backbone parameters at ``backbone_lr``, the head at the optimizer's rate."""
        backbone = [p for p in self.backbone_modules().parameters() if p.requires_grad]
        groups = [{"params": backbone, "lr": backbone_lr}, {"params": list(self.head.parameters())}]
        return [group for group in groups if group["params"]]

    def train(self, mode: bool = True) -> NoduleClassifier:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone_modules().eval()  # frozen: pretraining's batch-norm statistics, no dropout
        return self

    def volume_feature(self, cubes: torch.Tensor) -> torch.Tensor:
        """``(B, C, N, H, W)`` -> unit-norm volume feature ``Z`` ``(B, d)``."""
        if cubes.ndim != 5 or cubes.shape[1] != self.in_channels:
            raise ValueError(
                f"NoduleClassifier expects cubes (B, {self.in_channels}, N, H, W), got {tuple(cubes.shape)}."
            )
        embeddings = self.slice_encoder(cubes, return_features=False).embedding  # (B, N, d)
        batch, num_slices = embeddings.shape[:2]
        positions = torch.arange(num_slices, device=cubes.device, dtype=torch.float32) * self.slice_spacing_mm
        return self.slice_transformer(embeddings, slice_position=positions.expand(batch, num_slices)).volume_embedding

    def forward(self, cubes: torch.Tensor) -> torch.Tensor:
        return self.head(self.volume_feature(cubes))
