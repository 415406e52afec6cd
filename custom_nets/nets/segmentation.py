"""2D U-Net with the pretrained slice encoder ``f_intra`` as its encoder (downstream segmentation, arXiv 2212.01893).

The paper fine-tunes ``f_intra`` for 3D segmentation (BraTS, MMWHS) inside a 2D U-Net trained on slices and applied
slice by slice. Here the decoder is MONAI's :class:`~monai.networks.nets.FlexibleUNet`: the slice encoder is registered
in its encoder register (``FLEXUNET_BACKBONE``) under the names ``slice_encoder_resnet{18,34,50}`` and its five stage
maps (stem and stages 1-4, strides 2-32) are the U-Net skips.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import BaseEncoder
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE, FlexibleUNet
from torch import nn

from custom_nets.nets.slice_encoder import RESNET_BUILDERS, SliceEncoder, resnet_stage_maps
from custom_nets.weights import WeightLoadReport, load_slice_encoder_weights

__all__ = ["SliceEncoderBackbone", "SliceEncoderUNet"]

logger = logging.getLogger(__name__)

_STAGE_CHANNELS = {18: (64, 64, 128, 256, 512), 34: (64, 64, 128, 256, 512), 50: (64, 256, 512, 1024, 2048)}


class SliceEncoderBackbone(nn.Module, BaseEncoder):
    """The ResNet trunk of :class:`SliceEncoder` exposed as a FlexibleUNet encoder.

    Shapes: ``(B, C, H, W)`` -> list of five maps: the stem ``(B, 64, H/2, W/2)`` (conv1, bn1, relu) then stages 1-4
    at ``H/4 ... H/32`` with ``(64, 64, 128, 256, 512)`` (depth 18/34) or ``(64, 256, 512, 1024, 2048)`` (depth 50)
    channels - the same maps as ``SliceEncoder(...).features``. Only the trunk is kept (state-dict keys ``trunk.*``,
    as in :class:`SliceEncoder`): the slice-embedding head plays no part in segmentation, so a pretrained file's
    ``embedding_proj.*`` keys are reported as unexpected and any ``embed_dim`` loads.

    Args:
        spatial_dims: must be 2 (the encoder is 2D; volumes are segmented slice by slice).
        in_channels: input channels (modalities x neighbouring slices).
        pretrained: must be False: pretrained weights come from :class:`SliceEncoderUNet`'s ``pretrained_ckpt``.
        depth: ResNet depth 18, 34 or 50.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, pretrained: bool = False, depth: int = 50) -> None:
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"the slice encoder is 2D; got spatial_dims={spatial_dims}.")
        if pretrained:
            raise ValueError("pretrained=True is not supported: pass pretrained_ckpt to SliceEncoderUNet instead.")
        encoder = SliceEncoder(depth=depth, in_channels=in_channels)
        self.trunk = encoder.trunk
        self.stage_channels = encoder.stage_channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return resnet_stage_maps(self.trunk, x)

    @classmethod
    def get_encoder_parameters(cls) -> list[dict]:
        return [{"spatial_dims": 2, "in_channels": 1, "pretrained": False, "depth": d} for d in RESNET_BUILDERS]

    @classmethod
    def num_channels_per_output(cls) -> list[tuple[int, ...]]:
        return [_STAGE_CHANNELS[d] for d in RESNET_BUILDERS]

    @classmethod
    def num_outputs(cls) -> list[int]:
        return [5 for _ in RESNET_BUILDERS]

    @classmethod
    def get_encoder_names(cls) -> list[str]:
        return [f"slice_encoder_resnet{d}" for d in RESNET_BUILDERS]


FLEXUNET_BACKBONE.register_class(SliceEncoderBackbone)


class SliceEncoderUNet(FlexibleUNet):
    """FlexibleUNet whose encoder is the (optionally pretrained, optionally frozen) slice encoder ``f_intra``.

    Shapes: ``(B, in_channels, H, W)`` -> logits ``(B, out_channels, H, W)``; any ``H, W`` (inputs are padded to a
    multiple of 32, the encoder's stride, and the logits cropped back; sizes that are multiples of 32 avoid it). For
    2.5D input, neighbouring slices are stacked as channels by the data pipeline
    (:class:`custom_nets.data.segmentation.StackNeighbourSlicesd`), so ``in_channels = modalities x num_slices``; the
    pretrained grayscale first convolution is adapted to that many channels when loaded.

    Args:
        in_channels: input channels.
        out_channels: output classes (background included for softmax outputs).
        depth: ResNet depth of the encoder, 18, 34 or 50 (must match ``pretrained_ckpt``).
        pretrained_ckpt: ``None`` for random initialisation, or a file / state dict holding ``slice_encoder.*`` keys
            (pretrain_joint export or checkpoint) or an encoder-only state dict. Every ResNet trunk tensor must load
            (first convolution adapted to ``in_channels``); otherwise a ``RuntimeError`` names the missing keys. The
            report (matched / missing / unexpected / adapted keys) is kept in ``self.weight_report`` and logged.
        freeze_encoder: keep the encoder fixed (no gradients, batch-norm statistics frozen); only the decoder trains.
        decoder_channels: widths of the five decoder blocks.
        norm: normalisation of the decoder blocks.
        dropout: dropout of the decoder blocks.

    Reference: Nguyen et al., "Joint Self-Supervised Image-Volume Representation Learning with Intra-Inter
    Contrastive Clustering", AAAI 2023, arXiv 2212.01893 (3D segmentation protocol).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        depth: int = 50,
        pretrained_ckpt: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
        freeze_encoder: bool = False,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        norm: str | tuple = ("batch", {"eps": 1e-3, "momentum": 0.1}),
        dropout: float = 0.0,
    ) -> None:
        if depth not in RESNET_BUILDERS:
            raise ValueError(f"depth must be one of {sorted(RESNET_BUILDERS)}, got {depth}.")
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            backbone=f"slice_encoder_resnet{depth}",
            pretrained=False,
            decoder_channels=tuple(decoder_channels),
            spatial_dims=2,
            norm=norm,
            dropout=dropout,
        )
        self.in_channels = in_channels
        self.size_divisor = 32
        self.freeze_encoder = freeze_encoder
        self.weight_report: WeightLoadReport | None = None
        if pretrained_ckpt is not None:
            self.weight_report = self.load_pretrained_encoder(pretrained_ckpt)
        if freeze_encoder:
            self.encoder.requires_grad_(False)

    def load_pretrained_encoder(self, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> WeightLoadReport:
        """Load ``f_intra`` weights into the encoder; raise unless every ResNet trunk tensor was loaded."""
        origin = "the given state dict" if isinstance(source, Mapping) else str(source)
        report = load_slice_encoder_weights(self.encoder, source)
        if report.missing:
            raise RuntimeError(
                f"the pretrained encoder did not load completely from {origin}: {report.summary()}\n"
                "Check that `depth` matches the checkpoint's ResNet depth."
            )
        logger.info("slice encoder weights loaded from %s: %s", origin, report.summary())
        return report

    def parameter_groups(self, encoder_lr: float) -> list[dict]:
        """Optimizer parameter groups: the trainable encoder parameters at ``encoder_lr``, then every other trainable
        parameter at the optimizer's own rate (empty groups are left out, e.g. the encoder when frozen).

        A lower rate for a pretrained encoder than for the new decoder is the usual way to fine-tune without washing
        out the pretrained features; bundles set it as ``learning_rate * encoder_lr_scale``.
        """
        encoder = [p for p in self.encoder.parameters() if p.requires_grad]
        encoder_ids = {id(p) for p in self.encoder.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in encoder_ids]
        groups = [{"params": encoder, "lr": encoder_lr}, {"params": rest}]
        return [group for group in groups if group["params"]]

    def train(self, mode: bool = True) -> SliceEncoderUNet:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # frozen encoder: batch-norm running statistics stay those of pretraining
        return self

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.ndim != 4 or inputs.shape[1] != self.in_channels:
            raise ValueError(
                f"SliceEncoderUNet expects (B, {self.in_channels}, H, W) slices, got {tuple(inputs.shape)}. "
                "in_channels must equal the number of modalities times num_slices (2.5D neighbours)."
            )
        height, width = inputs.shape[2:]
        pad_h, pad_w = (-height) % self.size_divisor, (-width) % self.size_divisor
        padded = F.pad(inputs, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else inputs
        return super().forward(padded)[..., :height, :width]
