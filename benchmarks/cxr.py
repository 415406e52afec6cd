"""Throughput of the chest X-ray detector (finetune_cxr): MONAI RetinaNet on the slice encoder.

Measures, on the CPU and on the GPU when one is available, with the bundle's detector settings (ATSS matcher, hard
negative sampler, 3 sizes x 3 aspect ratios of anchors per level scaled to the image size):

* training images/s: detector forward with targets (losses) + backward + AdamW step, random images with 3 boxes each;
* inference images/s: detector forward in eval mode with box selection (score threshold 0.05, NMS 0.5);
* reading images/s: ``LoadChestXrayd`` on a generated 12-bit MONOCHROME1 DICOM of ``dicom_size``, resized to
  ``image_size`` (CPU; the per-image cost of the bundle's inference input).

Usage::

    python benchmarks/cxr.py                                   # depth 18 and 50 at 256 x 256 (CPU friendly)
    python benchmarks/cxr.py --depths "[50]" --image_size 1024 --batch 4
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from measure import seconds_per_call
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.utils.anchor_utils import AnchorGenerator

from custom_nets.datasets.vindr_cxr import LoadChestXrayd
from custom_nets.nets.detection import SliceEncoderRetinaNet

NUM_CLASSES = 14


def build_detector(depth: int, image_size: int, device: torch.device) -> RetinaNetDetector:
    """The bundle's detector (train.json defaults) with anchor sizes scaled from 1024 px to ``image_size``."""
    scale = image_size / 1024
    sizes = [[round(s * scale * b) for s in (1.0, 2 ** (1 / 3), 2 ** (2 / 3))] for b in (32, 64, 128, 256)]
    network = SliceEncoderRetinaNet(num_classes=NUM_CLASSES, num_anchors=9, depth=depth).to(device)
    detector = RetinaNetDetector(network, AnchorGenerator(sizes, [[0.5, 1.0, 2.0]] * 4))
    detector.set_atss_matcher(num_candidates=4, center_in_gt=False)
    detector.set_hard_negative_sampler(batch_size_per_image=64, positive_fraction=0.3, pool_size=20, min_neg=16)
    detector.set_target_keys(box_key="box", label_key="label")
    detector.set_box_selector_parameters(
        score_thresh=0.05, topk_candidates_per_level=1000, nms_thresh=0.5, detections_per_img=100
    )
    return detector


def _batch(image_size: int, batch: int, device: torch.device) -> tuple[list[torch.Tensor], list[dict]]:
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(1, image_size, image_size, generator=generator).to(device) for _ in range(batch)]
    corners = torch.rand(batch, 3, 2, generator=generator) * image_size * 0.7
    extents = (0.05 + 0.2 * torch.rand(batch, 3, 2, generator=generator)) * image_size
    boxes = torch.cat([corners, corners + extents], dim=-1)
    labels = torch.randint(0, NUM_CLASSES, (batch, 3), generator=generator)
    return images, [{"box": b.to(device), "label": c.to(device)} for b, c in zip(boxes, labels, strict=True)]


def training_images_per_second(
    depth: int, image_size: int, batch: int, device: torch.device, amp: bool, repeats: int
) -> float:
    detector = build_detector(depth, image_size, device)
    detector.train()
    optimizer = torch.optim.AdamW(detector.network.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    images, targets = _batch(image_size, batch, device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            losses = detector(images, targets)
            loss = losses["classification"] + losses["box_regression"]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return batch / seconds_per_call(step, device, warmup=2, repeats=repeats)


def inference_images_per_second(
    depth: int, image_size: int, batch: int, device: torch.device, amp: bool, repeats: int
) -> float:
    detector = build_detector(depth, image_size, device)
    detector.eval()
    images, _ = _batch(image_size, batch, device)

    def step() -> None:
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            detector(images)

    return batch / seconds_per_call(step, device, warmup=1, repeats=repeats)


def reading_images_per_second(dicom_size: Sequence[int], image_size: int, repeats: int) -> float:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.Rows, dataset.Columns = int(dicom_size[1]), int(dicom_size[0])
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME1"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
    dataset.WindowCenter, dataset.WindowWidth = 2048, 3000
    pixels = np.random.default_rng(0).integers(0, 4096, (dataset.Rows, dataset.Columns), dtype=np.uint16)
    dataset.PixelData = pixels.tobytes()
    load = LoadChestXrayd("image", image_size=(image_size, image_size))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.dcm"
        dataset.save_as(path, enforce_file_format=True)
        return 1.0 / seconds_per_call(
            lambda: load({"image": str(path)}), torch.device("cpu"), warmup=1, repeats=repeats
        )


def main(
    depths: Sequence[int] = (18, 50),
    image_size: int = 256,
    batch: int = 4,
    dicom_size: Sequence[int] = (2048, 2500),
    repeats: int = 3,
    threads: int | None = None,
) -> None:
    """Print one table row per (device, depth)."""
    if threads is not None:
        torch.set_num_threads(threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}")
    print(f"image {image_size}x{image_size}, batch {batch}, 14 classes, 9 anchors per location, 4 pyramid levels")
    reading = reading_images_per_second(dicom_size, image_size, max(repeats, 3))
    print(f"reading (12-bit MONOCHROME1 DICOM {dicom_size[0]}x{dicom_size[1]} -> {image_size}, CPU): {reading:.1f}/s\n")
    print("| device | depth | amp | train images/s | inference images/s |")
    print("|---|---|---|---|---|")
    for device in devices:
        amp = device.type == "cuda"
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        for depth in depths:
            train = training_images_per_second(depth, image_size, batch, device, amp, repeats)
            infer = inference_images_per_second(depth, image_size, batch, device, amp, repeats)
            print(f"| {name} | {depth} | {amp} | {train:.2f} | {infer:.2f} |")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
