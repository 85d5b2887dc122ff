"""Image folders: ImageFolder layout (``root/<split>/<class>/*.jpg``) or a flat folder of unlabelled images.

Files are found and decoded by :mod:`sela.data.reader` (links followed once, sela's own run directories
left out, EXIF orientation, transparency on grey, 16-bit scaled, a pixel budget per image), the same
reader that ``sela embed`` and ``sela labels --images`` use.

Classes: a split whose images are all inside subfolders has one class per subfolder. Class ids are given
BY NAME, from the sorted union of the class folders of every split of ``root`` (``train``, ``val``,
``test``), so a test split that lacks one class folder keeps the train split's ids; a class folder with
no image in a split is still counted in ``classes``. A few loose images next to the class folders (at
most 1 % of the images in them, or one) are left out with a warning that names them; more make the
split a flat, unlabelled folder.

Unreadable files (damaged, truncated, empty, a dangling link, above the pixel budget) are skipped with
one warning: the count and the first few names; ``ImageSet.skipped`` lists every one ("PATH (reason)")
for the caller to write down; ``strict=True`` raises a ``ValueError`` naming them instead. Streamed sets
skip the same way on access (see :class:`FolderStream`).

In memory (default when the decoded images fit the memory budget: ``memory_budget_gb``, by default
``$SELA_MEMORY_GB`` or 4 GiB): every image is decoded once with PIL in a thread pool (a tqdm bar on a
terminal), stacked into one (N, 3, H, W) uint8 tensor and cached as a ``.pt`` file
(:mod:`sela.data.cache`: ``$SELA_CACHE``, private, bounded, ``SELA_NO_CACHE=1`` to switch it off), so a
second load only lists the folder and reads one file.

Image size (in memory):
  * ``image_size=S``: every image is resized (shorter side to S, bilinear, antialiased) and
    center-cropped to S x S.
  * ``image_size=None``: images keep their size, except that images larger than ``max_size``
    (64 px) on a side are first fitted to ``max_size`` x ``max_size`` the same way; then images
    whose size differs from the most common size are fitted to it.

Streamed (``in_memory=False``, or automatically above the budget, e.g. ImageNet; ``SELA_MEMORY_GB=0``
streams every folder): only the list of files is kept; ``ImageSet.stream`` decodes each image on access, fitted to ``image_size`` x
``image_size`` (default 256) so that batches stack and the same on-device augmentation applies.
Images are always decoded as RGB (C = 3). ``mean``/``std`` are the statistics of the loaded split
(ImageNet's for streamed sets); normalise every split with the train split's.
"""

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from sela.data.cache import cache_dir, cache_enabled, cache_file, read_cache, write_cache
from sela.data.errors import DatasetNotFoundError
from sela.data.imageset import ImageSet, channel_stats
from sela.data.reader import (
    BACKGROUND,
    IMAGE_EXTENSIONS,
    ImageReadError,
    Listing,
    decode_image,
    decode_images,
    fit_image,
    list_folder,
    printable,
    quiet_bomb_warnings,
    report_unreadable,
    subfolders,
    to_rgb,
    walk_images,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "FolderStream",
    "cache_dir",
    "decode_image",
    "decode_images",
    "fit_image",
    "load_folder",
    "scan_folder",
    "split_dir",
    "to_rgb",
]

DEFAULT_MAX_SIZE = 64
DEFAULT_MEMORY_GB = 4.0
DEFAULT_STREAM_SIZE = 256
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SPLIT_DIRS = {"train": ("train",), "val": ("val", "test"), "test": ("test", "val")}
_STRAY_SHARE = 0.01  # loose images next to class folders, as a share of the images in them


# ---------------------------------------------------------------------------------------------- listing


def split_dir(root: str, split: str) -> str:
    """The folder that holds ``split`` under ``root``: ``root/train``, ``root/val`` or ``root/test``.

    A root without any of these subfolders is itself the ``train`` split.
    """
    if split not in _SPLIT_DIRS:
        raise ValueError(f"unknown split {split!r} for a folder dataset; use one of {list(_SPLIT_DIRS)}")
    if not os.path.isdir(root):
        raise DatasetNotFoundError(f"image folder {root} does not exist or is not a directory; check root=")
    for name in _SPLIT_DIRS[split]:
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    present = [n for n in ("train", "val", "test") if os.path.isdir(os.path.join(root, n))]
    if present:
        raise DatasetNotFoundError(
            f"no {split!r} folder under {root} (it has {present}); use one of those splits"
        )
    if split == "train":
        return root
    raise DatasetNotFoundError(
        f"{root} has no train/, val/ or test/ subfolder, so it is a single 'train' split; "
        f"use split='train' or add {os.path.join(root, split)}"
    )


@dataclass
class Scan:
    """The image files of one split: the listing, class ids (None: unlabelled) and class names."""

    listing: Listing
    targets: list[int] | None
    classes: list[str] | None


def _split_folders(root: str) -> list[str]:
    """The split folders of ``root`` (``train``, ``val``, ``test`` that exist), or ``[root]``."""
    found = [os.path.join(root, n) for n in ("train", "val", "test") if os.path.isdir(os.path.join(root, n))]
    return found or [root]


def class_names(root: str) -> list[str]:
    """The sorted union of the class folder names of every split of ``root``: ids by name."""
    return sorted({name for folder in _split_folders(root) for name in subfolders(folder)})


def scan_folder(folder: str, classes: list[str] | None = None) -> Scan:
    """Image files under ``folder`` with class ids and names (see the module docstring).

    ``classes``: the names that number the class folders (default: ``folder``'s own subfolders); a
    folder whose name is not among them gets the next ids, after them.
    """
    loose, visited = Listing(), set()
    list_folder(folder, loose, visited)
    names = subfolders(folder)
    per_class = _walk_classes(folder, names, visited)
    nested = sum(len(found.paths) for found in per_class.values())
    if nested > len(loose.paths) and len(loose.paths) <= max(1, int(nested * _STRAY_SHARE)):
        scan = _labelled(per_class, classes or names)
        scan.listing.skipped += loose.skipped
        if loose.paths:
            shown = ", ".join(printable(p) for p in sorted(loose.paths)[:5])
            warnings.warn(
                f"left out {len(loose.paths)} image(s) next to the class folders of {printable(folder)}: "
                f"{shown} (a labelled split holds images only inside its class folders; move them into one)",
                stacklevel=3,
            )
    else:
        scan = Scan(walk_images(folder), None, None)
    if not scan.listing.paths:
        raise DatasetNotFoundError(
            f"no images found under {folder} (looked for {', '.join(IMAGE_EXTENSIONS)}); "
            "put images in <root>/train/<class>/ or directly in the folder"
        )
    return scan


def _walk_classes(folder: str, names: list[str], visited: set[tuple[int, int]]) -> dict[str, Listing]:
    """Each class folder's listing; a link from one class folder into another is not followed (the
    images stay in their own class)."""
    roots = {}
    for n in names:
        st = os.stat(os.path.join(folder, n))
        roots[n] = (st.st_dev, st.st_ino)
    per_class = {}
    for n in names:
        others = {key for m, key in roots.items() if m != n}
        seen = visited | others
        per_class[n] = walk_images(os.path.join(folder, n), visited=seen)
        visited |= seen - others
    return per_class


def _labelled(per_class: dict[str, Listing], classes: list[str]) -> Scan:
    """One Scan of the class folders' listings, ids by name in ``classes`` (unknown names appended)."""
    classes = list(classes) + sorted(n for n in per_class if n not in classes)
    listing, targets = Listing(), []
    for name, found in per_class.items():
        listing.extend(found)
        targets += [classes.index(name)] * len(found.paths)
    return Scan(listing, targets, classes)


# --------------------------------------------------------------------------------------------- stream


class FolderStream(Dataset):
    """Decodes images on access: item i is ``(uint8 (3, size, size), i)``.

    A file that cannot be read (it changed after the listing, or was damaged from the start): with
    ``strict``, an :class:`~sela.data.reader.ImageReadError` naming it (one line, from a DataLoader worker
    too); else a warning naming it and a plain ``BACKGROUND`` grey image in its place, so that the
    indices (and the labels bound to them) stay aligned with the files.
    """

    def __init__(self, paths: list[str], size: int, *, strict: bool = False):
        self.paths = paths
        self.size = size
        self.strict = strict

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path = self.paths[index]
        try:
            with quiet_bomb_warnings():
                array = decode_image(path, (self.size, self.size))
        except ImageReadError as err:
            if self.strict:
                raise
            warnings.warn(
                f"{err}; it stands in as a grey image (pass strict=True to stop instead)", stacklevel=2
            )
            array = np.empty((self.size, self.size, 3), np.uint8)
            array[:] = BACKGROUND
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))), index  # (3, S, S)


# ----------------------------------------------------------------------------------------------- entry


def _check_arguments(root: str, image_size: int | None, max_size: int) -> None:
    """Raise ``ValueError`` for a size that is not a positive integer or an empty folder name."""
    for arg, value in (("image_size", image_size), ("max_size", max_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{arg} must be a positive integer (px), got {value!r}")
    if not os.fspath(root).strip():  # abspath('') is the current directory: never scan it by accident
        raise ValueError("the image folder is an empty string; pass the folder that holds the images")


def memory_budget() -> float:
    """The memory budget in GiB for a folder's decoded images: ``$SELA_MEMORY_GB``, else 4."""
    text = os.environ.get("SELA_MEMORY_GB", "").strip()
    if not text:
        return DEFAULT_MEMORY_GB
    try:
        gb = float(text)
    except ValueError:
        gb = float("nan")
    if not gb >= 0 or gb == float("inf"):
        raise ValueError(
            f"$SELA_MEMORY_GB must be a number of GiB >= 0 (0 streams every folder), got {text!r}"
        )
    return gb


def _fits_in_memory(n_images: int, side: int, memory_budget_gb: float) -> bool:
    """Whether ``n_images`` decoded uint8 (3, side, side) images fit ``memory_budget_gb`` GiB."""
    return n_images * 3 * side * side <= memory_budget_gb * 2**30


def _streamed_set(scan: Scan, image_size: int, name: str, strict: bool) -> ImageSet:
    """An ImageSet that decodes each file of ``scan`` on access at ``image_size`` px, with ImageNet
    statistics."""
    paths = scan.listing.paths
    return ImageSet(
        images=None,
        targets=torch.tensor(scan.targets) if scan.targets is not None else None,
        classes=scan.classes,
        paths=paths,
        name=name,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        stream=FolderStream(paths, image_size, strict=strict),
        skipped=list(scan.listing.skipped),
    )


def _decode_payload(
    folder: str, scan: Scan, *, image_size: int | None, max_size: int, progress: bool | None
) -> dict:
    """Decode the files of ``scan`` into a cache payload; raise ``ValueError`` when none of them decodes.

    The payload holds uint8 (N, 3, H, W) images, the targets and paths of the N decoded files, the classes,
    "PATH (reason)" for each failure, and the per-channel mean and std of the images.
    """
    paths, targets = scan.listing.paths, scan.targets
    size = (image_size, image_size) if image_size else None
    images, ok, failed = decode_images(paths, size, max_size, progress=progress, channels_first=True)
    if not ok:
        shown = "; ".join(printable(f) for f in failed[:5])
        raise ValueError(f"could not read any of the {len(paths)} images under {printable(folder)}: {shown}")
    images = torch.from_numpy(images)  # (N, 3, H, W)
    mean, std = channel_stats(images)
    return {
        "images": images,
        "targets": torch.tensor([targets[i] for i in ok]) if targets is not None else None,
        "classes": scan.classes,
        "paths": [paths[i] for i in ok],
        "failed": failed,
        "mean": list(mean),
        "std": list(std),
    }


def _cache_path(folder: str, scan: Scan, image_size: int | None, max_size: int) -> Path:
    """The decode cache file of ``scan`` decoded at these sizes (see :func:`sela.data.cache.cache_file`)."""
    settings = {"image_size": image_size, "max_size": max_size, "classes": scan.classes}
    return cache_file(folder, scan.listing.paths, scan.listing.stats, settings)


def load_folder(
    root: str,
    split: str = "train",
    *,
    image_size: int | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    in_memory: bool | None = None,
    strict: bool = False,
    cache: bool = True,
    memory_budget_gb: float | None = None,
    name: str = "folder",
    progress: bool | None = None,
) -> ImageSet:
    """Load one split of an image folder (see the module docstring for layout, class ids and sizes).

    Args:
        root: the dataset folder (holding ``train/``, ``val/`` or ``test/``, or the images).
        split: ``"train"``, ``"val"`` or ``"test"``; ``val`` falls back to ``test`` and back.
        image_size: decode size in px (square); None keeps sizes as described above.
        max_size: cap in px for ``image_size=None`` in memory.
        in_memory: force in memory (True) or streaming (False); None decides by ``memory_budget_gb``.
        strict: raise on unreadable images instead of skipping them with one warning.
        cache: read and write the decoded-tensor cache (``SELA_NO_CACHE=1`` also switches it off).
        memory_budget_gb: in memory when N x 3 x side x side bytes fit this many GiB, else streamed
            (None: ``$SELA_MEMORY_GB``, else 4); ``side`` is ``image_size`` or ``max_size``.
        name: the ``ImageSet.name``.
        progress: a tqdm bar while decoding into memory; None shows it only on a terminal.

    Returns an ImageSet whose ``skipped`` lists every file left out as unreadable ("PATH (reason)").
    """
    _check_arguments(root, image_size, max_size)
    root = os.path.abspath(os.fspath(root))
    folder = split_dir(root, split)
    scan = scan_folder(folder, class_names(root))
    if in_memory is None:
        budget = memory_budget() if memory_budget_gb is None else memory_budget_gb
        in_memory = _fits_in_memory(len(scan.listing.paths), image_size or max_size, budget)
    if not in_memory:
        report_unreadable(scan.listing.skipped, strict=strict)
        return _streamed_set(scan, image_size or DEFAULT_STREAM_SIZE, name, strict)

    # in memory: the cache, or decode (the warnings are raised here so that they name our caller)
    path = _cache_path(folder, scan, image_size, max_size) if cache_enabled(cache) else None
    payload = read_cache(path) if path else None
    if payload is None:
        payload = _decode_payload(folder, scan, image_size=image_size, max_size=max_size, progress=progress)
        if path:
            write_cache(path, payload)
    skipped = scan.listing.skipped + list(payload["failed"])
    report_unreadable(skipped, strict=strict)
    return ImageSet(
        images=payload["images"],
        targets=payload["targets"],
        classes=payload["classes"],
        paths=payload["paths"],
        name=name,
        mean=tuple(payload["mean"]),
        std=tuple(payload["std"]),
        skipped=skipped,
    )
