"""Tests for sela.data.registry: every registered dataset is complete; a new one is one registration."""

import pytest
import torch

from sela.data import (
    SPLITS,
    DatasetInfo,
    ImageSet,
    dataset_info,
    list_datasets,
    load_dataset,
    register_dataset,
    unregister_dataset,
)

TOY = "toy-registry-test"


@pytest.fixture
def toy():
    """A 4-image dataset registered for one test, and removed afterwards."""
    calls = []

    @register_dataset(TOY, splits=("train", "test"), default_image_size=6)
    def load(root: str, split: str, download: bool) -> ImageSet:
        calls.append((root, split, download))
        images = torch.arange(4 * 3 * 4 * 4, dtype=torch.uint8).reshape(4, 3, 4, 4)
        return ImageSet(images=images, targets=torch.tensor([0, 1, 0, 1]), name=TOY)

    yield calls
    if TOY in list_datasets():  # a test may have removed it already
        unregister_dataset(TOY)


@pytest.mark.parametrize("name", list_datasets())
def test_every_dataset_has_splits_and_a_default_size(name):
    info = dataset_info(name)
    assert isinstance(info, DatasetInfo) and info.name == name
    assert info.splits and info.splits[0] == "train" and all(isinstance(s, str) for s in info.splits)
    assert SPLITS[name] == info.splits
    assert info.default_image_size is None or info.default_image_size >= 1
    assert callable(info.loader)
    if info.stats is not None:
        mean, std = info.stats
        assert len(mean) == len(std) == 3 and all(0 < v < 1 for v in (*mean, *std))


def test_the_built_in_datasets():
    assert list_datasets() == ["digits", "cifar10", "cifar100", "svhn", "stl10", "folder"]
    assert dataset_info("digits").default_image_size == 16
    assert [n for n in list_datasets() if dataset_info(n).default_image_size] == ["digits"]
    downloaded = ["cifar10", "cifar100", "svhn", "stl10"]
    assert [n for n in list_datasets() if dataset_info(n).downloads] == downloaded
    assert [n for n in list_datasets() if dataset_info(n).stats is None] == ["digits", "folder"]
    assert [n for n in list_datasets() if dataset_info(n).streams] == ["folder"]


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; choose one of digits, cifar10"):
        dataset_info("mnist")
    assert "mnist" not in SPLITS and SPLITS.get("mnist") is None


def test_a_registered_dataset_is_loaded_listed_and_removed(toy, tmp_path):
    assert TOY in list_datasets() and TOY in SPLITS and SPLITS[TOY] == ("train", "test")
    assert dataset_info(TOY).default_image_size == 6
    s = load_dataset(TOY, tmp_path, "test", download=False)
    assert toy == [(str(tmp_path), "test", False)]
    assert s.images.shape == (4, 3, 4, 4) and s.name == TOY
    resized = load_dataset(TOY, tmp_path, image_size=8)  # load_dataset resizes in-memory sets
    assert resized.images.shape == (4, 3, 8, 8)
    with pytest.raises(ValueError, match=f"{TOY} has no split 'val'; choose one of train, test"):
        load_dataset(TOY, split="val")
    with pytest.raises(ValueError, match="always held in memory"):
        load_dataset(TOY, in_memory=False)
    unregister_dataset(TOY)
    assert TOY not in list_datasets() and TOY not in SPLITS
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset(TOY)


def test_a_streamed_dataset_gets_the_folder_options(tmp_path):
    seen = {}

    @register_dataset(TOY, splits=("train",), streams=True)
    def load(root, split, **options) -> ImageSet:
        seen.update(root=root, split=split, **options)
        return ImageSet(images=torch.zeros(2, 3, 5, 5, dtype=torch.uint8))

    try:
        s = load_dataset(TOY, image_size=5, in_memory=False, strict=True, cache=False)
    finally:
        unregister_dataset(TOY)
    assert seen == dict(
        root=None, split="train", image_size=5, in_memory=False, strict=True, cache=False, progress=None
    )
    assert s.images.shape == (2, 3, 5, 5)


def test_registration_is_checked():
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("digits", splits=("train",))(lambda root, split, download: None)
    with pytest.raises(ValueError, match="splits must be a tuple"):
        register_dataset(TOY, splits="train")(lambda root, split, download: None)
    assert TOY not in list_datasets()
    with pytest.raises(ValueError, match="unknown dataset"):
        unregister_dataset(TOY)
