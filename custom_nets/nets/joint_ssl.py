"""The pretraining network of arXiv 2212.01893: ``f_intra`` + ``f_inter`` + projection, prototypes, mask decoder."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from custom_nets.nets.slice_encoder import SliceEncoder, SliceEncoderOutput
from custom_nets.nets.slice_transformer import SliceTransformer

__all__ = [
    "COMPILE_MODES",
    "JointSSLNet",
    "VolumeEncoding",
    "location_coordinates",
    "sample_slice_mask",
    "sample_slice_window",
    "valid_slice_rows",
    "views_by_size",
]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's modes


def valid_slice_rows(slice_valid: torch.Tensor) -> torch.Tensor:
    """Flat indices ``(S,)`` into ``B * N`` of the valid slices of ``(B, N)`` bool ``slice_valid``, volume-major.

    On a GPU this waits for the device (the count of valid slices decides the size). :class:`JointPrepareBatch`
    computes it on the host, before the batch is copied, and passes it as ``slice_rows``; with it, and with
    ``intra_rows``, the training forward pass never waits for the GPU.
    """
    return slice_valid.flatten().nonzero().squeeze(1)


def views_by_size(views: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of the ``(B_v, C, H, W)`` views that share one ``(C, H, W)``, in order of first appearance: the groups
    that ``JointSSLNet(group_views=True)`` encodes in one call."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, view in enumerate(views):
        groups.setdefault(tuple(view.shape[1:]), []).append(index)
    return list(groups.values())


def gather_slices(volume: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The slices at flat ``rows`` (into ``B * N``) of ``(B, C, N, H, W)`` volumes, as ``(S, C, H, W)`` images."""
    batch, channels, num_slices = volume.shape[:3]
    return volume.transpose(1, 2).reshape(batch * num_slices, channels, *volume.shape[3:]).index_select(0, rows)


def scatter_slices(embedding: torch.Tensor, rows: torch.Tensor, volume_shape: Sequence[int]) -> torch.Tensor:
    """Per-slice ``(S, d)`` ``embedding`` of the slices at flat ``rows`` -> ``(B, N, d)``, zero at the other slices
    (``volume_shape`` = ``(B, N)``)."""
    batch, num_slices = volume_shape
    flat = embedding.new_zeros(batch * num_slices, embedding.shape[-1])
    return flat.index_copy(0, rows, embedding).view(batch, num_slices, -1)


def sample_slice_mask(
    slice_valid: torch.Tensor, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Choose ``max(1, round(ratio * n_valid))`` valid slices of each volume to mask; returns ``(B, N)`` bool."""
    scores = torch.rand(slice_valid.shape, generator=generator, device=slice_valid.device)
    scores = scores.masked_fill(~slice_valid, 2.0)  # padding sorts last, never chosen
    num_valid = slice_valid.sum(dim=1)
    num_masked = torch.clamp(torch.round(num_valid.float() * ratio).long(), min=1)
    num_masked = torch.minimum(num_masked, num_valid)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return ranks < num_masked[:, None]


def sample_slice_window(
    slice_valid: torch.Tensor, scale: Sequence[float], generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep a random run of consecutive valid slices per volume, ``max(1, round(u * n_valid))`` long with ``u`` drawn
    uniformly from ``scale``; returns ``(B, N)`` bool, a subset of ``slice_valid``."""
    num_valid = slice_valid.sum(dim=1)
    fraction = torch.empty(num_valid.shape, device=slice_valid.device).uniform_(scale[0], scale[1], generator=generator)
    length = torch.minimum(torch.clamp(torch.round(num_valid.float() * fraction).long(), min=1), num_valid)
    start = torch.rand(num_valid.shape, generator=generator, device=slice_valid.device) * (num_valid - length + 1)
    start = start.long()
    rank = slice_valid.long().cumsum(dim=1) - 1  # index of each valid slice among the valid ones
    return slice_valid & (rank >= start[:, None]) & (rank < (start + length)[:, None])


class VolumeEncoding(NamedTuple):
    """Outputs of :meth:`JointSSLNet.embed_volume` for ``(B, C, N, H, W)`` volumes with ``S`` valid slices.

    Attributes:
        slice_embeddings: ``f_intra`` slice embeddings ``(B, N, d)``, zero on padding.
        volume_feature: unit-norm ``f_inter`` volume feature ``(B, d)``.
        tokens: ``f_inter`` output tokens ``(B, N, d)``.
        pooled: stage-4 pools ``(S, C4)`` of the valid slices (volume-major).
        stage_map: the feature map of one ``f_intra`` stage ``(S, C_k, h, w)`` of the valid slices when asked for,
            else None.
    """

    slice_embeddings: torch.Tensor
    volume_feature: torch.Tensor
    tokens: torch.Tensor
    pooled: torch.Tensor
    stage_map: torch.Tensor | None


def _locations(maps: torch.Tensor) -> torch.Tensor:
    """``(M, C, h, w)`` feature maps -> ``(M, h * w, C)`` location vectors."""
    return maps.flatten(2).transpose(1, 2)


def location_coordinates(
    geometry: torch.Tensor, map_size: Sequence[int], input_size: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the locations of a feature map lie in the source images of its views.

    Args:
        geometry: ``(M, 3, 3)`` view-to-source maps of pixel coordinates (:func:`custom_nets.data.views.view_geometry`).
        map_size: ``(h, w)`` of the feature map; input_size: ``(H, W)`` of the view it was computed from.

    Returns:
        ``(M, h * w, 2)`` source pixel coordinates of the location centres (row-major, as ``flatten``), and ``(M,)`` the
        side of one location's cell in source pixels. The cells split the view evenly (``H / h`` by ``W / w`` pixels),
        which is exact when the view's size is a multiple of the stage's stride.
    """
    strides = [float(size) / float(cells) for size, cells in zip(input_size, map_size, strict=True)]
    axes = [
        (torch.arange(cells, dtype=torch.float32, device=geometry.device) + 0.5) * stride - 0.5
        for cells, stride in zip(map_size, strides, strict=True)
    ]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 2)
    linear, offset = geometry[:, :2, :2].float(), geometry[:, :2, 2].float()
    coordinates = torch.einsum("mij,lj->mli", linear, grid) + offset[:, None]
    cell = torch.linalg.det(linear).abs().sqrt() * math.sqrt(strides[0] * strides[1])
    return coordinates, cell


def _view_geometry(batch: Mapping[str, object], key: str, view: int) -> torch.Tensor:
    geometry = batch.get(key)
    if geometry is None:
        raise ValueError(
            f"the dense head needs each view's geometry, batch key {key!r} (per view (B, 3, 3), made by "
            "ImageMultiCropd / VolumeTwoViewsd and joint_collate); pass it, or set dense_prototypes to 0."
        )
    return geometry[view]


def _projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """SwAV's projection MLP ``Linear -> BatchNorm -> ReLU -> Linear`` (normalised by the caller)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
    )


def _prototype_heads(dim: int, num_prototypes: Sequence[int]) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(dim, k, bias=False) for k in num_prototypes)


class JointSSLNet(nn.Module):
    """Joint image-volume self-supervised network (arXiv 2212.01893, Fig. 2).

    Train mode, ``forward(batch)`` with ``batch`` a mapping of
        ``image_views``: list of ``(B2, C, H_v, W_v)`` (views 0 and 1 global, others small crops),
        ``volume_views``: list of two ``(B3, C, N, H, W)`` views with the same slice sampling,
        ``slice_valid`` ``(B3, N)`` bool and ``slice_position`` ``(B3, N)`` float (mm), optionally
        ``intra_slices`` ``(B3, N)`` bool: the valid slices that enter the 2D clustering (default: all valid slices),
        and optionally ``slice_rows`` / ``intra_rows``, the same selections as long indices (see
        :class:`custom_nets.engines.JointPrepareBatch`, which computes them on the host): with them the forward pass
        never makes the host wait for the GPU; without them they are computed here (one wait each).
    ``f_inter`` runs once over the sequences of both volume views (``2 * B3``).
    It returns a dict:
        ``intra_projection``: per 2D view ``(M_v, P)``, unit norm. Views 0/1 hold the B2 images then the
        ``intra_slices`` of the volumes (volume-major); small-crop views hold the B2 images only.
        ``intra_scores``: per prototype head, per view ``(M_v, K_h)``.
        ``inter_projection``: two ``(B3, P)`` unit-norm projections of the volume features of the masked sequences
        (``(B3, d)``: the volume features themselves when ``inter_projection_head`` is False).
        ``inter_scores``: per 3D head, per view ``(B3, K_h)``.
        ``mask_prediction``, ``mask_target`` (detached): ``(2, B3, N, d)``;
        ``slice_mask``, ``slice_valid``: ``(B3, N)``; this ``slice_valid`` holds the slices that both views'
        ``f_inter`` saw (the input's valid slices unless ``inter_slice_scale`` narrows them), so the masked loss never
        scores a token the slice transformer did not compute.
        ``slice_embedding`` (detached): ``(B2 + S, d)`` ``f_intra`` embeddings of view 0: the B2 images, then the ``S``
        valid slices of the volumes (volume-major, every valid slice).
        ``volume_feature`` (detached): ``(B3, d)`` unit-norm ``f_inter`` volume features of view 0 (of the masked
        sequence), before any projection head.
        The last two feed no loss; monitors read them (e.g. :class:`custom_nets.engines.handlers.EffectiveRankMonitor`).
        With ``dense_prototypes > 0`` (the batch then also holds ``image_view_geometry`` / ``volume_view_geometry``,
        per view ``(B, 3, 3)`` from :func:`custom_nets.data.views.view_geometry`): ``dense_scores``, per global view
        (0, 1), per group (the images, then the ``intra_slices`` of the volumes), ``(M_g, h * w, K_dense)`` prototype
        scores of the unit-norm dense projections of the ``dense_stage`` map of ``f_intra``; ``dense_coordinates``,
        the same layout ``(M_g, h * w, 2)``: the source-image pixel coordinates of the location centres; and
        ``dense_cell_size`` ``(M_g,)``: a location's cell side in source pixels (see
        :class:`custom_nets.losses.DenseSwAVLoss`).
    Keys of the 3D part are absent when there is no volume, and the projections are empty lists without 2D items.

    Eval mode, ``forward(x)`` returns one tensor so that MONAI's export and checking tools work:
        ``(B, C, H, W)`` -> ``(B, d)`` slice embedding; ``(B, C, N, H, W)`` -> ``(B, d)`` unit-norm volume feature
        (``slice_valid`` / ``slice_position`` may be passed as keyword arguments).

    Args:
        encoder_depth, in_channels, embed_dim, slice_chunk, gradient_checkpointing: see :class:`SliceEncoder`.
        transformer_layers, num_heads, num_points, ffn_dim, dropout: see :class:`SliceTransformer`.
        projection_hidden_dim, projection_dim: the projection MLPs (2D: on the stage-4 pool, 2048 -> 128 in the paper).
        intra_prototypes: prototype counts of the 2D heads (SwAV: ``(3000,)``; DeepCluster-v2: ``(3000,) * 3``).
        inter_prototypes: prototype counts of the 3D heads.
        inter_projection_head: cluster the volume features through their own projection MLP (``d -> hidden -> P``,
            as the 2D branch does) rather than directly. The mean of the slice transformer's tokens is nearly the
            same vector for every volume at initialisation (pairwise cosine ~0.99), and with the few volumes of a
            batch the Sinkhorn codes on it stay uniform: measured on the demo, prototypes scored on the raw feature
            let ``f_inter`` collapse to one constant vector. The head's batch norm removes the shared component.
            The attribute ``inter_projection_dim`` is the width the 3D prototypes score (``projection_dim`` or ``d``).
        inter_slice_scale: ``(low, high)``: each 3D view's ``f_inter`` sees only a random run of consecutive valid
            slices, a fraction in [low, high] of them, so ``L_inter`` asks for a volume feature that does not depend on
            which part of the volume is seen. Slice encoding, ``L_intra`` pairs and mask targets still use every valid
            slice; masked slices are drawn where both views' runs overlap. None (the paper): every valid slice.
        mask_ratio: fraction of valid slices replaced by the mask token (at least one per volume); 0 disables masking.
        freeze_slice_encoder: keep ``f_intra`` fixed (no gradients, batch-norm statistics frozen), as in stage B of the
            staged schedule (masked prediction with ``f_intra`` frozen).
        freeze_stem: keep the first convolution and batch-norm affine of ``f_intra`` at their random initialisation (no
            gradients; the batch-norm running statistics still follow the data), as MoCo v3 freezes its random patch
            projection (Chen, Xie and He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV
            2021). Measured on the demo: pretraining otherwise turns the stem into a low-pass filter bank that
            fine-tuning with a few labelled volumes does not undo (see the pretrain_joint docs).
        channels_last: the 2D encoder ``f_intra`` in channels-last memory format (see :class:`SliceEncoder`).
        dense_prototypes: prototypes of the optional dense clustering head (0: none, the paper's network). The head
            projects every location of the ``dense_stage`` map of the two global views with its own projection MLP
            (``C_k -> projection_hidden_dim -> projection_dim``, a 1 x 1 convolution stack) for
            :class:`custom_nets.losses.DenseSwAVLoss`; it is not part of arXiv 2212.01893 (see that loss).
        dense_stage: the ``f_intra`` stage (1-4, strides 4-32) whose map the dense head reads.
        group_views: in pretraining, encode the views of one kind and one size in one ``f_intra`` call (the two global
            image crops together, the small crops together, the two volume views' slices together), as SwAV's
            multi-crop forward does; False (the default): one call per view. Fewer, larger kernels (the benchmark's
            demo shape: 2064 -> 1310 kernel launches per step, counted on the CPU), and batch-norm statistics then
            span the views of a group instead of one view. Images and volume slices are never mixed in one call.
        compile_slice_transformer: a ``torch.compile`` mode (one of :data:`COMPILE_MODES`) to compile ``f_inter`` with,
            in place (weight names unchanged), or None (the default): eager. On a GPU at the slice counts of real
            volumes ``f_inter`` is bound by the host's kernel launches, which compilation fuses (the fused slice
            sampling is a ``torch.library`` operator, so the graph does not break there); ``"reduce-overhead"`` also
            replays it as CUDA graphs. The first steps pay the compilation (tens of seconds); a new batch or slice
            count may compile again (then with dynamic shapes).
    """

    def __init__(
        self,
        encoder_depth: int = 50,
        in_channels: int = 1,
        embed_dim: int = 640,
        slice_chunk: int | None = None,
        gradient_checkpointing: bool = False,
        transformer_layers: int = 4,
        num_heads: int = 8,
        num_points: int = 4,
        ffn_dim: int = 720,
        dropout: float = 0.1,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 128,
        intra_prototypes: Sequence[int] = (3000,),
        inter_prototypes: Sequence[int] = (3000,),
        inter_projection_head: bool = True,
        inter_slice_scale: Sequence[float] | None = None,
        mask_ratio: float = 0.1,
        freeze_slice_encoder: bool = False,
        freeze_stem: bool = False,
        channels_last: bool = False,
        dense_prototypes: int = 0,
        dense_stage: int = 4,
        group_views: bool = False,
        compile_slice_transformer: str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
        if compile_slice_transformer is not None and compile_slice_transformer not in COMPILE_MODES:
            raise ValueError(
                f"compile_slice_transformer must be None (eager) or one of {COMPILE_MODES}, "
                f"got {compile_slice_transformer!r}."
            )
        self.slice_encoder = SliceEncoder(
            encoder_depth, in_channels, embed_dim, slice_chunk, gradient_checkpointing, channels_last
        )
        self.slice_transformer = SliceTransformer(
            embed_dim, transformer_layers, num_heads, num_points, ffn_dim, dropout
        )
        if compile_slice_transformer is not None:
            self.slice_transformer.compile(mode=compile_slice_transformer)
        self.projection_head = _projection_head(self.slice_encoder.pooled_dim, projection_hidden_dim, projection_dim)
        self.intra_prototypes = _prototype_heads(projection_dim, intra_prototypes)
        self.inter_projection_head = (
            _projection_head(embed_dim, projection_hidden_dim, projection_dim) if inter_projection_head else None
        )
        self.inter_projection_dim = projection_dim if inter_projection_head else embed_dim
        self.inter_prototypes = _prototype_heads(self.inter_projection_dim, inter_prototypes)
        self.mask_decoder = nn.Linear(embed_dim, embed_dim)
        if dense_prototypes < 0 or dense_stage not in (1, 2, 3, 4):
            raise ValueError(
                f"dense_prototypes must be >= 0 and dense_stage one of 1-4, got {dense_prototypes} and {dense_stage}."
            )
        self.dense_stage = dense_stage if dense_prototypes > 0 else None
        self.dense_projection_head = (
            _projection_head(self.slice_encoder.stage_channels[dense_stage], projection_hidden_dim, projection_dim)
            if dense_prototypes > 0
            else None
        )
        self.dense_prototypes = _prototype_heads(projection_dim, (dense_prototypes,) if dense_prototypes > 0 else ())
        if inter_slice_scale is not None and not 0.0 < inter_slice_scale[0] <= inter_slice_scale[1] <= 1.0:
            raise ValueError(f"inter_slice_scale must satisfy 0 < low <= high <= 1, got {inter_slice_scale}.")
        self.inter_slice_scale = None if inter_slice_scale is None else tuple(inter_slice_scale)
        self.mask_ratio = mask_ratio
        self.group_views = group_views
        self.freeze_slice_encoder = freeze_slice_encoder
        self.slice_encoder.requires_grad_(not freeze_slice_encoder)
        for stem_module in (self.slice_encoder.trunk.conv1, self.slice_encoder.trunk.bn1):
            stem_module.requires_grad_(not (freeze_stem or freeze_slice_encoder))

    def train(self, mode: bool = True) -> JointSSLNet:
        super().train(mode)
        if self.freeze_slice_encoder:
            self.slice_encoder.eval()
        return self

    def forward(
        self,
        x: torch.Tensor | Mapping[str, object],
        slice_valid: torch.Tensor | None = None,
        slice_position: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, object]:
        if isinstance(x, Mapping):
            return self.pretraining_outputs(x)
        if x.ndim == 4:
            return self.slice_encoder(x, return_features=False).embedding
        return self.embed_volume(x, slice_valid, slice_position)[1]

    def embed_volume(
        self,
        volume: torch.Tensor,
        slice_valid: torch.Tensor | None = None,
        slice_position: torch.Tensor | None = None,
        slice_mask: torch.Tensor | None = None,
        transformer_valid: torch.Tensor | None = None,
        stage: int | None = None,
    ) -> VolumeEncoding:
        """Encode ``(B, C, N, H, W)`` volumes (see :class:`VolumeEncoding`). Padding slices are never encoded.
        ``transformer_valid`` (a subset of ``slice_valid``) limits the slices that ``f_inter`` sees; ``stage`` (1-4)
        also returns that stage's ``f_intra`` map of the valid slices."""
        if volume.ndim != 5:
            raise ValueError(f"expected volumes (B, C, N, H, W), got {tuple(volume.shape)}.")
        batch, _, num_slices = volume.shape[:3]
        if slice_valid is None:
            slice_valid = torch.ones(batch, num_slices, dtype=torch.bool, device=volume.device)
        embeddings, encoded = self._encode_slices(volume, valid_slice_rows(slice_valid), stage)
        inter_valid = slice_valid if transformer_valid is None else transformer_valid
        out = self.slice_transformer(embeddings, inter_valid, slice_position, slice_mask)
        stage_map = encoded.features[stage] if stage is not None else None
        return VolumeEncoding(embeddings, out.volume_embedding, out.tokens, encoded.pooled, stage_map)

    def _encode_slices(
        self, volume: torch.Tensor, rows: torch.Tensor, stage: int | None
    ) -> tuple[torch.Tensor, SliceEncoderOutput]:
        """``f_intra`` on the slices at flat ``rows`` of ``(B, C, N, H, W)`` volumes: their embeddings scattered to
        ``(B, N, d)`` (zero elsewhere) and the encoder's output for those ``S`` slices. Long indices, no boolean
        masks: nothing here waits for the GPU."""
        encoded = self.slice_encoder.encode_images(gather_slices(volume, rows), return_features=stage is not None)
        return scatter_slices(encoded.embedding, rows, (volume.shape[0], volume.shape[2])), encoded

    def _encode_views(
        self, views: Sequence[torch.Tensor], return_features: Sequence[bool], return_embedding: Sequence[bool]
    ) -> list[SliceEncoderOutput]:
        """``f_intra`` on each ``(B_v, C, H, W)`` view: one call per view, or with ``group_views`` one call per size
        (the views of a size concatenated along the batch, the outputs split back); ``return_features[v]`` and
        ``return_embedding[v]`` ask for view v's feature maps and embedding (otherwise they may be left out)."""
        if not self.group_views:
            return [
                self.slice_encoder.encode_images(view, features, embedding)
                for view, features, embedding in zip(views, return_features, return_embedding, strict=True)
            ]
        encoded: list[SliceEncoderOutput | None] = [None] * len(views)
        for members in views_by_size(views):
            sizes = [views[i].shape[0] for i in members]
            output = self.slice_encoder.encode_images(
                torch.cat([views[i] for i in members]),
                any(return_features[i] for i in members),
                any(return_embedding[i] for i in members),
            )
            embeddings = [None] * len(members) if output.embedding is None else output.embedding.split(sizes)
            parts = [tensor.split(sizes) for tensor in (output.pooled, *output.features)]
            for position, index in enumerate(members):
                per_view = [part[position] for part in parts]
                encoded[index] = SliceEncoderOutput(embeddings[position], per_view[0], tuple(per_view[1:]))
        return encoded

    def pretraining_outputs(self, batch: Mapping[str, object]) -> dict[str, object]:
        """The per-view projections, scores and masked-prediction tensors that :class:`JointLoss` consumes."""
        image_views: Sequence[torch.Tensor] = batch.get("image_views") or []
        volume_views: Sequence[torch.Tensor] = batch.get("volume_views") or []
        if not image_views and not volume_views:
            raise ValueError("the batch holds neither 2D images nor volumes.")
        if volume_views and len(volume_views) != 2:
            raise ValueError(f"expected exactly 2 volume views, got {len(volume_views)}.")
        if image_views and len(image_views) < 2:
            raise ValueError(f"expected at least 2 image views (two global crops), got {len(image_views)}.")
        num_views = max(len(image_views), 2)
        pooled_per_view: list[list[torch.Tensor]] = [[] for _ in range(num_views)]
        # per global view, per group (the images, then the volume slices): (stage map, view geometry, view size)
        dense_maps: list[list[tuple[torch.Tensor, torch.Tensor, Sequence[int]]]] = [[], []]
        slice_embeddings: list[torch.Tensor] = []  # view 0: images, then valid slices
        dense_views = [self.dense_stage is not None and view < 2 for view in range(len(image_views))]
        embedding_views = [view == 0 for view in range(len(image_views))]  # only view 0's enters slice_embedding
        for view, (images, encoded) in enumerate(
            zip(image_views, self._encode_views(image_views, dense_views, embedding_views), strict=True)
        ):
            dense = dense_views[view]
            pooled_per_view[view].append(encoded.pooled)
            if dense:
                geometry = _view_geometry(batch, "image_view_geometry", view)
                dense_maps[view].append((encoded.features[self.dense_stage], geometry, images.shape[-2:]))
            if view == 0:
                slice_embeddings.append(encoded.embedding.detach())
        outputs: dict[str, object] = {}
        if volume_views:
            self._volume_outputs(batch, volume_views, pooled_per_view, dense_maps, slice_embeddings, outputs)
        if self.dense_stage is not None:
            outputs.update(self._dense_outputs(dense_maps))
        outputs["slice_embedding"] = torch.cat(slice_embeddings)
        pooled = [torch.cat(parts, dim=0) for parts in pooled_per_view]
        projections = F.normalize(self.projection_head(torch.cat(pooled, dim=0)), dim=1)
        outputs["intra_projection"] = list(projections.split([p.shape[0] for p in pooled]))
        outputs["intra_scores"] = [[head(z) for z in outputs["intra_projection"]] for head in self.intra_prototypes]
        return outputs

    def _dense_outputs(
        self, dense_maps: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor, Sequence[int]]]]
    ) -> dict[str, list[list[torch.Tensor]]]:
        """Dense projections of every location of the two global views' maps -> prototype scores, and where each
        location lies in its source image."""
        groups = [_locations(maps) for view in dense_maps for maps, _, _ in view]
        flat = torch.cat([group.flatten(0, 1) for group in groups])
        projected = F.normalize(self.dense_projection_head(flat), dim=1)
        scores = self.dense_prototypes[0](projected).split([group.shape[0] * group.shape[1] for group in groups])
        shaped = [part.reshape(*group.shape[:2], -1) for part, group in zip(scores, groups, strict=True)]
        places = [
            [location_coordinates(geometry, maps.shape[-2:], size) for maps, geometry, size in view]
            for view in dense_maps
        ]
        per_view = len(dense_maps[0])
        return {
            "dense_scores": [shaped[:per_view], shaped[per_view:]],
            "dense_coordinates": [[coordinates for coordinates, _ in view] for view in places],
            "dense_cell_size": [[cell for _, cell in view] for view in places],
        }

    def _volume_outputs(
        self,
        batch: Mapping[str, object],
        volume_views: Sequence[torch.Tensor],
        pooled_per_view: list[list[torch.Tensor]],
        dense_maps: list[list[tuple[torch.Tensor, torch.Tensor, Sequence[int]]]],
        slice_embeddings: list[torch.Tensor],
        outputs: dict[str, object],
    ) -> None:
        first = volume_views[0]
        slice_valid = batch.get("slice_valid")
        if slice_valid is None:
            slice_valid = torch.ones(first.shape[0], first.shape[2], dtype=torch.bool, device=first.device)
        rows = batch.get("slice_rows")
        rows = valid_slice_rows(slice_valid) if rows is None else rows
        intra_rows = batch.get("intra_rows")
        if intra_rows is None and batch.get("intra_slices") is not None:
            intra_rows = batch["intra_slices"].flatten().index_select(0, rows).nonzero().squeeze(1)
        slice_position = batch.get("slice_position")
        windows = [slice_valid, slice_valid]
        if self.inter_slice_scale is not None:
            windows = [sample_slice_window(slice_valid, self.inter_slice_scale) for _ in volume_views]
        slice_mask = torch.zeros_like(slice_valid)
        if self.mask_ratio > 0:
            slice_mask = sample_slice_mask(windows[0] & windows[1], self.mask_ratio)
        embeddings = []
        slices = [gather_slices(volume, rows) for volume in volume_views]
        encoded_views = self._encode_views(slices, [self.dense_stage is not None] * len(slices), [True] * len(slices))
        for view, (volume, encoded) in enumerate(zip(volume_views, encoded_views, strict=True)):
            embeddings.append(scatter_slices(encoded.embedding, rows, (volume.shape[0], volume.shape[2])))
            pooled = encoded.pooled
            pooled_per_view[view].append(pooled if intra_rows is None else pooled.index_select(0, intra_rows))
            if self.dense_stage is not None:
                stage_map = encoded.features[self.dense_stage]
                geometry = _view_geometry(batch, "volume_view_geometry", view)
                geometry = (
                    geometry[:, None].expand(-1, slice_valid.shape[1], -1, -1).flatten(0, 1).index_select(0, rows)
                )
                if intra_rows is not None:
                    stage_map, geometry = stage_map.index_select(0, intra_rows), geometry.index_select(0, intra_rows)
                dense_maps[view].append((stage_map, geometry, volume.shape[-2:]))
            if view == 0:
                slice_embeddings.append(encoded.embedding.detach())
        # one f_inter pass over both views (2 * B3 sequences): half the kernel launches of one pass per view
        positions = None if slice_position is None else torch.cat([slice_position, slice_position])
        masks = torch.cat([slice_mask, slice_mask]) if self.mask_ratio > 0 else None
        inter = self.slice_transformer(torch.cat(embeddings), torch.cat(windows), positions, masks)
        volume_features = list(inter.volume_embedding.chunk(2))
        outputs["volume_feature"] = volume_features[0].detach()
        if self.inter_projection_head is not None:
            projected = F.normalize(self.inter_projection_head(inter.volume_embedding), dim=1)
            volume_features = list(projected.chunk(2))
        outputs["inter_projection"] = volume_features
        outputs["inter_scores"] = [[head(z) for z in volume_features] for head in self.inter_prototypes]
        outputs["mask_prediction"] = self.mask_decoder(inter.tokens).unflatten(0, (2, -1))
        outputs["mask_target"] = torch.stack(embeddings).detach()
        outputs["slice_mask"] = slice_mask
        outputs["slice_valid"] = windows[0] & windows[1]
