"""``load_dataset(name, ...)``: every dataset sela knows, as an ``ImageSet``, through the registry.

Each dataset below is registered once (``sela.data.registry``: its splits, statistics, default size);
``load_dataset`` validates the arguments and calls the registered loader.

  * ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), bundled with
    scikit-learn, no download. Split 80/20, stratified by class with a fixed seed (1,437 train /
    360 test). Pixel values 0..16 are scaled to 0..255 and the grey image is repeated over 3
    channels (C = 3) so every model and augmentation works unchanged. 8 px (registered default
    size 16 px: ``sela train`` and the inspection commands upsample it).
  * ``cifar10``, ``cifar100`` (32 px), ``svhn`` (32 px; split ``extra`` too), ``stl10`` (96 px;
    splits ``train``, ``test``, ``unlabeled``, ``train+unlabeled``): read from the original
    files under ``root`` (default ``$SELA_DATA/<name>`` or ``./data/<name>``), downloaded from
    torchvision's URLs when missing and ``download=True``.
  * ``folder``: an image folder, see ``sela.data.folder``.

All sets except streamed folders are held in memory as one uint8 tensor.
"""

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sela.data.errors import DatasetNotFoundError
from sela.data.folder import load_folder
from sela.data.imageset import ImageSet, channel_stats
from sela.data.registry import DatasetInfo, dataset_info, register_dataset

DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class _Remote:
    """Where torchvision downloads a dataset from and which file it expects under root."""

    url: str
    filename: str
    md5: str | None
    extract: bool


def _remotes() -> dict[str, dict[str, _Remote]]:
    from torchvision import datasets as tvd  # the URLs and checksums torchvision uses

    cifar10 = _Remote(tvd.CIFAR10.url, tvd.CIFAR10.filename, tvd.CIFAR10.tgz_md5, True)
    cifar100 = _Remote(tvd.CIFAR100.url, tvd.CIFAR100.filename, tvd.CIFAR100.tgz_md5, True)
    stl10 = _Remote(tvd.STL10.url, tvd.STL10.filename, tvd.STL10.tgz_md5, True)
    svhn = {s: _Remote(url, fn, md5, False) for s, (url, fn, md5) in tvd.SVHN.split_list.items()}
    return {
        "cifar10": {"train": cifar10, "test": cifar10},
        "cifar100": {"train": cifar100, "test": cifar100},
        "svhn": svhn,
        "stl10": {s: stl10 for s in ("train", "test", "unlabeled", "train+unlabeled")},
    }


def _download(url: str, root: str, filename: str, md5: str | None, extract: bool) -> None:
    from torchvision.datasets.utils import download_and_extract_archive, download_url

    if extract:
        download_and_extract_archive(url, root, filename=filename, md5=md5)
    else:
        download_url(url, root, filename=filename, md5=md5)


def _fetch(name: str, split: str, root: str, download: bool, present: Callable[[], bool]) -> None:
    """Make sure the files of ``name`` are under ``root``; download them or raise a clear error."""
    if present():
        return
    remote = _remotes()[name][split]
    where = f"put {remote.filename} from {remote.url} in {root}" + (" (extracted)" if remote.extract else "")
    if not download:
        raise DatasetNotFoundError(f"{name} files not found under {root}; {where}, or pass download=True")
    try:
        _download(remote.url, root, remote.filename, remote.md5, remote.extract)
    except (OSError, RuntimeError) as err:  # URLError and socket errors are OSErrors
        raise DatasetNotFoundError(
            f"{name} is not under {root} and downloading it failed ({type(err).__name__}: {err}); "
            f"{where}, or pass root= to where the files are"
        ) from err
    if not present():
        raise DatasetNotFoundError(
            f"{name}: downloaded {remote.filename} but its files are still missing; {where}"
        )


# ------------------------------------------------------------------------------------------- parsers


# the only globals CIFAR's Python pickles need (numpy arrays, bytes): anything else in such a file is
# refused instead of being called, so a planted file cannot run code
_CIFAR_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a dataset file never needs")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):  # numpy 2 moved numpy.core
            module = "numpy._core." + module.removeprefix("numpy.core.")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    """A CIFAR batch file (a Python pickle of arrays, lists and bytes), without running code from it."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise ValueError(
            f"{path} is not a CIFAR batch file ({err or type(err).__name__}); delete it and download again"
        ) from None
    if not isinstance(batch, dict):
        raise ValueError(
            f"{path} is not a CIFAR batch file (a {type(batch).__name__}); delete it and download again"
        )
    return batch


def _cifar(name: str, root: str, split: str, download: bool) -> tuple[Tensor, Tensor, list[str]]:
    ten = name == "cifar10"
    folder = Path(root) / ("cifar-10-batches-py" if ten else "cifar-100-python")
    if ten:
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta, label_key, names_key = "batches.meta", "labels", "label_names"
    else:
        files, meta, label_key, names_key = [split], "meta", "fine_labels", "fine_label_names"
    _fetch(name, split, root, download, lambda: all((folder / f).is_file() for f in [*files, meta]))
    batches = [_unpickle(folder / f) for f in files]
    data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])  # (N, 3072)
    targets = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())  # (N, 3, 32, 32)
    return images, torch.from_numpy(targets), list(_unpickle(folder / meta)[names_key])


def _svhn(root: str, split: str, download: bool) -> tuple[Tensor, Tensor, list[str]]:
    from scipy.io import loadmat

    path = Path(root) / f"{split}_32x32.mat"
    _fetch("svhn", split, root, download, path.is_file)
    mat = loadmat(path)
    images = torch.from_numpy(
        np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1))
    )  # (32,32,3,N) -> (N,3,32,32)
    targets = torch.from_numpy(mat["y"].astype(np.int64).reshape(-1) % 10)  # the digit 0 is stored as 10
    return images, targets, [str(i) for i in range(10)]


def _stl10(root: str, split: str, download: bool) -> tuple[Tensor, Tensor | None, list[str]]:
    folder = Path(root) / "stl10_binary"
    parts = {
        "train": ["train"],
        "test": ["test"],
        "unlabeled": ["unlabeled"],
        "train+unlabeled": ["train", "unlabeled"],
    }
    needed = [f"{p}_X.bin" for p in parts[split]] + ["class_names.txt"]
    needed += [f"{p}_y.bin" for p in parts[split] if p != "unlabeled"]
    _fetch("stl10", split, root, download, lambda: all((folder / f).is_file() for f in needed))
    images, targets = [], []
    for part in parts[split]:
        x = np.fromfile(folder / f"{part}_X.bin", dtype=np.uint8).reshape(-1, 3, 96, 96)
        images.append(x.transpose(0, 1, 3, 2))  # stored column-major
        if part == "unlabeled":
            targets.append(np.full(len(x), -1, dtype=np.int64))
        else:
            targets.append(np.fromfile(folder / f"{part}_y.bin", dtype=np.uint8).astype(np.int64) - 1)
    classes = (folder / "class_names.txt").read_text().split()
    t = torch.from_numpy(np.concatenate(targets))
    return (
        torch.from_numpy(np.ascontiguousarray(np.concatenate(images))),
        (None if split == "unlabeled" else t),
        classes,
    )


def _digits(split: str) -> ImageSet:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    grey = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    images = torch.from_numpy(grey)[:, None].expand(-1, 3, -1, -1).contiguous()  # (N, 3, 8, 8)
    index = np.arange(len(grey))
    train, test = train_test_split(
        index, test_size=DIGITS_TEST_FRACTION, stratify=bunch.target, random_state=DIGITS_SEED
    )
    train, test = np.sort(train), np.sort(test)
    mean, std = channel_stats(images[train])
    rows = torch.from_numpy(train if split == "train" else test)
    return ImageSet(
        images=images[rows],
        targets=torch.from_numpy(bunch.target.astype(np.int64))[rows],
        classes=[str(i) for i in range(10)],
        name="digits",
        mean=mean,
        std=std,
    )


# ------------------------------------------------------------------------------------------- registry
# every built-in dataset, in the order list_datasets() gives them; stats are the train splits', in [0, 1]


# 8 px upsampled to 16; the embedded demo's own recipe (sela.recipes)
@register_dataset("digits", splits=("train", "test"), default_image_size=16, recipe="digits")
def _digits_set(root: str, split: str, download: bool) -> ImageSet:
    return _digits(split)  # bundled with scikit-learn: no files, no download


@register_dataset(
    "cifar10",
    splits=("train", "test"),
    stats=((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    downloads=True,
)
def _cifar10(root: str, split: str, download: bool) -> ImageSet:
    return _with_stats("cifar10", *_cifar("cifar10", root, split, download))


@register_dataset(
    "cifar100",
    splits=("train", "test"),
    stats=((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    downloads=True,
)
def _cifar100(root: str, split: str, download: bool) -> ImageSet:
    return _with_stats("cifar100", *_cifar("cifar100", root, split, download))


@register_dataset(
    "svhn",
    splits=("train", "test", "extra"),
    stats=((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    downloads=True,
)
def _svhn_set(root: str, split: str, download: bool) -> ImageSet:
    return _with_stats("svhn", *_svhn(root, split, download))


@register_dataset(
    "stl10",
    splits=("train", "test", "unlabeled", "train+unlabeled"),
    stats=((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    downloads=True,
)
def _stl10_set(root: str, split: str, download: bool) -> ImageSet:
    return _with_stats("stl10", *_stl10(root, split, download))


@register_dataset("folder", splits=("train", "val", "test"), streams=True)
def _folder(
    root: str | os.PathLike | None,
    split: str,
    *,
    image_size: int | None,
    in_memory: bool | None,
    strict: bool,
    cache: bool,
    progress: bool | None = None,
) -> ImageSet:
    if root is None:
        raise ValueError("the folder dataset needs root=<folder with train/ and test/ or images>")
    return load_folder(
        os.fspath(root), split, image_size=image_size, in_memory=in_memory, strict=strict, cache=cache,
        progress=progress,
    )  # fmt: skip


def _with_stats(name: str, images: Tensor, targets: Tensor | None, classes: list[str]) -> ImageSet:
    """One split of ``name`` normalised with its registered statistics (those of its train split)."""
    mean, std = dataset_info(name).stats
    return ImageSet(images=images, targets=targets, classes=classes, name=name, mean=mean, std=std)


# ------------------------------------------------------------------------------------------- entry


def data_root(name: str, root: str | os.PathLike | None = None) -> str:
    """``root`` if given, else ``$SELA_DATA/<name>`` or ``./data/<name>``."""
    if root is not None:
        return os.fspath(root)
    return os.path.join(os.environ.get("SELA_DATA") or "data", name)


def resize_images(images: Tensor, size: int, chunk: int = 2048) -> Tensor:
    """(N, C, H, W) uint8 -> (N, C, size, size) uint8: shorter side to ``size`` (antialiased), center crop."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    out = []
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].float()
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        out.append(x[..., top : top + size, left : left + size].round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def _check_arguments(
    info: DatasetInfo, root: str | os.PathLike | None, split: str, image_size: int | None
) -> None:
    """Raise ``ValueError`` for an unknown split, a bad ``image_size`` or an empty ``root``."""
    if split not in info.splits:
        raise ValueError(f"{info.name} has no split {split!r}; choose one of {', '.join(info.splits)}")
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ValueError(f"image_size must be a positive integer (px) or None, got {image_size!r}")
    if root is not None and not os.fspath(root).strip():
        # an empty path means the current directory to os and pathlib: a folder dataset would train on
        # every image below it
        raise ValueError(
            f"the data directory is an empty string; pass the folder that holds {info.name}'s files "
            "(e.g. --data-dir ./data), or leave it unset for the default"
        )


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "train",
    download: bool = True,
    *,
    image_size: int | None = None,
    in_memory: bool | None = None,
    strict: bool = False,
    cache: bool = True,
    progress: bool | None = None,
) -> ImageSet:
    """Load one split of dataset ``name`` as an ``ImageSet`` (see the module docstring).

    Args:
        name: one of ``list_datasets()``.
        root: where the files are (``folder``: required; others: default ``./data/<name>``).
        split: one of ``SPLITS[name]``.
        download: download missing torchvision datasets.
        image_size: resize to ``image_size`` x ``image_size`` (shorter side, then center crop);
            None keeps the native size (folders: see ``sela.data.folder``). The dataset's
            ``default_image_size`` is not applied here.
        in_memory, strict, cache, progress: folder datasets only, see ``sela.data.folder.load_folder``
            (``progress``: the decode bar; None shows it on a terminal).

    Raises:
        ValueError: unknown name or split, bad arguments.
        DatasetNotFoundError: the files are missing and could not be downloaded (names the URL and
            the place to put them); a ``FileNotFoundError`` and a ``ValueError``.
    """
    info = dataset_info(name)
    _check_arguments(info, root, split, image_size)
    if info.streams:
        return info.loader(
            root, split, image_size=image_size, in_memory=in_memory, strict=strict, cache=cache,
            progress=progress,
        )  # fmt: skip
    if in_memory is False:
        raise ValueError(f"{name} is always held in memory; in_memory=False is for folder datasets")
    imageset = info.loader(data_root(name, root), split, download)
    if image_size is not None:
        imageset.images = resize_images(imageset.images, image_size)
    return imageset
