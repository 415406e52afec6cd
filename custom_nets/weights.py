"""Save, load, convert and report the weights of ``f_intra``, ``f_inter`` and the whole pretraining network.

Every file written here is a flat ``state_dict`` (tensors only) so that ``torch.load(..., weights_only=True)``, MONAI's
bundle loader and MONAI Label read it. Loaders accept a flat state dict, a checkpoint ``{"model": ...}`` /
``{"network": ...}`` / ``{"state_dict": ...}``, DDP's ``module.`` prefixes, a whole :class:`JointSSLNet` state dict or a
sub-module's own state dict, and report which keys matched.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from custom_nets.atomic_files import atomic_path, atomic_write_text
from custom_nets.nets.deformable_attention import merge_sampling_projections

__all__ = [
    "WeightLoadReport",
    "WeightShapeError",
    "adapt_input_channels",
    "atomic_torch_save",
    "check_whole_network_file",
    "export_pretrained",
    "initialize_from",
    "load_file",
    "load_backbone_weights",
    "load_slice_encoder_weights",
    "load_slice_transformer_weights",
    "load_weights",
    "read_state_dict",
    "save_weights",
]

logger = logging.getLogger(__name__)

CHECKPOINT_KEYS = ("model", "network", "state_dict", "net")
INPUT_CONV_SUFFIX = "conv1.weight"


class WeightShapeError(RuntimeError):
    """A checkpoint tensor does not fit the network's parameter of the same name."""


@dataclass
class WeightLoadReport:
    """Which keys of a network were filled from a checkpoint.

    Attributes:
        matched: network keys loaded from the checkpoint.
        missing: network keys the checkpoint did not provide (they keep their initial values).
        unexpected: checkpoint keys (after prefix selection) that the network does not have.
        adapted: keys whose tensor was converted, e.g. the first convolution to another number of input channels.
    """

    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"matched {len(self.matched)}, missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
            f"adapted {len(self.adapted)}"
        ]
        for name in ("missing", "unexpected", "adapted"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
                lines.append(f"  {name}: {shown}")
        return "\n".join(lines)


def load_file(path: str | os.PathLike) -> dict:
    """``torch.load`` a weights or checkpoint file safely (``weights_only``), with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}. Check the path (e.g. the pretrained_ckpt key).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors all mean the same thing to the user
        raise RuntimeError(f"could not read weights from {path}: {error}. Is it a PyTorch state dict?") from error


def read_state_dict(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read a flat state dict from a file or mapping, unwrapping checkpoint dicts and DDP ``module.`` prefixes; the
    slice attention's weights of earlier versions come back in today's layout."""
    state = dict(source) if isinstance(source, Mapping) else load_file(source)
    for key in CHECKPOINT_KEYS:
        if key in state and isinstance(state[key], Mapping):
            state = dict(state[key])
            break
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source!s:.200} does not hold a flat state dict of tensors (keys: {list(state)[:5]}).")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return merge_sampling_projections(state)  # f_inter weights saved before its two sampling projections became one


def select_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under ``prefix`` with it stripped; the state unchanged when no key carries the prefix."""
    if prefix and any(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def adapt_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Convert first-convolution kernels ``(O, C_old, kh, kw)`` to ``C_new`` input channels.

    The kernels are summed over the old channels and spread evenly over the new ones, so a grayscale image repeated
    over the new channels gives the same response as the pretrained network on the grayscale image.
    """
    summed = weight.sum(dim=1, keepdim=True)
    return summed.repeat(1, in_channels, 1, 1) / in_channels


def match_state(
    state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], adapt_channels: bool = True
) -> tuple[WeightLoadReport, dict[str, torch.Tensor], list[str]]:
    """Compare a checkpoint ``state`` with a network's own state dict ``own``, loading nothing.

    Returns:
        the report, the tensors to load (converted to the network's dtypes; adaptable first convolutions adapted),
        and one line per tensor whose shape does not fit.
    """
    report = WeightLoadReport()
    to_load: dict[str, torch.Tensor] = {}
    mismatches = []
    for key, tensor in state.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        target = own[key]
        if tensor.shape != target.shape:
            can_adapt = adapt_channels and key.endswith(INPUT_CONV_SUFFIX) and tensor.ndim == 4
            if can_adapt and tensor.shape[0] == target.shape[0] and tensor.shape[2:] == target.shape[2:]:
                tensor = adapt_input_channels(tensor, target.shape[1])
                report.adapted.append(key)
            else:
                mismatches.append(f"{key}: checkpoint {tuple(tensor.shape)} vs network {tuple(target.shape)}")
                continue
        to_load[key] = tensor.to(target.dtype)
        report.matched.append(key)
    report.missing = [k for k in own if k not in state]
    return report, to_load, mismatches


def load_weights(
    module: nn.Module,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    prefix: str = "",
    adapt_channels: bool = True,
) -> WeightLoadReport:
    """Load the tensors of ``source`` (under ``prefix`` when present) into ``module`` and report what matched.

    Raises:
        WeightShapeError: a tensor's shape differs from the parameter of the same name (other than an adaptable
            first convolution).
    """
    report, to_load, mismatches = match_state(
        select_prefix(read_state_dict(source), prefix), module.state_dict(), adapt_channels
    )
    if mismatches:
        raise WeightShapeError(
            f"{len(mismatches)} tensors do not fit {type(module).__name__}: "
            + "; ".join(mismatches[:5])
            + ". Build the network with the same depth / widths as the checkpoint."
        )
    module.load_state_dict(to_load, strict=False)
    return report


def _require_matches(report: WeightLoadReport, what: str, source: object) -> WeightLoadReport:
    if not report.matched:
        raise RuntimeError(
            f"no {what} weights found in {source!s:.200}: {report.summary()}. "
            "Pass a file exported by pretrain_joint (python -m custom_nets.cli export) or a checkpoint of it."
        )
    return report


def load_slice_encoder_weights(encoder: nn.Module, source: str | os.PathLike | Mapping) -> WeightLoadReport:
    """Load ``f_intra`` weights (keys ``slice_encoder.*`` of a pretraining file, or an encoder's own state dict)."""
    return _require_matches(load_weights(encoder, source, prefix="slice_encoder."), "slice encoder", source)


def load_slice_transformer_weights(transformer: nn.Module, source: str | os.PathLike | Mapping) -> WeightLoadReport:
    """Load ``f_inter`` weights (keys ``slice_transformer.*``, or the transformer's own state dict)."""
    return _require_matches(load_weights(transformer, source, prefix="slice_transformer."), "slice transformer", source)


def initialize_from(network: nn.Module, source: str | os.PathLike | Mapping) -> WeightLoadReport:
    """Initialise a whole network (e.g. the next stage of the staged schedule) from a checkpoint or exported file.

    Keys absent from the file keep their initial values and are logged; a file matching no key is an error.
    """
    report = _require_matches(load_weights(network, source), type(network).__name__, source)
    logger.info("initialised %s from %s: %s", type(network).__name__, source, report.summary())
    return report


def check_whole_network_file(path: str | os.PathLike, network: nn.Module, key: str = "init_ckpt") -> None:
    """Start-up check of a file meant to initialise a whole ``network`` (every tensor, e.g. a fine-tuned
    ``models/model.pt``), before MONAI's ``CheckpointLoader`` loads it: errors that name the file and the fix.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is an encoder-only pretraining export, or its tensors do not fit ``network``.
    """
    state = read_state_dict(path)
    name = type(network).__name__
    report, _, mismatches = match_state(state, network.state_dict(), adapt_channels=False)
    if not report.matched and not mismatches and any(k.startswith("slice_encoder.") for k in state):
        raise ValueError(
            f"{path} is a pretraining export (slice_encoder.* keys), not a whole {name}: give it as pretrained_ckpt "
            f"(the encoder alone) instead of {key}."
        )
    if report.missing or report.unexpected or mismatches:
        examples = (
            mismatches + [f"missing {k}" for k in report.missing] + [f"unexpected {k}" for k in report.unexpected]
        )[:3]
        raise ValueError(
            f"{path} does not fit this bundle's {name} ({key}): {len(report.missing)} tensors missing, "
            f"{len(report.unexpected)} unexpected, {len(mismatches)} of another shape (e.g. {'; '.join(examples)}). "
            "Set the architecture keys (encoder_depth, decoder_channels, num_slices, class_names, ...) to those of "
            "the run that wrote the file."
        )


def load_backbone_weights(network: nn.Module, source: str | os.PathLike | Mapping) -> list[WeightLoadReport]:
    """Load ``f_intra`` and ``f_inter`` of a :class:`~custom_nets.nets.JointSSLNet` (e.g. from an exported
    ``models/model.pt``) for embedding inference; any missing key of either is an error."""
    reports = [
        load_slice_encoder_weights(network.slice_encoder, source),
        load_slice_transformer_weights(network.slice_transformer, source),
    ]
    for name, report in zip(("slice_encoder", "slice_transformer"), reports, strict=True):
        if report.missing:
            raise RuntimeError(f"{source}: {name} weights incomplete: {report.summary()}")
        logger.info("loaded %s from %s: %s", name, source, report.summary())
    return reports


def atomic_torch_save(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` that never leaves a partial file under ``path``.

    Written through :func:`custom_nets.atomic_files.atomic_path`: a process killed at any point leaves either the old
    file or the new one, plus at worst a hidden temporary file.
    """
    with atomic_path(path) as temporary:
        torch.save(obj, temporary)
    return Path(path)


def save_weights(
    module_or_state: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    prefixes: tuple[str, ...] = (),
    provenance: Mapping[str, object] | None = None,
) -> Path:
    """Write a flat state dict (only keys under ``prefixes`` when given) atomically; provenance goes to ``*.json``."""
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else read_state_dict(module_or_state)
    if prefixes:
        state = {k: v for k, v in state.items() if k.startswith(prefixes)}
        if not state:
            raise ValueError(f"no weights under the prefixes {prefixes}.")
    path = atomic_torch_save({k: v.detach().cpu() for k, v in state.items()}, path)
    if provenance is not None:
        atomic_write_text(path.with_suffix(".json"), json.dumps(dict(provenance), indent=2, default=str))
    return path


BACKBONE_PREFIXES = ("slice_encoder.", "slice_transformer.")


def source_commit() -> str:
    """The git commit of the installed ``custom_nets`` source (``+dirty`` with uncommitted changes), or ``unknown``
    outside a git checkout: part of an export's provenance."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=source,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if status else "")


def export_pretrained(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    provenance: Mapping[str, object] | None = None,
    whole: bool = False,
) -> Path:
    """Write the weights the fine-tune bundles load from a pretraining checkpoint.

    The output is a flat state dict with keys ``slice_encoder.*`` (``f_intra``) and ``slice_transformer.*``
    (``f_inter``), or every key of the network with ``whole=True``, plus ``<out>.json`` with provenance: the source
    checkpoint, its epoch and iteration when recorded, the package version and source commit, and what the caller
    adds (preset, data).
    """
    from custom_nets import __version__

    raw = load_file(checkpoint)
    state = read_state_dict(raw)
    trainer_state = raw.get("trainer", {})
    record = {
        "source_checkpoint": str(checkpoint),
        "epoch": trainer_state.get("epoch"),
        "iteration": trainer_state.get("iteration"),
        "custom_nets_version": __version__,
        "commit": source_commit(),
        "contents": "whole JointSSLNet" if whole else "slice_encoder (f_intra) + slice_transformer (f_inter)",
        **dict(provenance or {}),
    }
    return save_weights(state, out, prefixes=() if whole else BACKBONE_PREFIXES, provenance=record)
