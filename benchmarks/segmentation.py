"""Throughput of the segmentation U-Net on the slice encoder (finetune_brainseg / finetune_heart).

Measures, on the CPU and on the GPU when one is available:

* training slices/s: forward + Dice-CE loss + backward + AdamW step of ``SliceEncoderUNet`` on batches of 2D slices,
  as plain tensors (what the bundles' trainers pass since ``custom_nets.engines.plain_prepare_batch``) and as MONAI
  ``MetaTensor`` s (what MONAI's default ``prepare_batch`` passes on from the loader), the two steps' timed rounds
  interleaved so that a drift of the host's speed hits both alike;
* sampling slices/s: the bundle's slice pipeline (``RandForegroundSliced`` + crop/pad) drawing from a cached volume;
* inference volumes/s: whole-volume prediction with MONAI ``SliceInferer`` (slice by slice along the last axis).

Usage::

    python benchmarks/segmentation.py                        # depth 18 and 50, small sizes (CPU friendly)
    python benchmarks/segmentation.py --depths "[50]" --image_size 256 --volume_shape "[256,256,64]" --batch 16
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from measure import interleaved_seconds_per_call, seconds_per_call
from monai.data import MetaTensor
from monai.inferers import SliceInferer
from monai.losses import DiceCELoss
from monai.transforms import Compose, RandSpatialCropd, SpatialPadd

from custom_nets.data.segmentation import RandForegroundSliced
from custom_nets.nets.segmentation import SliceEncoderUNet


def training_step(
    depth: int, image_size: int, batch: int, num_classes: int, device: torch.device, amp: bool, metatensor: bool
) -> Callable[[], None]:
    """One training iteration of a fresh ``SliceEncoderUNet`` on a fixed batch, its inputs plain or MetaTensors."""
    torch.manual_seed(0)
    net = SliceEncoderUNet(in_channels=1, out_channels=num_classes, depth=depth).to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    images = torch.randn(batch, 1, image_size, image_size, device=device)
    labels = torch.randint(0, num_classes, (batch, 1, image_size, image_size), device=device)
    if metatensor:
        images, labels = MetaTensor(images), MetaTensor(labels)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            loss = loss_fn(net(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def sampling_slices_per_second(volume_shape: Sequence[int], image_size: int, samples: int, repeats: int) -> float:
    label = torch.zeros(1, *volume_shape)
    label[..., volume_shape[-1] // 3 : 2 * volume_shape[-1] // 3] = (torch.rand(1, *volume_shape[:2], 1) > 0.7).float()
    volume = {"image": torch.randn(1, *volume_shape), "label": label}
    size = (image_size, image_size)
    sampler = RandForegroundSliced(["image", "label"], num_samples=samples)
    crop = Compose(
        [SpatialPadd(["image", "label"], size), RandSpatialCropd(["image", "label"], size, random_size=False)]
    )

    def step() -> None:
        for sample in sampler(volume):
            crop(sample)

    return samples / seconds_per_call(step, torch.device("cpu"), warmup=1, repeats=repeats)


def inference_volumes_per_second(
    depth: int,
    image_size: int,
    volume_shape: Sequence[int],
    sw_batch_size: int,
    num_classes: int,
    device: torch.device,
    amp: bool,
    repeats: int,
) -> float:
    net = SliceEncoderUNet(in_channels=1, out_channels=num_classes, depth=depth).to(device).eval()
    inferer = SliceInferer(roi_size=(image_size, image_size), sw_batch_size=sw_batch_size, spatial_dim=2)
    volume = torch.randn(1, 1, *volume_shape, device=device)

    def step() -> None:
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            inferer(volume, net).argmax(dim=1)

    return 1.0 / seconds_per_call(step, device, warmup=1, repeats=repeats)


def main(
    depths: Sequence[int] = (18, 50),
    image_size: int = 128,
    batch: int = 8,
    volume_shape: Sequence[int] = (128, 128, 32),
    sw_batch_size: int = 16,
    num_classes: int = 8,
    repeats: int = 3,
    rounds: int = 3,
    threads: int | None = None,
) -> None:
    """Print one table row per (device, depth). Training is timed over ``rounds`` rounds of ``repeats`` steps (median
    round), the plain and the MetaTensor steps' rounds interleaved; inference over ``repeats`` calls."""
    if threads is not None:
        torch.set_num_threads(threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}")
    print(
        f"image {image_size}x{image_size}, training batch {batch} slices, volume {tuple(volume_shape)}, "
        f"{num_classes} classes, SliceInferer sw_batch_size {sw_batch_size}"
    )
    sampling = sampling_slices_per_second(volume_shape, image_size, samples=16, repeats=max(repeats, 5))
    print(f"slice sampling (RandForegroundSliced + pad/crop, CPU): {sampling:.0f} slices/s\n")
    header = "| device | depth | amp | train slices/s | train slices/s, MetaTensor inputs | inference volumes/s |"
    print(header + " inference slices/s |\n|---|---|---|---|---|---|---|")
    for device in devices:
        amp = device.type == "cuda"
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        for depth in depths:
            steps = {
                metatensor: training_step(depth, image_size, batch, num_classes, device, amp, metatensor)
                for metatensor in (False, True)
            }
            seconds = interleaved_seconds_per_call(steps, device, rounds=rounds, repeats=repeats, warmup=2)
            train, train_meta = batch / seconds[False], batch / seconds[True]
            infer = inference_volumes_per_second(
                depth, image_size, volume_shape, sw_batch_size, num_classes, device, amp, repeats
            )
            row = f"| {name} | {depth} | {amp} | {train:.1f} | {train_meta:.1f} | {infer:.3f} |"
            print(f"{row} {infer * volume_shape[-1]:.1f} |")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
