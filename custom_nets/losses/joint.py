"""The joint objective ``L = w_intra * L_intra + w_inter * L_inter + w_mask * L_mask`` of arXiv 2212.01893, plus an
optional dense term ``w_dense * L_dense``."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["JointLoss"]

PAPER_TERMS = ("intra", "inter", "mask")
TERMS = (*PAPER_TERMS, "dense")


def _present_terms(prediction: Mapping) -> dict[str, bool]:
    """Which parts of the network output are in this batch (2D items for intra, volumes for inter and mask)."""
    projections = prediction.get("intra_projection") or []
    return {
        "intra": "intra_scores" in prediction and len(projections) > 0 and projections[0].shape[0] > 0,
        "inter": "inter_scores" in prediction and "inter_projection" in prediction,
        "mask": "mask_prediction" in prediction and "mask_target" in prediction,
        "dense": "dense_scores" in prediction and sum(group.shape[0] for group in prediction["dense_scores"][0]) > 0,
    }


def host_process_group() -> dist.ProcessGroup | None:
    """A process group of every rank that reduces CPU tensors: the default group when its backend has gloo (None),
    otherwise a gloo group created once per default group (a collective call, made by every rank at the same point).
    A check reduced there makes the host wait for the other ranks' hosts, never for its own GPU's queued work."""
    if "gloo" in str(dist.get_backend()):
        return None
    return _gloo_group(dist.group.WORLD)


@functools.lru_cache(maxsize=1)
def _gloo_group(world: dist.ProcessGroup) -> dist.ProcessGroup:
    """The gloo group beside ``world`` (created again only when the default group is a new one)."""
    return dist.new_group(backend="gloo")


def _check_same_terms_on_all_ranks(present: dict[str, bool]) -> None:
    """Sinkhorn all-reduces inside a term, so a term present on one rank only would hang: fail clearly instead. The
    flags are host values and are compared on the host (:func:`host_process_group`): with NCCL, a GPU all-reduce and
    ``torch.equal`` would make the host wait for the forward pass at every step."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    group = host_process_group()
    flags = torch.tensor([float(present[name]) for name in TERMS])
    low, high = flags.clone(), flags.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(low, high):
        raise RuntimeError(
            f"rank {dist.get_rank()}: loss terms present in this batch differ between ranks (this rank: "
            f"{ {name: present[name] for name in TERMS} }); every rank's batch must mix 2D items and volumes the "
            "same way (give each rank the same composition, e.g. a per-rank sampler of fixed 2D/3D counts)."
        )


class JointLoss(nn.Module):
    """Joint image-volume self-supervised loss of arXiv 2212.01893:
    ``L = w_intra * L_intra + w_inter * L_inter + w_mask * L_mask``.

    Components are built from the bundle config; each is optional (``None`` disables it):
        ``intra``: a clustering loss (:class:`SwAVLoss` or :class:`DeepClusterV2Loss`) on 2D images and slices, called
        as ``intra(prediction["intra_projection"], prediction["intra_scores"], target["intra_index"])``.
        ``inter``: a clustering loss on the two volume features, called with ``inter_projection``, ``inter_scores``,
        ``target["inter_index"]``.
        ``mask``: :class:`MaskedSlicePredictionLoss`, called with ``mask_prediction``, ``mask_target``,
        ``slice_mask``, ``slice_valid``.
        ``dense``: :class:`DenseSwAVLoss` on the locations of the global 2D views, called with ``dense_scores``,
        ``dense_coordinates``, ``dense_cell_size``: not part of the paper's objective (an option for dense downstream
        tasks; off by default).
    A term whose inputs are missing from the network output (a batch with only 2D items or only volumes) is skipped
    and counts 0. Under ``torch.distributed`` every rank must have the same terms present (checked, clear error).

    ``forward(prediction, target)``: the network's train-mode dict and ``{"intra_index": (M_0,), "inter_index":
    (B3,)}`` (``target`` may be ``None`` when no component needs ids) -> scalar loss. After each call ``terms`` holds
    detached scalars ``intra``, ``inter``, ``mask`` (unweighted; ``dense`` too when configured) and ``total`` for
    logging.

    Args:
        intra, inter, mask, dense: the component losses.
        w_intra, w_inter, w_mask, w_dense: their weights (1 by default; the paper publishes none).
    """

    def __init__(
        self,
        intra: nn.Module | None = None,
        inter: nn.Module | None = None,
        mask: nn.Module | None = None,
        w_intra: float = 1.0,
        w_inter: float = 1.0,
        w_mask: float = 1.0,
        dense: nn.Module | None = None,
        w_dense: float = 1.0,
    ) -> None:
        super().__init__()
        if intra is None and inter is None and mask is None and dense is None:
            raise ValueError("JointLoss needs at least one of intra, inter, mask, dense.")
        self.intra = intra
        self.inter = inter
        self.mask = mask
        self.dense = dense
        self.weights = {"intra": w_intra, "inter": w_inter, "mask": w_mask, "dense": w_dense}
        self.terms: dict[str, torch.Tensor] = {}

    def forward(self, prediction: Mapping, target: Mapping | None = None) -> torch.Tensor:
        target = target or {}
        present = _present_terms(prediction)
        _check_same_terms_on_all_ranks(present)
        values: dict[str, torch.Tensor] = {}
        if self.intra is not None and present["intra"]:
            values["intra"] = self.intra(
                prediction["intra_projection"], prediction["intra_scores"], target.get("intra_index")
            )
        if self.inter is not None and present["inter"]:
            values["inter"] = self.inter(
                prediction["inter_projection"], prediction["inter_scores"], target.get("inter_index")
            )
        if self.mask is not None and present["mask"]:
            values["mask"] = self.mask(
                prediction["mask_prediction"],
                prediction["mask_target"],
                prediction["slice_mask"],
                prediction["slice_valid"],
            )
        if self.dense is not None and present["dense"]:
            values["dense"] = self.dense(
                prediction["dense_scores"], prediction["dense_coordinates"], prediction["dense_cell_size"]
            )
        if not values:
            configured = [name for name in TERMS if getattr(self, name) is not None]
            raise ValueError(
                f"no configured loss term ({configured}) applies to this batch (network output keys: "
                f"{sorted(prediction)}); e.g. a volume-only term received a batch without volumes."
            )
        total = torch.stack([self.weights[name] * value for name, value in values.items()]).sum()
        zero = total.detach().new_zeros(())
        logged = PAPER_TERMS if self.dense is None else TERMS
        self.terms = {name: values[name].detach() if name in values else zero for name in logged}
        self.terms["total"] = total.detach()
        return total
