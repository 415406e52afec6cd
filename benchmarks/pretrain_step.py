"""Cost of one joint pretraining step (arXiv 2212.01893): encoder share, loader headroom, memory per volume.

Issue 4, section 5. The step is what ``bundles/pretrain_joint/configs/train.json`` runs per iteration of MONAI's
``SupervisedTrainer``: ``JointPrepareBatch`` -> ``optimizer.zero_grad(set_to_none=True)`` -> ``JointSSLNet`` forward on
a joint batch -> ``JointLoss`` (``SwAVLoss`` intra and inter, ``MaskedSlicePredictionLoss`` on the masked positions)
-> backward -> ``torch.optim.SGD`` step (momentum 0.9). The trainer's handlers (prototype freezing and normalisation,
clipping, logging) are not part of it; LARC (``train.json``'s ``GradientControl`` with trust 0.001, before the SGD
step) is with ``--larc``. Default shapes are the ``cpu_demo`` preset's: 8 images (two
global 64 x 64 crops and two 32 x 32 crops each) and 2 volumes (two views of 24 slices of 64 x 64) per batch,
``embed_dim`` 128, 32 intra and 8 inter prototypes; ResNet-18 on CPU, ResNet-50 on CUDA unless ``--depth`` is given.
Every valid slice enters the 2D clustering (``train.json``'s default; ``cpu_demo`` uses
``--intra-slices-per-volume 4``).

Sections (``--sections a,b,c``):

* (a) Step vs encoder: wall-clock of the joint step against the slice encoder's forward + backward over the same
  inputs alone (the same ``encode_images`` call per image view and per volume view, the valid slices folded into the
  batch exactly as ``JointSSLNet`` folds them, backward of the mean of the embedding and of the stage-4 pool). The
  rest of the step (slice transformer, projection head, prototypes, losses, optimiser, batch preparation) is overhead;
  target: step / encoder <= 1.15. Inputs are synthetic tensors in the project's batch format (COMMON.md), so data
  loading is excluded. Both passes run in the same process with their repeats interleaved (alternating which goes
  first) after warm-up passes; medians are reported, with the step's phases.
* (b) Loader vs trainer: batches/s of ``build_joint_dataloader`` on a demo corpus (``make_demo_corpus`` in a temporary
  folder, NIfTI and DICOM volumes, PNG images) at the same batch shape, for ``cache`` none / memory and
  ``num_workers`` 0 / 2, over whole epochs after one untimed epoch (loader construction, cache filling and the first
  epoch with the workers' start are listed apart), against the batches/s of the training step of (a). Target: loader
  >= 2x the step's rate with ``num_workers=2``. Then the step is fed by the ``cache="memory"`` loaders (the
  ``cpu_demo`` setting), one untimed and one timed epoch: on a machine with few cores the workers compete with the
  step for the same cores, which the isolated rates hide.
* (c) Peak memory of a training step on one volume (two views, no 2D images) as the slice count N grows, for the
  plain encoder, ``slice_chunk`` alone and ``slice_chunk`` + ``gradient_checkpointing``. Measured on the second step
  (after a warm-up step has created the optimiser's momentum buffers): on CPU, the peak of the bytes of live tensor
  storages created during the step, from a ``TorchDispatchMode`` tracker (inputs, weights and momentum buffers exist
  before and are not counted; parameter gradients are, since ``zero_grad(set_to_none=True)`` frees them); on CUDA,
  ``torch.cuda.max_memory_allocated`` minus ``torch.cuda.memory_allocated`` before the step. The time column is the
  faster of two further steps.

* (d) Kernel launches and host syncs per step: the aten operators that launch a kernel (views and bare allocations
  left out), counted by a ``TorchDispatchMode`` (``measure.OperatorCounter``) per phase of one joint step and for the
  encoder's share alone. On a GPU the slice transformer, heads and losses work on small tensors, so their time is the
  host's launch time: the step's launches beyond the encoder's are the overhead of (a) in kernels, and they do not
  depend on the machine's load. Listed too: every operator after which a GPU's host waits for the device (``.item()``,
  ``bool(tensor)``, boolean masks, ``nonzero``, ``torch.tensor`` of Python data), with its call site; on CUDA also
  the synchronisations that ``torch.cuda.set_sync_debug_mode`` reports. On every device the slice sampling counts as
  the fused Triton path launches it (one kernel forward, a zero fill and one kernel backward;
  ``measure.FusedSamplingLaunches``: Triton's own launches are not aten operators, and the CPU runs the reference).

The machine may be shared: the torch thread count and the 1-minute load average are printed before and after each
section. ``--profile`` adds a ``torch.profiler`` table of the step's most expensive operators.

Example (the figures in docs/benchmarks.md)::

    .venv/bin/python benchmarks/pretrain_step.py
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torchvision
from measure import OperatorCounter, TensorMemoryTracker, sampling_counted_as_on_cuda, timed
from monai.data import MetaTensor
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from custom_nets.data import build_joint_dataloader, load_datalist, make_demo_corpus
from custom_nets.engines import JointItemIds, JointPrepareBatch, build_sgd
from custom_nets.engines.handlers import GradientControl
from custom_nets.losses import JointLoss, MaskedSlicePredictionLoss, SwAVLoss
from custom_nets.nets import JointSSLNet
from custom_nets.nets.joint_ssl import COMPILE_MODES, views_by_size

SECTIONS = ("a", "b", "c", "d")
LARC_TRUST = 0.001  # train.json's larc_trust
STEP_RATIO_TARGET = 1.15
THROUGHPUT_TARGET = 0.87
LOADER_HEADROOM_TARGET = 2.0
PHASES = ("prepare_batch", "forward", "loss", "backward", "optimizer")
MIB = 2**20


@dataclass(frozen=True)
class StepShape:
    """Network size and batch shape of one joint training step (defaults: the ``cpu_demo`` preset)."""

    depth: int = 18
    embed_dim: int = 128
    intra_prototypes: int = 32
    inter_prototypes: int = 8
    images_per_batch: int = 8
    image_size: int = 64
    small_crop_size: int = 32
    num_small_crops: int = 2
    volumes_per_batch: int = 2
    num_slices: int = 24
    volume_size: int = 64
    slice_chunk: int | None = None
    gradient_checkpointing: bool = False
    intra_slices_per_volume: int | None = None
    channels_last: bool = False  # the fast-path switches of train.json (issue 11, goal 3)
    fused_optimizer: bool = False
    pin_memory: bool = False
    larc: bool = False  # train.json's GradientControl (LARC, trust 0.001) between backward and the SGD step
    group_views: bool = False  # JointSSLNet(group_views): one encoder call per kind and size of view, not per view
    compile_slice_transformer: str | None = None  # JointSSLNet(compile_slice_transformer): a torch.compile mode
    metatensor_views: bool = False  # (a) also times the step on MetaTensor views (joint_collate before 0.12.0)


@dataclass
class Training:
    """What the bundle's ``SupervisedTrainer`` iterates with: network, loss, optimiser, ``prepare_batch``."""

    network: JointSSLNet
    loss: JointLoss
    optimizer: torch.optim.Optimizer
    prepare_batch: JointPrepareBatch
    device: torch.device
    amp_dtype: torch.dtype | None = None  # autocast dtype of forward + loss, None = float32
    scaler: torch.amp.GradScaler | None = None  # MONAI's SupervisedTrainer scales the loss whenever amp is on
    non_blocking: bool = False  # asynchronous host-to-device copies (with a pinned batch)
    gradient_control: GradientControl | None = None  # the trainer's handler on BACKWARD_COMPLETED


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_training(
    shape: StepShape, item_ids: JointItemIds, device: torch.device, seed: int = 0, amp_dtype: torch.dtype | None = None
) -> Training:
    """Network, loss and SGD as ``train.json`` builds them (swav loss family, masked positions, momentum 0.9)."""
    torch.manual_seed(seed)
    network = JointSSLNet(
        encoder_depth=shape.depth,
        embed_dim=shape.embed_dim,
        slice_chunk=shape.slice_chunk,
        gradient_checkpointing=shape.gradient_checkpointing,
        intra_prototypes=(shape.intra_prototypes,),
        inter_prototypes=(shape.inter_prototypes,),
        channels_last=shape.channels_last,
        group_views=shape.group_views,
        compile_slice_transformer=shape.compile_slice_transformer,
    ).to(device)
    network.train()
    loss = JointLoss(
        intra=SwAVLoss(prototypes=network.intra_prototypes),
        inter=SwAVLoss(prototypes=network.inter_prototypes),
        mask=MaskedSlicePredictionLoss(positions="masked"),
    ).to(device)
    optimizer = build_sgd(network.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-6, fused=shape.fused_optimizer)
    prepare_batch = JointPrepareBatch(item_ids, shape.intra_slices_per_volume)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype is not None else None
    non_blocking = shape.pin_memory and device.type == "cuda"
    gradient_control = GradientControl(trust_coefficient=LARC_TRUST) if shape.larc else None
    return Training(network, loss, optimizer, prepare_batch, device, amp_dtype, scaler, non_blocking, gradient_control)


def synthetic_item_ids(shape: StepShape) -> JointItemIds:
    """Item ids of a datalist holding exactly the images and volumes of :func:`synthetic_batch`."""
    kinds = ["image"] * shape.images_per_batch + ["volume"] * shape.volumes_per_batch
    return JointItemIds(kinds, shape.num_slices)


def synthetic_batch(shape: StepShape, slice_spacing_mm: float = 2.5, seed: int = 0) -> dict[str, object]:
    """A collated joint batch (COMMON.md batch format) of random tensors, laid out as the loader's (the views'
    geometry is the identity map); every slice valid."""
    generator = torch.Generator().manual_seed(seed)
    images, volumes, slices = shape.images_per_batch, shape.volumes_per_batch, shape.num_slices

    def noise(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=generator)

    image_views = []
    if images:
        image_views = [noise(images, 1, shape.image_size, shape.image_size) for _ in range(2)]
        image_views += [
            noise(images, 1, shape.small_crop_size, shape.small_crop_size) for _ in range(shape.num_small_crops)
        ]
    volume_views = (
        [noise(volumes, 1, slices, shape.volume_size, shape.volume_size) for _ in range(2)] if volumes else []
    )
    batch: dict[str, object] = {
        "image_views": image_views,
        "image_index": torch.arange(images),
        "image_class": torch.full((images,), -1),
        "volume_views": volume_views,
        "slice_valid": torch.ones(volumes, slices, dtype=torch.bool),
        "slice_position": (torch.arange(slices, dtype=torch.float32) * slice_spacing_mm).expand(volumes, -1).clone(),
        "volume_index": torch.arange(images, images + volumes),
        "volume_class": torch.full((volumes,), -1),
    }
    # the loader's views carry their geometry (view -> source pixel map), which prepare_batch copies to the device
    for key, views in (("image_view_geometry", image_views), ("volume_view_geometry", volume_views)):
        if views:
            batch[key] = [torch.eye(3).expand(view.shape[0], 3, 3).clone() for view in views]
    return batch


def training_step(
    training: Training,
    batch: dict[str, object],
    phase_marks: bool = False,
    on_phase: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """One iteration of ``SupervisedTrainer`` (without handlers), with its autocast and loss scaling when ``amp`` is
    on. With ``phase_marks`` the device is synchronised after each phase and the seconds of each are returned; without
    them nothing waits inside the step (as in training), and the result is empty. ``on_phase`` is called with the
    name of each phase (``PHASES``) as it starts."""
    device = training.device
    marks = [time.perf_counter()]
    phases = iter(PHASES)

    def mark() -> None:
        if phase_marks:
            synchronize(device)
            marks.append(time.perf_counter())
        if on_phase is not None:
            on_phase(next(phases, "after the step"))

    if on_phase is not None:
        on_phase(next(phases))

    with record_function("prepare_batch"):
        inputs, targets = training.prepare_batch(batch, device, non_blocking=training.non_blocking)
    mark()
    training.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=training.amp_dtype, enabled=training.amp_dtype is not None):
        with record_function("forward"):
            prediction = training.network(inputs)
        mark()
        with record_function("loss"):
            loss = training.loss(prediction, targets)
        mark()
    with record_function("backward"):
        (training.scaler.scale(loss) if training.scaler is not None else loss).backward()
    mark()
    with record_function("optimizer"):
        if training.gradient_control is not None:  # LARC, as the trainer's handler runs it (unscaling first)
            trainer = SimpleNamespace(
                network=training.network,
                optimizer=training.optimizer,
                scaler=training.scaler,
                amp=training.scaler is not None,
            )
            training.gradient_control(trainer)
        if training.scaler is not None:
            training.scaler.step(training.optimizer)
            training.scaler.update()
        else:
            training.optimizer.step()
    mark()
    if not phase_marks:
        return {}
    return {phase: end - start for phase, start, end in zip(PHASES, marks[:-1], marks[1:], strict=True)}


def plain_resnet(depth: int, device: torch.device, channels_last: bool = False) -> nn.Module:
    """torchvision's ResNet of the encoder's depth with a 1-channel stem: the yardstick of the throughput ratio (in
    channels-last memory format when the encoder is)."""
    network = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    network.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    network = network.to(device).train()
    return network.to(memory_format=torch.channels_last) if channels_last else network


def encoder_stacks(inputs: dict[str, object], group_views: bool = False) -> list[torch.Tensor]:
    """The 2D batches the slice encoder sees in one step: each image view, then each volume view's valid slices; with
    ``group_views`` the views of one kind and size concatenated, as ``JointSSLNet(group_views=True)`` encodes them."""
    slice_valid = inputs["slice_valid"]
    images = list(inputs["image_views"])
    slices = [volume.permute(0, 2, 1, 3, 4)[slice_valid] for volume in inputs["volume_views"]]
    if not group_views:
        return images + slices
    groups = [[images[i] for i in members] for members in views_by_size(images)]
    return [torch.cat(views) for views in groups] + ([torch.cat(slices)] if slices else [])


def plain_resnet_forward_backward(network: nn.Module, stacks: Sequence[torch.Tensor], amp_dtype) -> None:
    """Forward + backward of the plain ResNet over the same 2D batches as the encoder (logits' mean as the loss)."""
    network.zero_grad(set_to_none=True)
    with torch.autocast(stacks[0].device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        total = sum(network(images).float().mean() for images in stacks)
    total.backward()


def encoder_forward_backward(
    encoder: nn.Module, inputs: dict[str, object], amp_dtype=None, group_views: bool = False
) -> None:
    """The slice encoder's share of the step: one ``encode_images`` per image view and per volume view (with
    ``group_views``: per kind and size of view).

    Volume slices are folded exactly as ``JointSSLNet.embed_volume`` folds them (valid slices, volume-major).
    """
    encoder.zero_grad(set_to_none=True)
    total = 0.0
    with torch.autocast(inputs["slice_valid"].device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for images in encoder_stacks(inputs, group_views):
            encoded = encoder.encode_images(images, return_features=False)
            total = total + encoded.embedding.float().mean() + encoded.pooled.float().mean()
    total.backward()


def load_line() -> str:
    return f"torch threads {torch.get_num_threads()}, 1-minute load average {os.getloadavg()[0]:.2f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table, first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = "|:" + "-" * (widths[0] + 1) + "|" + "|".join("-" * (w + 1) + ":" for w in widths[1:]) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def describe_shape(shape: StepShape) -> str:
    images = (
        f"{shape.images_per_batch} images x (2 x {shape.image_size}^2 + {shape.num_small_crops} x "
        f"{shape.small_crop_size}^2)"
    )
    volumes = f"{shape.volumes_per_batch} volumes x 2 views x {shape.num_slices} x {shape.volume_size}^2"
    clustered = shape.intra_slices_per_volume
    switches = ("channels_last", "fused_optimizer", "pin_memory", "larc", "group_views")
    names = [s for s in switches if getattr(shape, s)]
    if shape.compile_slice_transformer is not None:
        names.append(f"f_inter compiled ({shape.compile_slice_transformer})")
    if shape.metatensor_views:
        names.append("also MetaTensor views in (a)")
    return (
        f"ResNet-{shape.depth}, d={shape.embed_dim}, prototypes {shape.intra_prototypes}/{shape.inter_prototypes}; "
        f"batch: {images} + {volumes}; 2D clustering on {'all' if clustered is None else clustered} slices per volume"
        f"; switches: {', '.join(names) or 'none'}"
    )


@dataclass
class StepTiming:
    """Median (and fastest) seconds of the joint step, of the encoder's share alone and of a plain ResNet over the
    same 2D batches; median step phases (from separate runs that synchronise after each phase)."""

    step_s: float
    encoder_s: float
    resnet_s: float
    step_min_s: float
    encoder_min_s: float
    resnet_min_s: float
    phases_s: dict[str, float]
    repeats: int
    slices_per_step: int
    metatensor_step_s: float | None = None  # the step on the same views as MONAI MetaTensors, when timed


def measure_step_vs_encoder(
    shape: StepShape, device: torch.device, warmup: int, repeats: int, amp_dtype: torch.dtype | None = None
) -> StepTiming:
    """Median step, encoder-only and plain-ResNet times, repeats interleaved with rotating order.

    The timed steps never synchronise inside (as in training); the phase split comes from ``repeats`` extra steps
    that synchronise after each phase, so on a GPU it is indicative only (it stops the host from running ahead).
    """
    training = build_training(shape, synthetic_item_ids(shape), device, amp_dtype=amp_dtype)
    batch = synthetic_batch(shape)
    if training.non_blocking:  # as the loader's pin_memory leaves it
        batch = {
            k: [v.pin_memory() for v in vs] if isinstance(vs, list) else vs.pin_memory() for k, vs in batch.items()
        }
    inputs, _ = training.prepare_batch(batch, device)
    encoder = training.network.slice_encoder
    resnet = plain_resnet(shape.depth, device, shape.channels_last)
    stacks = encoder_stacks(inputs, shape.group_views)
    if shape.channels_last:
        stacks = [images.contiguous(memory_format=torch.channels_last) for images in stacks]
    runs = [
        lambda: training_step(training, batch),
        lambda: encoder_forward_backward(encoder, inputs, amp_dtype, shape.group_views),
        lambda: plain_resnet_forward_backward(resnet, stacks, amp_dtype),
    ]
    if shape.metatensor_views:  # the same batch as MONAI's readers and transforms would leave it
        views = ("image_views", "volume_views")
        meta_batch = {k: [MetaTensor(v) for v in vs] if k in views else vs for k, vs in batch.items()}
        runs.append(lambda: training_step(training, meta_batch))
    for _ in range(warmup):
        for run in runs:
            run()
    times: list[list[float]] = [[] for _ in runs]
    for round_index in range(repeats):
        shift = round_index % len(runs)
        for index in list(range(shift, len(runs))) + list(range(shift)):
            times[index].append(timed(runs[index], device))
    phases: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for _ in range(repeats):
        for phase, seconds in training_step(training, batch, phase_marks=True).items():
            phases[phase].append(seconds)
    step_times, encoder_times, resnet_times = times[:3]
    return StepTiming(
        statistics.median(step_times),
        statistics.median(encoder_times),
        statistics.median(resnet_times),
        min(step_times),
        min(encoder_times),
        min(resnet_times),
        {phase: statistics.median(values) for phase, values in phases.items()},
        repeats,
        sum(int(stack.shape[0]) for stack in stacks),
        statistics.median(times[3]) if shape.metatensor_views else None,
    )


def report_step_vs_encoder(timing: StepTiming, depth: int) -> tuple[str, list[str]]:
    ratio = timing.step_s / timing.encoder_s
    best_ratio = timing.step_min_s / timing.encoder_min_s
    throughput = timing.resnet_s / timing.step_s  # (2D inputs per s of the step) / (the same of the plain ResNet)
    rows = [
        ["slice encoder forward + backward alone", f"{timing.encoder_s * 1e3:.1f}", "1.000"],
        ["joint training step", f"{timing.step_s * 1e3:.1f}", f"{ratio:.3f}"],
        [f"plain ResNet-{depth} forward + backward", f"{timing.resnet_s * 1e3:.1f}", ""],
    ]
    rows[0] += [f"{timing.encoder_min_s * 1e3:.1f}", "1.000"]
    rows[1] += [f"{timing.step_min_s * 1e3:.1f}", f"{best_ratio:.3f}"]
    rows[2] += [f"{timing.resnet_min_s * 1e3:.1f}", ""]
    if timing.metatensor_step_s is not None:
        meta_ratio = timing.metatensor_step_s / timing.encoder_s
        meta_ms = f"{timing.metatensor_step_s * 1e3:.1f}"
        rows.append(["joint training step, MetaTensor views", meta_ms, f"{meta_ratio:.3f}", "", ""])
    rows += [[f"  step phase (synchronised): {p}", f"{timing.phases_s[p] * 1e3:.1f}", "", "", ""] for p in PHASES]
    header = ["pass", f"median ms ({timing.repeats} repeats)", "/ encoder", "fastest ms", "/ encoder"]
    table = markdown_table(header, rows)
    table += (
        f"\n\nThroughput: {timing.slices_per_step / timing.step_s:.0f} 2D inputs (crops + slices) per s in the joint "
        f"step, {timing.slices_per_step / timing.resnet_s:.0f} per s through the plain ResNet-{depth}: ratio "
        f"{throughput:.3f}."
    )
    targets = [
        f"  {verdict(ratio <= STEP_RATIO_TARGET)}  joint step / encoder forward+backward {ratio:.3f} <= "
        f"{STEP_RATIO_TARGET} (overhead {100 * (ratio - 1):.1f} % of the encoder's time)",
        f"  {verdict(throughput >= THROUGHPUT_TARGET)}  joint step throughput / plain ResNet-{depth} {throughput:.3f} "
        f">= {THROUGHPUT_TARGET}",
    ]
    return table, targets


def profile_step(shape: StepShape, device: torch.device, steps: int = 3, rows: int = 20) -> str:
    """``torch.profiler`` table of the step's operators by self time (after one warm-up step)."""
    training = build_training(shape, synthetic_item_ids(shape), device)
    batch = synthetic_batch(shape)
    training_step(training, batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            training_step(training, batch)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=rows)


@dataclass
class LaunchCount:
    """Kernel-launching operators of one joint step per phase and of the encoder's share alone; host syncs."""

    step_kernels: dict[str, int]
    encoder_kernels: int
    host_syncs: dict[tuple[str, str], int]
    cuda_syncs: dict[str, int] | None
    on_cuda: bool


def cuda_synchronisations(run: Callable[[], object]) -> dict[str, int] | None:
    """``{call site: count}`` of the synchronisations ``torch.cuda.set_sync_debug_mode("warn")`` reports during
    ``run``; None if its warnings cannot be captured here (checked with one deliberate ``.item()`` first)."""
    sites: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            torch.ones(1, device="cuda").item()
            if not caught:
                return None
            caught.clear()
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for warning in caught:
        site = f"{Path(warning.filename).name}:{warning.lineno}"
        sites[site] = sites.get(site, 0) + 1
    return sites


def count_step_launches(shape: StepShape, device: torch.device, amp_dtype: torch.dtype | None = None) -> LaunchCount:
    """Operators of the second joint step (after a warm-up step) and of the encoder's forward + backward alone.

    The count models what CUDA launches: the slice sampling counts as the fused Triton path on every device
    (``measure.FusedSamplingLaunches``), and on the CPU the unfused SGD takes torch's multi-tensor (foreach) form,
    which torch picks for CUDA parameters (on CPU it loops over parameters)."""
    training = build_training(shape, synthetic_item_ids(shape), device, amp_dtype=amp_dtype)
    if device.type == "cpu" and not shape.fused_optimizer:
        group = training.optimizer.param_groups[0]
        parameters = [p for g in training.optimizer.param_groups for p in g["params"]]
        optimizer = torch.optim.SGD(
            parameters, lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"], foreach=True
        )
        training = replace(training, optimizer=optimizer)
    batch = synthetic_batch(shape)
    inputs, _ = training.prepare_batch(batch, device)
    training_step(training, batch)
    counter = OperatorCounter()
    step_kernels: dict[str, int] = {}

    def on_phase(name: str) -> None:
        if counter.phase:
            step_kernels[counter.phase] = counter.kernels - sum(step_kernels.values())
        counter.phase = name

    with counter, sampling_counted_as_on_cuda(counter):
        training_step(training, batch, on_phase=on_phase)
    cuda_syncs = cuda_synchronisations(lambda: training_step(training, batch)) if device.type == "cuda" else None
    encoder_counter = OperatorCounter()
    with encoder_counter:
        encoder_forward_backward(training.network.slice_encoder, inputs, amp_dtype, shape.group_views)
    return LaunchCount(
        step_kernels, encoder_counter.kernels, dict(counter.host_syncs), cuda_syncs, device.type == "cuda"
    )


def report_launches(count: LaunchCount) -> str:
    total = sum(count.step_kernels.values())
    rows = [[f"joint step: {phase}", str(kernels)] for phase, kernels in count.step_kernels.items()]
    rows += [
        ["joint step, all phases", str(total)],
        ["slice encoder forward + backward alone", str(count.encoder_kernels)],
        ["the step's launches beyond the encoder's", str(total - count.encoder_kernels)],
    ]
    lines = [markdown_table(["what runs", "kernel-launching operators"], rows), ""]
    lines += ["Slice sampling and SGD counted as CUDA launches them (fused Triton kernels; multi-tensor SGD).", ""]
    syncs = sorted(count.host_syncs.items(), key=lambda item: item[0][1])
    heading = "Operators that make a GPU's host wait for the device (prepare_batch works on host tensors by design):"
    lines.append(heading + ("" if syncs else " none."))
    lines += [f"- {name} x{calls} at {site}" for (name, site), calls in syncs]
    if count.cuda_syncs is not None:
        cuda_syncs = sorted(count.cuda_syncs.items())
        lines += ["", "Reported by torch.cuda.set_sync_debug_mode during a step:" + ("" if cuda_syncs else " none.")]
        lines += [f"- x{calls} at {site}" for site, calls in cuda_syncs]
    elif count.on_cuda:
        lines += ["", "torch.cuda.set_sync_debug_mode's warnings could not be captured here: no CUDA list."]
    return "\n".join(lines)


@dataclass
class LoaderRate:
    """Loader construction seconds, first (untimed) epoch seconds, batches/s over the timed epochs."""

    cache: str
    num_workers: int
    build_s: float
    first_epoch_s: float
    batches: int
    batches_per_s: float
    fed_step_batches_per_s: float | None = None


def loader_kwargs(shape: StepShape, cache: str, num_workers: int) -> dict[str, object]:
    return {
        "num_slices": shape.num_slices,
        "image_size": shape.image_size,
        "volume_size": shape.volume_size,
        "small_crop_size": shape.small_crop_size,
        "num_small_crops": shape.num_small_crops,
        "images_per_batch": shape.images_per_batch,
        "volumes_per_batch": shape.volumes_per_batch,
        "num_workers": num_workers,
        "cache": cache,
        "seed": 0,
    }


def batch_layout(batch: dict[str, object]) -> dict[str, object]:
    """Keys, shapes and dtypes of a joint batch, to check that the synthetic batch matches the loader's."""
    layout: dict[str, object] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            layout[key] = (tuple(value.shape), value.dtype)
        else:
            layout[key] = [(tuple(v.shape), v.dtype) for v in value]
    return layout


def measure_loader(
    datalist: str, shape: StepShape, cache: str, num_workers: int, epochs: int, training: Training | None
) -> tuple[LoaderRate, dict[str, object]]:
    """Batches/s of the loader over ``epochs`` whole epochs after one untimed epoch (worker start, caches, first
    steps); ``training`` is fed every batch if given. Also returns the first batch."""
    start = time.perf_counter()
    loader = build_joint_dataloader(datalist, **loader_kwargs(shape, cache, num_workers))
    build_s = time.perf_counter() - start
    first_batch: dict[str, object] | None = None
    epoch_seconds, batches = [], 0
    for epoch in range(1 + epochs):
        loader.batch_sampler.set_epoch(epoch)
        start = time.perf_counter()
        for batch in loader:
            if first_batch is None:
                first_batch = batch
            if epoch > 0:
                batches += 1
            if training is not None:
                training_step(training, batch)
        epoch_seconds.append(time.perf_counter() - start)
    del loader  # persistent workers end with their loader
    gc.collect()
    rate = LoaderRate(cache, num_workers, build_s, epoch_seconds[0], batches, batches / sum(epoch_seconds[1:]))
    return rate, first_batch


def measure_loader_section(
    shape: StepShape,
    device: torch.device,
    step_s: float,
    workers: Sequence[int],
    epochs: int,
    per_class: int,
) -> tuple[str, list[str]]:
    """Section (b): loader rates (cache none / memory, each worker count) against the step's consumption."""
    step_rate = 1.0 / step_s
    rates: list[LoaderRate] = []
    with tempfile.TemporaryDirectory(prefix="pretrain_step_demo_") as root:
        start = time.perf_counter()
        datalist = str(
            make_demo_corpus(root, num_per_class=per_class, in_plane=shape.volume_size, image_size=shape.image_size)
        )
        corpus_s = time.perf_counter() - start
        items = load_datalist(datalist)
        item_ids = JointItemIds([item["kind"] for item in items], shape.num_slices)
        layout_matches = True
        for cache in ("none", "memory"):
            for num_workers in workers:
                rate, batch = measure_loader(datalist, shape, cache, num_workers, epochs, None)
                layout_matches &= batch_layout(batch) == batch_layout(synthetic_batch(shape))
                rates.append(rate)
        for rate in rates:
            if rate.cache == "memory":
                training = build_training(shape, item_ids, device)
                fed, _ = measure_loader(datalist, shape, "memory", rate.num_workers, 1, training)
                rate.fed_step_batches_per_s = fed.batches_per_s
    header = ["cache", "workers", "build s", "first epoch s", "timed batches", "loader batches/s", "/ step rate"]
    header.append("step fed by loader, batches/s")
    rows = [
        [
            rate.cache,
            str(rate.num_workers),
            f"{rate.build_s:.2f}",
            f"{rate.first_epoch_s:.2f}",
            str(rate.batches),
            f"{rate.batches_per_s:.2f}",
            f"{rate.batches_per_s / step_rate:.2f}",
            "-" if rate.fed_step_batches_per_s is None else f"{rate.fed_step_batches_per_s:.2f}",
        ]
        for rate in rates
    ]
    text = "\n".join(
        [
            f"Demo corpus: {4 * per_class} volumes + {4 * per_class} images written in {corpus_s:.1f} s; "
            f"training step (synthetic batch, section a): {step_s * 1e3:.1f} ms = {step_rate:.2f} batches/s; "
            f"loader batch layout equals the synthetic batch's: {'yes' if layout_matches else 'NO'}",
            markdown_table(header, rows),
        ]
    )
    targets = [
        f"  {verdict(rate.batches_per_s >= LOADER_HEADROOM_TARGET * step_rate)}  loader (cache={rate.cache}, "
        f"num_workers={rate.num_workers}) {rate.batches_per_s:.2f} batches/s >= {LOADER_HEADROOM_TARGET:g} x step "
        f"{step_rate:.2f} batches/s (x{rate.batches_per_s / step_rate:.2f})"
        for rate in rates
        if rate.num_workers == max(workers)
    ]
    return text, targets


def step_peak_bytes(training: Training, batch: dict[str, object]) -> int:
    """Peak bytes allocated by one training step beyond what existed before it."""
    device = training.device
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        training_step(training, batch)
        return torch.cuda.max_memory_allocated(device) - before
    with TensorMemoryTracker() as tracker:
        training_step(training, batch)
    return tracker.peak_bytes


MEMORY_VARIANTS = {
    "plain": {"slice_chunk": None, "gradient_checkpointing": False},
    "chunk": {"gradient_checkpointing": False},
    "chunk+ckpt": {"gradient_checkpointing": True},
}


def measure_memory_section(shape: StepShape, device: torch.device, slice_counts: Sequence[int], chunk: int) -> str:
    """Section (c): peak memory and time of a one-volume step per slice count and encoder memory setting."""
    results: dict[tuple[str, int], tuple[int, float]] = {}
    gradient_bytes = 0
    for num_slices in slice_counts:
        for variant, settings in MEMORY_VARIANTS.items():
            variant_shape = replace(
                shape,
                images_per_batch=0,
                volumes_per_batch=1,
                num_slices=num_slices,
                **{"slice_chunk": chunk, **settings},
            )
            training = build_training(variant_shape, synthetic_item_ids(variant_shape), device)
            gradient_bytes = sum(p.numel() * p.element_size() for p in training.network.parameters())
            batch = synthetic_batch(variant_shape)
            training_step(training, batch)  # creates the momentum buffers
            peak = step_peak_bytes(training, batch)
            seconds = min(timed(lambda t=training, b=batch: training_step(t, b), device) for _ in range(2))
            results[variant, num_slices] = (peak, seconds)
            del training
    header = ["N"] + [f"{variant} MiB" for variant in MEMORY_VARIANTS] + ["chunk / plain", "chunk+ckpt / plain"]
    header += [f"{variant} step s" for variant in MEMORY_VARIANTS]
    rows = []
    for num_slices in slice_counts:
        peaks = [results[variant, num_slices][0] for variant in MEMORY_VARIANTS]
        row = [str(num_slices)] + [f"{peak / MIB:.1f}" for peak in peaks]
        row += [f"{peaks[1] / peaks[0]:.2f}", f"{peaks[2] / peaks[0]:.2f}"]
        row += [f"{results[variant, num_slices][1]:.2f}" for variant in MEMORY_VARIANTS]
        rows.append(row)
    lines = [
        f"One volume per batch (two views of N x {shape.volume_size}^2, no 2D images), ResNet-{shape.depth}, "
        f"slice_chunk={chunk}; parameter gradients alone: {gradient_bytes / MIB:.1f} MiB.",
        markdown_table(header, rows),
    ]
    if len(slice_counts) > 1:
        low, high = slice_counts[-2], slice_counts[-1]
        slopes = [
            f"{variant} {(results[variant, high][0] - results[variant, low][0]) / (high - low) / MIB:.2f}"
            for variant in MEMORY_VARIANTS
        ]
        lines.append(f"MiB per extra slice (N={low}->{high}): " + ", ".join(slopes))
    return "\n".join(lines)


def shape_for(args: argparse.Namespace, device: torch.device) -> StepShape:
    depth = args.depth if args.depth is not None else (18 if device.type == "cpu" else 50)
    return StepShape(
        depth=depth,
        embed_dim=args.embed_dim,
        intra_prototypes=args.intra_prototypes,
        inter_prototypes=args.inter_prototypes,
        images_per_batch=args.images_per_batch,
        image_size=args.image_size,
        small_crop_size=args.small_crop_size or max(1, args.image_size // 2),
        num_small_crops=args.small_crops,
        volumes_per_batch=args.volumes_per_batch,
        num_slices=args.num_slices,
        volume_size=args.image_size,
        intra_slices_per_volume=args.intra_slices_per_volume,
        channels_last=args.channels_last,
        fused_optimizer=args.fused_optimizer,
        pin_memory=args.pin_memory,
        larc=args.larc,
        group_views=args.group_views,
        compile_slice_transformer=args.compile_slice_transformer,
        metatensor_views=args.metatensor_views,
    )


def run_device(args: argparse.Namespace, device: torch.device) -> None:
    shape = shape_for(args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    precision = "float32" if args.amp == "off" else f"autocast {args.amp} + GradScaler"
    print(f"\n## {name}, torch {torch.__version__}, {precision}: {describe_shape(shape)}", flush=True)
    targets: list[str] = []
    timing: StepTiming | None = None
    if "a" in args.sections or "b" in args.sections:
        print(f"\n### (a) joint step vs slice encoder alone\n\nbefore: {load_line()}", flush=True)
        amp_dtype = None if args.amp == "off" else getattr(torch, args.amp)
        timing = measure_step_vs_encoder(shape, device, args.warmup, args.repeats, amp_dtype)
        table, step_targets = report_step_vs_encoder(timing, shape.depth)
        targets += step_targets
        print(f"after: {load_line()}\n\n{table}", flush=True)
        if args.profile:
            print("\ntorch.profiler, operators by self time over 3 steps:\n" + profile_step(shape, device), flush=True)
    if "b" in args.sections:
        print(f"\n### (b) loader throughput vs the step's consumption\n\nbefore: {load_line()}", flush=True)
        text, loader_targets = measure_loader_section(
            shape, device, timing.step_s, args.loader_workers, args.loader_epochs, args.demo_per_class
        )
        targets += loader_targets
        print(f"after: {load_line()}\n\n{text}", flush=True)
    if "c" in args.sections:
        print(f"\n### (c) peak memory per volume vs slice count\n\nbefore: {load_line()}", flush=True)
        memory_shape = replace(shape, volume_size=args.memory_image_size)
        text = measure_memory_section(memory_shape, device, args.memory_slices, args.slice_chunk)
        print(f"after: {load_line()}\n\n{text}", flush=True)
    if "d" in args.sections:
        print("\n### (d) kernel launches and host syncs per step", flush=True)
        amp_dtype = None if args.amp == "off" else getattr(torch, args.amp)
        print("\n" + report_launches(count_step_launches(shape, device, amp_dtype)), flush=True)
    if targets:
        print("\nTargets (issue 4 section 5, issue 11 section 3-4):\n" + "\n".join(targets), flush=True)


def comma_ints(text: str) -> list[int]:
    return [int(value) for value in text.split(",") if value]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:<index>, or auto: cpu, then cuda if present")
    parser.add_argument("--sections", default="a,b,c,d", help="comma-separated subset of a,b,c,d (default: all)")
    parser.add_argument("--depth", type=int, choices=(18, 34, 50), help="ResNet depth (default: 18 CPU, 50 CUDA)")
    parser.add_argument("--image-size", type=int, default=64, help="global 2D crop and volume in-plane size")
    parser.add_argument("--small-crop-size", type=int, help="small 2D crop size (default: image size / 2)")
    parser.add_argument("--small-crops", type=int, default=2, help="small 2D crops per image (default: 2)")
    parser.add_argument("--num-slices", type=int, default=24, help="slices per volume in (a) and (b) (default: 24)")
    parser.add_argument("--images-per-batch", type=int, default=8, help="2D images per batch (default: 8)")
    parser.add_argument("--volumes-per-batch", type=int, default=2, help="volumes per batch (default: 2)")
    parser.add_argument("--embed-dim", type=int, default=128, help="slice embedding width d (default: 128)")
    parser.add_argument("--intra-prototypes", type=int, default=32, help="2D prototypes (default: 32)")
    parser.add_argument("--inter-prototypes", type=int, default=8, help="3D prototypes (default: 8)")
    parser.add_argument(
        "--intra-slices-per-volume", type=int, help="slices per volume in the 2D clustering (default: all, train.json)"
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats in (a) (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes before them (default: 2)")
    parser.add_argument("--loader-workers", type=comma_ints, default=[0, 2], help="num_workers values (default: 0,2)")
    parser.add_argument("--loader-epochs", type=int, default=2, help="epochs per loader measurement (default: 2)")
    parser.add_argument("--demo-per-class", type=int, default=6, help="demo items per class and kind (default: 6)")
    parser.add_argument("--memory-slices", type=comma_ints, default=[16, 32, 64, 128], help="slice counts of (c)")
    parser.add_argument("--memory-image-size", type=int, default=64, help="volume in-plane size in (c) (default: 64)")
    parser.add_argument("--slice-chunk", type=int, default=8, help="slice_chunk of (c)'s chunked runs (default: 8)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--amp", choices=("off", "bfloat16", "float16"), default="off", help="autocast dtype of (a) (default: off)"
    )
    parser.add_argument("--channels-last", action="store_true", help="2D encoder in channels-last memory format")
    parser.add_argument("--fused-optimizer", action="store_true", help="torch's fused SGD (build_sgd)")
    parser.add_argument("--pin-memory", action="store_true", help="pinned batch + non_blocking copies (CUDA)")
    parser.add_argument(
        "--larc", action="store_true", help=f"LARC (trust {LARC_TRUST}) before the SGD step, as train.json"
    )
    parser.add_argument(
        "--group-views", action="store_true", help="one encoder call per kind and size of view (JointSSLNet)"
    )
    parser.add_argument(
        "--compile-slice-transformer",
        choices=COMPILE_MODES,
        help="compile f_inter with this torch.compile mode (JointSSLNet; default: eager)",
    )
    parser.add_argument(
        "--metatensor-views", action="store_true", help="(a) also times the step on the views as MONAI MetaTensors"
    )
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of the step")
    args = parser.parse_args(argv)
    args.sections = [section.strip() for section in args.sections.split(",") if section.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {','.join(SECTIONS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch.cuda.is_available() is False")
    if min(args.repeats, args.loader_epochs, args.demo_per_class) < 1 or not args.loader_workers:
        parser.error("--repeats, --loader-epochs and --demo-per-class must be >= 1, --loader-workers non-empty")
    if args.compile_slice_transformer and "d" in args.sections:
        parser.error("section d counts aten operators, and a compiled f_inter runs fused kernels it cannot see")
    if args.images_per_batch < 1 or args.volumes_per_batch < 1:
        parser.error("the joint step needs at least one image and one volume per batch")
    if args.memory_slices != sorted(set(args.memory_slices)) or min(args.memory_slices) < 1:
        parser.error("--memory-slices must be increasing positive slice counts")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    # MONAI's DICOM reading warns in every process that the optional GPU decoder (nvImageCodec) is absent.
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [args.device] if args.device != "auto" else ["cpu"] + (["cuda"] * torch.cuda.is_available())
    start = time.perf_counter()
    for device in devices:
        run_device(args, torch.device(device))
    print(f"\nTotal {time.perf_counter() - start:.0f} s; {load_line()}", flush=True)


if __name__ == "__main__":
    main()
