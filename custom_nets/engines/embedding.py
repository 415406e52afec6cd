"""Embedding extraction with a MONAI evaluator: one vector per 2D image or 3D volume, optionally one per slice."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from monai.engines.utils import PrepareBatch
from monai.inferers import Inferer
from monai.utils import convert_to_tensor
from torch import nn

__all__ = ["EmbeddingInferer", "EmbeddingPrepareBatch"]


class EmbeddingPrepareBatch(PrepareBatch):
    """``prepare_batch`` for :class:`monai.engines.SupervisedEvaluator` on single 2D images or volumes.

    Takes the ``image`` tensor, ``(B, C, H, W)`` or ``(B, C, N, H, W)``, as input and passes ``slice_valid`` and
    ``slice_position`` (volumes) to the inferer as keyword arguments; there is no target.
    """

    def __call__(
        self,
        batchdata: Mapping[str, object],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: object,
    ) -> tuple[torch.Tensor, None, tuple, dict[str, torch.Tensor]]:
        image = convert_to_tensor(batchdata["image"], device=device, track_meta=False)
        extra = {}
        if image.ndim == 5:
            for key in ("slice_valid", "slice_position"):
                if batchdata.get(key) is not None:
                    extra[key] = convert_to_tensor(batchdata[key], device=device, track_meta=False)
        return image, None, (), extra


class EmbeddingInferer(Inferer):
    """Runs a :class:`custom_nets.nets.JointSSLNet` in eval mode and returns a dict of embeddings.

    Output: ``{"embedding": (B, d)}``: the slice embedding of ``f_intra`` for images, the unit-norm volume feature of
    ``f_inter`` for volumes; with ``per_slice=True`` volumes also give ``"slice_embeddings"`` ``(B, N, d)`` (the
    per-slice output tokens of ``f_inter``, zero on padding).
    """

    def __init__(self, per_slice: bool = False) -> None:
        super().__init__()
        self.per_slice = per_slice

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: object, **kwargs: object) -> dict:
        model = network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
        if inputs.ndim == 4:
            return {"embedding": model(inputs)}
        encoding = model.embed_volume(inputs, kwargs.get("slice_valid"), kwargs.get("slice_position"))
        output = {"embedding": encoding.volume_feature}
        if self.per_slice:
            output["slice_embeddings"] = encoding.tokens
        return output
