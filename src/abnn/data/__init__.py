"""Datasets read in place from a data root (``--data-root`` or ``ABNN_DATA_ROOT``), kept as
uint8 tensors in memory, and a batch loader with vectorised augmentation."""

from .datasets import (
    DATASETS,
    ImageData,
    load_cifar10,
    load_dataset,
    load_tinyimagenet32,
)
from .roots import resolve_data_root
from .loader import BatchLoader, augment_crop_flip
from .ucf101 import (UCF101Clips, VideoDecodeError, collate_clips, decode_clip, decode_shared_videos,
                     load_shared_clips, parse_split, resolve_ucf101_root, sample_indices, ucf101_classes)

__all__ = [
    "DATASETS", "ImageData", "load_cifar10", "load_dataset", "load_tinyimagenet32", "resolve_data_root",
    "BatchLoader", "augment_crop_flip",
    "UCF101Clips", "VideoDecodeError", "collate_clips", "decode_clip", "decode_shared_videos",
    "load_shared_clips", "parse_split", "resolve_ucf101_root", "sample_indices", "ucf101_classes",
]
