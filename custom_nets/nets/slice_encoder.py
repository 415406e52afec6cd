"""2D slice encoder ``f_intra`` of the joint image-volume method (arXiv 2212.01893, section 3.1)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.models import resnet18, resnet34, resnet50

__all__ = ["SliceEncoder", "SliceEncoderOutput", "RESNET_BUILDERS", "resnet_stage_maps", "spatial_mean"]

RESNET_BUILDERS = {18: resnet18, 34: resnet34, 50: resnet50}


def resnet_stage_maps(trunk: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The five feature maps of a torchvision ResNet trunk: stem (stride 2) and stages 1-4 (strides 4-32)."""
    stem = trunk.relu(trunk.bn1(trunk.conv1(images)))
    maps = [stem]
    current = trunk.maxpool(stem)
    for stage in (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4):
        current = stage(current)
        maps.append(current)
    return maps


class _SpatialMean(torch.autograd.Function):
    """``maps.mean(dim=(2, 3))`` whose gradient is a broadcast view of the ``(B, C)`` gradient.

    torch's own backward of ``mean`` writes a full-size ``(B, C, H, W)`` tensor in the contiguous (NCHW) layout.
    Added to the gradient that reaches the same stage map from the next stage, which is channels-last when the trunk
    is, it turns that sum NCHW too, and cuDNN converts it back. A broadcast view writes nothing, and the sum keeps the
    layout of the other gradient.
    """

    @staticmethod
    def forward(ctx, maps: torch.Tensor) -> torch.Tensor:
        ctx.map_shape = maps.shape
        return maps.mean(dim=(2, 3))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        height, width = ctx.map_shape[2:]
        return (grad / (height * width))[:, :, None, None].expand(ctx.map_shape)


def spatial_mean(maps: torch.Tensor) -> torch.Tensor:
    """Global average pool ``(B, C, H, W) -> (B, C)``, equal to ``maps.mean(dim=(2, 3))``; its gradient is a broadcast
    view, so the trunk's gradients keep their memory layout (see :class:`_SpatialMean`)."""
    return _SpatialMean.apply(maps)


def _cat_or_none(parts: tuple[torch.Tensor | None, ...]) -> torch.Tensor | None:
    return None if parts[0] is None else torch.cat(parts, dim=0)


class SliceEncoderOutput(NamedTuple):
    """Outputs of :class:`SliceEncoder`.

    Attributes:
        embedding: multi-scale slice embedding, (B, d) for images or (B, N, d) for volumes; None when
            ``return_embedding`` is False.
        pooled: global-average pool of stage 4, (B, C4) or (B, N, C4).
        features: the five stage maps (stem, stage 1-4), slices folded into the batch for volumes; empty when
            ``return_features`` is False.
    """

    embedding: torch.Tensor | None
    pooled: torch.Tensor
    features: tuple[torch.Tensor, ...]


class SliceEncoder(nn.Module):
    """ResNet slice encoder ``f_intra`` shared by 2D images and the slices of 3D volumes.

    The slice embedding follows the paper: the global-average pools of the outputs of stages 1-4 are each
    L2-normalised, concatenated (960 channels for ResNet-18/34, 3840 for ResNet-50) and mapped linearly to
    ``embed_dim`` (640 by default). Unlike the authors' public code, this projection is an ordinary trained layer.

    Shapes:
        - images ``(B, C, H, W)`` -> embedding ``(B, d)``, pooled ``(B, C4)``;
        - volumes ``(B, C, N, H, W)`` -> embedding ``(B, N, d)``, pooled ``(B, N, C4)``; the N slices are folded into
          the batch and encoded ``slice_chunk`` at a time, so activation memory stays bounded for large N
          (``gradient_checkpointing`` also bounds it during training).
        - feature maps: stem ``(*, 64, H/2, W/2)`` then stages 1-4 at strides 4, 8, 16, 32.

    Args:
        depth: ResNet depth, 18, 34 or 50 (torchvision architecture, randomly initialised).
        in_channels: input channels (1 for grayscale X-ray, CT and MR).
        embed_dim: width ``d`` of the slice embedding.
        slice_chunk: slices encoded per forward call for volumes; ``None`` encodes all at once.
        gradient_checkpointing: recompute each chunk's activations in the backward pass (training memory ~ one chunk).
        channels_last: keep the ResNet trunk's weights, and the images it encodes, in channels-last (NHWC) memory
            format, which cuDNN's tensor-core convolutions prefer; values equal the default layout's up to rounding.

    Reference: Nguyen et al., "Joint Self-Supervised Image-Volume Representation Learning with Intra-Inter
    Contrastive Clustering", AAAI 2023, arXiv 2212.01893.
    """

    def __init__(
        self,
        depth: int = 50,
        in_channels: int = 1,
        embed_dim: int = 640,
        slice_chunk: int | None = None,
        gradient_checkpointing: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if depth not in RESNET_BUILDERS:
            raise ValueError(f"depth must be one of {sorted(RESNET_BUILDERS)}, got {depth}.")
        if slice_chunk is not None and slice_chunk < 1:
            raise ValueError(f"slice_chunk must be a positive integer or None, got {slice_chunk}.")
        trunk = RESNET_BUILDERS[depth](weights=None)
        trunk.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        del trunk.fc, trunk.avgpool
        self.trunk = trunk.to(memory_format=torch.channels_last) if channels_last else trunk
        self.depth = depth
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        self.slice_chunk = slice_chunk
        self.gradient_checkpointing = gradient_checkpointing
        self.channels_last = channels_last
        expansion = 4 if depth == 50 else 1
        self.stage_channels: tuple[int, ...] = (64,) + tuple(c * expansion for c in (64, 128, 256, 512))
        self.pooled_dim = self.stage_channels[-1]
        self.embedding_proj = nn.Linear(sum(self.stage_channels[1:]), embed_dim)

    def _encode(
        self, images: torch.Tensor, return_features: bool, return_embedding: bool
    ) -> tuple[torch.Tensor | None, ...]:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        maps = resnet_stage_maps(self.trunk, images)
        pooled = spatial_mean(maps[-1])
        embedding = None
        if return_embedding:
            means = [spatial_mean(m) for m in maps[1:-1]] + [pooled]
            embedding = self.embedding_proj(torch.cat([F.normalize(mean, dim=1) for mean in means], dim=1))
        return (embedding, pooled, *maps) if return_features else (embedding, pooled)

    def encode_images(
        self, images: torch.Tensor, return_features: bool = True, return_embedding: bool = True
    ) -> SliceEncoderOutput:
        """Encode a stack of 2D images ``(B, C, H, W)``, ``slice_chunk`` images at a time. ``return_embedding=False``
        skips the multi-scale embedding (its ``embedding`` is None), for callers that only need ``pooled`` or the
        feature maps."""
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}.")
        if images.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {images.shape[1]}.")
        chunk = self.slice_chunk or max(images.shape[0], 1)
        parts = []
        for start in range(0, images.shape[0], chunk):
            block = images[start : start + chunk]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                parts.append(checkpoint(self._encode, block, return_features, return_embedding, use_reentrant=False))
            else:
                parts.append(self._encode(block, return_features, return_embedding))
        merged = parts[0] if len(parts) == 1 else [_cat_or_none(items) for items in zip(*parts, strict=True)]
        return SliceEncoderOutput(merged[0], merged[1], tuple(merged[2:]))

    def forward(self, x: torch.Tensor, return_features: bool = True) -> SliceEncoderOutput:
        if x.ndim == 4:
            return self.encode_images(x, return_features)
        if x.ndim != 5:
            raise ValueError(f"expected (B, C, H, W) images or (B, C, N, H, W) volumes, got {tuple(x.shape)}.")
        batch, channels, num_slices = x.shape[:3]
        slices = x.permute(0, 2, 1, 3, 4).reshape(batch * num_slices, channels, *x.shape[3:])
        out = self.encode_images(slices, return_features)
        return SliceEncoderOutput(
            out.embedding.reshape(batch, num_slices, -1), out.pooled.reshape(batch, num_slices, -1), out.features
        )
