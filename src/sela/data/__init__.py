"""Datasets as uint8 tensors (each item carries its index) and batched on-device augmentation.

``load_dataset(name, ...)`` returns an ``ImageSet`` of a dataset registered with ``register_dataset``
(``list_datasets()``, ``dataset_info(name)``); ``BatchAugment`` turns a uint8 batch into
augmented, normalised float images on the batch's device; ``EvalTransform`` does the same without
randomness for evaluation.
"""

from sela.data.augment import BatchAugment, EvalTransform, view_scale_size
from sela.data.datasets import data_root, load_dataset, resize_images
from sela.data.errors import DatasetNotFoundError
from sela.data.folder import FolderStream, cache_dir, load_folder
from sela.data.imageset import ImageSet, channel_stats, make_loader
from sela.data.registry import (
    SPLITS,
    DatasetInfo,
    dataset_info,
    list_datasets,
    register_dataset,
    unregister_dataset,
)

__all__ = [
    "SPLITS",
    "BatchAugment",
    "DatasetInfo",
    "DatasetNotFoundError",
    "EvalTransform",
    "FolderStream",
    "ImageSet",
    "cache_dir",
    "channel_stats",
    "data_root",
    "dataset_info",
    "list_datasets",
    "load_dataset",
    "load_folder",
    "make_loader",
    "register_dataset",
    "resize_images",
    "unregister_dataset",
    "view_scale_size",
]
