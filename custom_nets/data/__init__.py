"""Data side of joint image-volume self-supervision (arXiv 2212.01893): datalists, readers, modality normalisation,
2D multi-crop and slice-aligned 3D views, the mixed 2D+3D loader, inference datasets and the embedded demo corpus."""

from custom_nets.data.collate import joint_collate
from custom_nets.data.datalist import (
    DatalistError,
    checked_inference_items,
    infer_kind,
    load_datalist,
    log_skipped_items,
    prepare_items,
    usable_datalist,
    validate_datalist,
)
from custom_nets.data.demo import make_demo_corpus
from custom_nets.data.expectations import DataExpectations
from custom_nets.data.intensity import ModalityNormalized, canonical_modality
from custom_nets.data.joint_dataset import (
    build_inference_dataset,
    build_joint_dataloader,
    build_joint_dataset,
    image_base_transforms,
    volume_base_transforms,
)
from custom_nets.data.loading import EnsureKindShaped, LoadMedicalImaged, load_item_array
from custom_nets.data.sampler import JointBatchSampler
from custom_nets.data.views import (
    ImageMultiCropd,
    RandResizedCrop,
    ViewAugmentation,
    VolumeSliceSampled,
    VolumeTwoViewsd,
)

__all__ = [
    "DataExpectations",
    "DatalistError",
    "EnsureKindShaped",
    "ImageMultiCropd",
    "JointBatchSampler",
    "LoadMedicalImaged",
    "ModalityNormalized",
    "RandResizedCrop",
    "ViewAugmentation",
    "VolumeSliceSampled",
    "VolumeTwoViewsd",
    "build_inference_dataset",
    "build_joint_dataloader",
    "build_joint_dataset",
    "canonical_modality",
    "checked_inference_items",
    "image_base_transforms",
    "infer_kind",
    "joint_collate",
    "load_datalist",
    "load_item_array",
    "log_skipped_items",
    "make_demo_corpus",
    "prepare_items",
    "usable_datalist",
    "validate_datalist",
    "volume_base_transforms",
]
