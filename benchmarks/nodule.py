"""Throughput of the nodule classifier of finetune_nodule (f_intra per slice + f_inter + linear head).

Measures, on the CPU and on the GPU when one is available:

* training candidates/s: forward + BCE-with-logits loss + backward + AdamW step of ``NoduleClassifier`` on a batch of
  candidate cubes (backbone fine-tuned, or frozen with ``--frozen``), as plain tensors (what the bundle's trainer
  passes since ``custom_nets.engines.plain_prepare_batch``) and as MONAI ``MetaTensor`` s (MONAI's default), the two
  steps' timed rounds interleaved so that a drift of the host's speed hits both alike;
* inference candidates/s: forward in eval mode under ``torch.no_grad``;
* cutting candidates/s (CPU): :func:`custom_nets.datasets.luna16.candidate_cube` resampling cubes out of a CT-sized
  scan array (what ``prepare_luna16`` and ``inference.json`` do per candidate).

Usage::

    python benchmarks/nodule.py                                     # depth 18, 16 x 32 x 32 cubes (CPU friendly)
    python benchmarks/nodule.py --depth 50 --embed_dim 640 --cube "[32,64,64]" --batch 16 --layers 4
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from measure import interleaved_seconds_per_call, seconds_per_call
from monai.data import MetaTensor

from custom_nets.datasets.luna16 import ScanGeometry, candidate_cube
from custom_nets.nets.nodule import NoduleClassifier


def _network(depth: int, embed_dim: int, layers: int, frozen: bool, device: torch.device) -> NoduleClassifier:
    return NoduleClassifier(
        encoder_depth=depth, embed_dim=embed_dim, transformer_layers=layers, freeze_backbone=frozen
    ).to(device)


def training_step(
    net: NoduleClassifier, cube: Sequence[int], batch: int, device: torch.device, amp: bool, metatensor: bool
) -> Callable[[], None]:
    """One training iteration of ``net`` on a fixed batch of cubes, plain or MetaTensors."""
    net.train()
    optimizer = torch.optim.AdamW(net.parameter_groups(1e-4), lr=1e-4)
    cubes = torch.rand(batch, 1, *cube, device=device)
    labels = (torch.rand(batch, 1, device=device) > 0.5).float()
    if metatensor:
        cubes, labels = MetaTensor(cubes), MetaTensor(labels)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            loss = loss_fn(net(cubes), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def inference_candidates_per_second(
    net: NoduleClassifier, cube: Sequence[int], batch: int, device: torch.device, amp: bool, repeats: int
) -> float:
    net.eval()
    cubes = torch.rand(batch, 1, *cube, device=device)

    def step() -> None:
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            torch.sigmoid(net(cubes))

    return batch / seconds_per_call(step, device, warmup=1, repeats=repeats)


def cutting_candidates_per_second(cube: Sequence[int], spacing_mm: Sequence[float], count: int) -> float:
    """Cubes per second cut from a 512 x 512 x 200 int16 scan at 0.7 x 0.7 x 1.25 mm (a typical LUNA16 scan)."""
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 400, size=(200, 512, 512), dtype=np.int16)
    geometry = ScanGeometry(np.zeros(3), np.array([0.7, 0.7, 1.25]), np.eye(3), (512, 512, 200))
    centres = rng.uniform([60, 60, 40], [300, 300, 200], size=(count, 3))
    start = time.perf_counter()
    for centre in centres:
        candidate_cube(array, geometry, centre, cube, spacing_mm)
    return count / (time.perf_counter() - start)


def main(
    depth: int = 18,
    embed_dim: int = 128,
    layers: int = 2,
    cube: Sequence[int] = (16, 32, 32),
    batch: int = 8,
    frozen: bool = False,
    repeats: int = 3,
    rounds: int = 3,
    threads: int | None = None,
) -> None:
    """Print one table row per device. Training is timed over ``rounds`` rounds of ``repeats`` steps (median round),
    the plain and the MetaTensor steps' rounds interleaved; inference over ``repeats`` calls."""
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}")
    print(
        f"NoduleClassifier: ResNet-{depth}, embed_dim {embed_dim}, {layers} transformer layers, cube {tuple(cube)}, "
        f"batch {batch}, backbone {'frozen' if frozen else 'fine-tuned'}"
    )
    cutting = cutting_candidates_per_second(cube, (1.0, 1.0, 1.0), count=50)
    print(f"cube cutting (candidate_cube, 1 mm, CPU): {cutting:.0f} candidates/s\n")
    print("| device | amp | train candidates/s | train candidates/s, MetaTensor inputs | inference candidates/s |")
    print("|---|---|---|---|---|")
    for device in devices:
        amp = device.type == "cuda"
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        steps = {
            metatensor: training_step(
                _network(depth, embed_dim, layers, frozen, device), cube, batch, device, amp, metatensor
            )
            for metatensor in (False, True)
        }
        seconds = interleaved_seconds_per_call(steps, device, rounds=rounds, repeats=repeats, warmup=2)
        train, train_meta = batch / seconds[False], batch / seconds[True]
        infer = inference_candidates_per_second(
            _network(depth, embed_dim, layers, frozen, device), cube, batch, device, amp, repeats
        )
        print(f"| {name} | {amp} | {train:.1f} | {train_meta:.1f} | {infer:.1f} |")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
