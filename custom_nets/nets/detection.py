"""RetinaNet on the slice encoder ``f_intra`` for 2D abnormality detection in chest X-rays (arXiv 2212.01893,
downstream VinDr-CXR protocol: a 2D detector with the pretrained ResNet backbone, scored by mAP at IoU 0.5).

MONAI's detection pipeline does the rest: :class:`monai.apps.detection.networks.retinanet_network.RetinaNet`
(classification and box-regression heads) and :class:`monai.apps.detection.networks.retinanet_detector.
RetinaNetDetector` (anchors, matching, focal-style losses, box selection) configured in the bundle.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import torch
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.networks.blocks.backbone_fpn_utils import BackboneWithFPN

from custom_nets.nets.segmentation import SliceEncoderBackbone
from custom_nets.weights import WeightLoadReport, load_slice_encoder_weights

__all__ = ["SliceEncoderRetinaNet"]

logger = logging.getLogger(__name__)


class SliceEncoderRetinaNet(RetinaNet):
    """MONAI RetinaNet whose feature extractor is the slice encoder's ResNet trunk with a feature pyramid (FPN).

    Shapes: images ``(B, in_channels, W, H)`` (MONAI's 2D layout, x first; ``RetinaNetDetector`` pads both sides to
    multiples of ``size_divisible`` = 4 * 2 ** max(returned_layers), the stride of the max-pooled level) -> dict with
    ``"classification"``: one ``(B, num_anchors * num_classes, W_l, H_l)`` map per pyramid level and
    ``"box_regression"``: one ``(B, num_anchors * 4, W_l, H_l)`` map per level. The levels are the FPN outputs of the
    ResNet stages in ``returned_layers`` (stage k at stride 2 ** (k + 1)) plus one max-pooled level, each with
    ``fpn_channels`` channels (MONAI's ``BackboneWithFPN`` on the torchvision trunk, as ``resnet_fpn_feature_extractor``
    builds it on MONAI's ResNet).

    Initialisation: random (``pretrained_ckpt=None``) or ``f_intra`` from a pretrain_joint export / checkpoint
    (``slice_encoder.*`` keys) through :func:`custom_nets.weights.load_slice_encoder_weights`; every trunk tensor must
    load (first convolution adapted to ``in_channels``) and the report is kept in ``self.weight_report`` and logged.
    ``freeze_encoder=True`` keeps the trunk fixed (no gradients, batch-norm statistics of pretraining); the FPN and
    heads always train.

    Args:
        num_classes: detection classes (14 VinDr-CXR findings; "No finding" is the absence of boxes).
        num_anchors: anchors per location; must equal the anchor generator's.
        depth: ResNet depth 18, 34 or 50 (must match ``pretrained_ckpt``).
        in_channels: input channels (1 for radiographs).
        pretrained_ckpt: file or state dict with ``f_intra`` weights, or ``None``.
        freeze_encoder: train the FPN and heads only.
        returned_layers: ResNet stages (1-4) feeding the FPN.
        fpn_channels: FPN and head width.

    References: Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017; Nguyen et al., "Joint Self-Supervised
    Image-Volume Representation Learning with Intra-Inter Contrastive Clustering", AAAI 2023, arXiv 2212.01893.
    """

    def __init__(
        self,
        num_classes: int,
        num_anchors: int,
        depth: int = 50,
        in_channels: int = 1,
        pretrained_ckpt: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
        freeze_encoder: bool = False,
        returned_layers: Sequence[int] = (2, 3, 4),
        fpn_channels: int = 256,
    ) -> None:
        layers = sorted(int(k) for k in returned_layers)
        if not layers or layers[0] < 1 or layers[-1] > 4:
            raise ValueError(f"returned_layers must be ResNet stages within 1-4, got {list(returned_layers)}.")
        backbone = SliceEncoderBackbone(in_channels=in_channels, depth=depth)
        weight_report = None
        if pretrained_ckpt is not None:
            weight_report = self._load_encoder(backbone, pretrained_ckpt)
        feature_extractor = BackboneWithFPN(
            backbone.trunk,
            return_layers={f"layer{k}": str(i) for i, k in enumerate(layers)},
            in_channels_list=[backbone.stage_channels[k] for k in layers],
            out_channels=fpn_channels,
            spatial_dims=2,
        )
        super().__init__(
            spatial_dims=2,
            num_classes=num_classes,
            num_anchors=num_anchors,
            feature_extractor=feature_extractor,
            size_divisible=4 * 2 ** layers[-1],
        )
        self.in_channels = in_channels
        self.weight_report: WeightLoadReport | None = weight_report
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            self.encoder.requires_grad_(False)

    @staticmethod
    def _load_encoder(backbone: SliceEncoderBackbone, source) -> WeightLoadReport:
        origin = "the given state dict" if isinstance(source, Mapping) else str(source)
        report = load_slice_encoder_weights(backbone, source)
        if report.missing:
            raise RuntimeError(
                f"the pretrained encoder did not load completely from {origin}: {report.summary()}\n"
                "Check that `depth` matches the checkpoint's ResNet depth."
            )
        logger.info("slice encoder weights loaded from %s: %s", origin, report.summary())
        return report

    @property
    def encoder(self) -> torch.nn.Module:
        """The ResNet trunk up to the last returned stage (``feature_extractor.body``)."""
        return self.feature_extractor.body

    def train(self, mode: bool = True) -> SliceEncoderRetinaNet:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # frozen encoder: batch-norm running statistics stay those of pretraining
        return self
