"""Image folders: ImageFolder layout (``root/<split>/<class>/*.jpg``) or a flat folder of unlabelled images.

In memory (default when the decoded images fit ``memory_budget_gb``): every image is decoded once
with PIL in a thread pool, stacked into one (N, 3, H, W) uint8 tensor and cached as a ``.pt`` file
under ``$SELA_CACHE`` (default ``~/.cache/sela``), keyed by the folder's path and every file's name,
size and mtime, so a second load only lists the folder and reads one file.

Image size (in memory):
  * ``image_size=S``: every image is resized (shorter side to S, bilinear, antialiased) and
    center-cropped to S x S.
  * ``image_size=None``: images keep their size, except that images larger than ``max_size``
    (64 px) on a side are first fitted to ``max_size`` x ``max_size`` the same way; then images
    whose size differs from the most common size are fitted to it.

Streamed (``in_memory=False``, or automatically above the budget, e.g. ImageNet): only the list of
files is kept; ``ImageSet.stream`` decodes each image on access, fitted to ``image_size`` x
``image_size`` (default 256) so that batches stack and the same on-device augmentation applies.
Images are always decoded as RGB (C = 3); 16-bit and float grey images are scaled to 8 bits, not clipped. ``mean``/``std`` are the statistics of the loaded split
(ImageNet's for streamed sets); normalise every split with the train split's.
"""

import hashlib
import json
import os
import pickle
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from sela.data.errors import DatasetNotFoundError
from sela.data.imageset import ImageSet, channel_stats

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
DEFAULT_MAX_SIZE = 64
DEFAULT_STREAM_SIZE = 256
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SPLIT_DIRS = {"train": ("train",), "val": ("val", "test"), "test": ("test", "val")}
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_CACHE_VERSION = 1


def cache_dir() -> Path:
    """Where decoded folders are cached: ``$SELA_CACHE`` or ``~/.cache/sela``."""
    return Path(os.environ.get("SELA_CACHE") or Path.home() / ".cache" / "sela")


# ---------------------------------------------------------------------------------------------- listing


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _walk_images(top: str) -> list[os.DirEntry]:
    found, dirs = [], [top]
    while dirs:
        with os.scandir(dirs.pop()) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    dirs.append(entry.path)
                elif _is_image(entry.name):
                    found.append(entry)
    return sorted(found, key=lambda e: e.path)


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


def scan_folder(folder: str) -> tuple[list[os.DirEntry], list[int] | None, list[str] | None]:
    """Image files under ``folder`` with class ids and names.

    Subfolders and no images at the top: one class per subfolder (sorted names; subfolders without
    images are left out). Otherwise: every image below ``folder``, unlabelled (targets None).
    """
    with os.scandir(folder) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    class_dirs = [e for e in entries if e.is_dir()]
    if class_dirs and not any(e.is_file() and _is_image(e.name) for e in entries):
        files, targets, classes = [], [], []
        for d in class_dirs:
            found = _walk_images(d.path)
            if found:
                files += found
                targets += [len(classes)] * len(found)
                classes.append(d.name)
    else:
        files, targets, classes = _walk_images(folder), None, None
    if not files:
        raise DatasetNotFoundError(
            f"no images found under {folder} (looked for {', '.join(IMAGE_EXTENSIONS)}); "
            "put images in <root>/train/<class>/ or directly in the folder"
        )
    return files, targets, classes


# --------------------------------------------------------------------------------------------- decoding


def fit_image(img: Image.Image, height: int, width: int) -> Image.Image:
    """Resize so that ``img`` covers (height, width) (bilinear, antialiased), then center-crop to it."""
    w, h = img.size
    if (w, h) == (width, height):
        return img
    scale = max(height / h, width / w)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return img.crop((left, top, left + width, top + height))


def decode_image(path: str, size: tuple[int, int] | None = None, max_size: int | None = None) -> np.ndarray:
    """One image file -> (H, W, 3) uint8, fitted to ``size`` = (H, W) or capped at ``max_size``."""
    with Image.open(path) as img:
        w, h = img.size
        if size is None and max_size is not None and max(w, h) > max_size:
            size = (max_size, max_size)
        if size is not None:
            scale = max(size[0] / h, size[1] / w)
            img.draft("RGB", (max(1, round(w * scale)), max(1, round(h * scale))))  # fast JPEG downscale
        img = _to_rgb(img)
        if size is not None:
            img = fit_image(img, *size)
        return np.asarray(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB; wide grey modes are scaled down instead of clipped at 255.

    PIL's own ``convert`` clips 16-bit grey (``I;16*``, ``I``) and float (``F``) pixels at 255, which saturates
    nearly every pixel of a 16-bit PNG. 16-bit values become ``round(v / 257)`` (65535 -> 255, within 1 of
    ``v >> 8``); 32-bit integers or floats outside those ranges are stretched from their own min..max.
    """
    if img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
        return img.convert("RGB")
    a = np.asarray(img, dtype=np.float64)  # (H, W)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255  # floats in [0, 1]
    elif 0 <= lo and hi <= 65535:
        a = a / 257  # 16-bit range (I;16*, and PNG/TIFF 16-bit grey opened as I)
    elif hi > lo:
        a = (a - lo) * (255 / (hi - lo))
    else:
        a = np.zeros_like(a)
    return Image.fromarray(np.rint(a).clip(0, 255).astype(np.uint8), "L").convert("RGB")


def _decode_chunk(
    paths: list[str], size: tuple[int, int] | None, max_size: int | None
) -> list[np.ndarray | str]:
    out: list[np.ndarray | str] = []
    for path in paths:
        try:
            out.append(decode_image(path, size, max_size))
        except _DECODE_ERRORS as err:
            out.append(f"{path} ({type(err).__name__}: {err})")
    return out


def decode_images(
    paths: list[str], size: tuple[int, int] | None, max_size: int | None, workers: int | None = None
) -> tuple[np.ndarray, list[int], list[str]]:
    """Decode ``paths`` in a thread pool into (N_ok, H, W, 3) uint8 at one common size.

    Returns the images, the positions in ``paths`` that decoded, and a description of each failure.
    """
    workers = workers or min(16, 2 * (os.cpu_count() or 1))
    chunk = max(1, min(512, len(paths) // (4 * workers) + 1))
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    with ThreadPoolExecutor(workers) as pool:
        results = [
            a
            for part in pool.map(_decode_chunk, chunks, [size] * len(chunks), [max_size] * len(chunks))
            for a in part
        ]
    ok = [i for i, a in enumerate(results) if isinstance(a, np.ndarray)]
    failed = [a for a in results if isinstance(a, str)]
    if not ok:
        return np.zeros((0, 1, 1, 3), np.uint8), ok, failed
    height, width = Counter(results[i].shape[:2] for i in ok).most_common(1)[0][0]
    images = np.empty((len(ok), height, width, 3), np.uint8)
    for row, i in enumerate(ok):
        a = results[i]
        if a.shape[:2] != (height, width):
            a = np.asarray(fit_image(Image.fromarray(a), height, width))
        images[row] = a
    return images, ok, failed


def _report_failures(failed: list[str], strict: bool) -> None:
    if not failed:
        return
    shown = "; ".join(failed[:20]) + (f"; and {len(failed) - 20} more" if len(failed) > 20 else "")
    if strict:
        raise ValueError(
            f"could not decode {len(failed)} image(s): {shown}. Fix or remove them, or pass strict=False"
        )
    warnings.warn(f"skipped {len(failed)} unreadable image(s): {shown}", stacklevel=3)


# ------------------------------------------------------------------------------------------------ cache


def _cache_file(folder: str, files: list[os.DirEntry], image_size: int | None, max_size: int) -> Path:
    digest = hashlib.sha1(
        json.dumps([_CACHE_VERSION, os.path.abspath(folder), image_size, max_size]).encode()
    )
    for entry in files:
        st = entry.stat()
        digest.update(f"{entry.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    slug = "".join(c if c.isalnum() else "-" for c in Path(os.path.abspath(folder)).name)[:40]
    return cache_dir() / f"folder-{slug}-{len(files)}-{digest.hexdigest()[:16]}.pt"


_CACHE_KEYS = {"images", "targets", "classes", "paths", "failed", "mean", "std"}


def _read_cache(path: Path) -> dict | None:
    """The cached payload, or None (with a warning) for a file that is damaged, foreign or needs more than
    tensors and plain containers to load (``weights_only``: a planted pickle runs no code)."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    else:
        if (
            isinstance(payload, dict)
            and _CACHE_KEYS <= set(payload)
            and isinstance(payload["images"], Tensor)
            and payload["images"].dtype == torch.uint8
        ):
            return payload
        reason = "not a sela folder cache"
    warnings.warn(f"ignoring unreadable cache {path} ({reason}); decoding again", stacklevel=3)
    return None


def _write_cache(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(
            f"could not write cache {path} ({err}); set $SELA_CACHE to a writable folder", stacklevel=3
        )
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- stream


class FolderStream(Dataset):
    """Decodes images on access: item i is ``(uint8 (3, size, size), i)``."""

    def __init__(self, paths: list[str], size: int):
        self.paths = paths
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path = self.paths[index]
        try:
            array = decode_image(path, (self.size, self.size))
        except _DECODE_ERRORS as err:
            raise ValueError(f"could not decode {path} ({err}); remove it from the folder") from err
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))), index  # (3, S, S)


# ----------------------------------------------------------------------------------------------- entry


def _check_arguments(root: str, image_size: int | None, max_size: int) -> None:
    """Raise ``ValueError`` for a size that is not a positive integer or an empty folder name."""
    for arg, value in (("image_size", image_size), ("max_size", max_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{arg} must be a positive integer (px), got {value!r}")
    if not os.fspath(root).strip():  # abspath('') is the current directory: never scan it by accident
        raise ValueError("the image folder is an empty string; pass the folder that holds the images")


def _fits_in_memory(n_images: int, side: int, memory_budget_gb: float) -> bool:
    """Whether ``n_images`` decoded uint8 (3, side, side) images fit ``memory_budget_gb`` GiB."""
    return n_images * 3 * side * side <= memory_budget_gb * 2**30


def _streamed_set(
    files: list[os.DirEntry], targets: list[int] | None, classes: list[str] | None, image_size: int, name: str
) -> ImageSet:
    """An ImageSet that decodes each of ``files`` on access at ``image_size`` px, with ImageNet statistics."""
    paths = [e.path for e in files]
    stream = FolderStream(paths, image_size)
    return ImageSet(
        images=None,
        targets=torch.tensor(targets) if targets is not None else None,
        classes=classes,
        paths=paths,
        name=name,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        stream=stream,
    )


def _decode_payload(
    folder: str,
    files: list[os.DirEntry],
    targets: list[int] | None,
    classes: list[str] | None,
    *,
    image_size: int | None,
    max_size: int,
) -> dict:
    """Decode ``files`` into a cache payload; raise ``ValueError`` when none of them decodes.

    The payload holds uint8 (N, 3, H, W) images, the targets and paths of the N decoded files, the classes,
    a description of each failure, and the per-channel mean and std of the images.
    """
    paths = [e.path for e in files]
    size = (image_size, image_size) if image_size else None
    images, ok, failed = decode_images(paths, size, max_size)
    if not ok:
        raise ValueError(f"none of the {len(paths)} images under {folder} could be decoded: {failed[:5]}")
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
    mean, std = channel_stats(images)
    return {
        "images": images,
        "targets": torch.tensor([targets[i] for i in ok]) if targets is not None else None,
        "classes": classes,
        "paths": [paths[i] for i in ok],
        "failed": failed,
        "mean": list(mean),
        "std": list(std),
    }


def load_folder(
    root: str,
    split: str = "train",
    *,
    image_size: int | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    in_memory: bool | None = None,
    strict: bool = False,
    cache: bool = True,
    memory_budget_gb: float = 4.0,
    name: str = "folder",
) -> ImageSet:
    """Load one split of an image folder (see the module docstring for layout and sizes).

    Args:
        root: the dataset folder (holding ``train/``, ``val/`` or ``test/``, or the images).
        split: ``"train"``, ``"val"`` or ``"test"``; ``val`` falls back to ``test`` and back.
        image_size: decode size in px (square); None keeps sizes as described above.
        max_size: cap in px for ``image_size=None`` in memory.
        in_memory: force in memory (True) or streaming (False); None decides by ``memory_budget_gb``.
        strict: raise on unreadable images instead of skipping them with one warning.
        cache: read and write the decoded-tensor cache.
        name: the ``ImageSet.name``.
    """
    _check_arguments(root, image_size, max_size)
    folder = split_dir(os.path.abspath(os.fspath(root)), split)
    files, targets, classes = scan_folder(folder)
    if in_memory is None:
        in_memory = _fits_in_memory(len(files), image_size or max_size, memory_budget_gb)
    if not in_memory:
        return _streamed_set(files, targets, classes, image_size or DEFAULT_STREAM_SIZE, name)

    # in memory: the cache, or decode (the warnings are raised here so that they name our caller)
    cache_path = _cache_file(folder, files, image_size, max_size) if cache else None
    payload = _read_cache(cache_path) if cache_path else None
    if payload is None:
        payload = _decode_payload(folder, files, targets, classes, image_size=image_size, max_size=max_size)
        _report_failures(payload["failed"], strict)
        if cache_path:
            _write_cache(cache_path, payload)
    else:
        _report_failures(payload["failed"], strict)
    return ImageSet(
        images=payload["images"],
        targets=payload["targets"],
        classes=payload["classes"],
        paths=payload["paths"],
        name=name,
        mean=tuple(payload["mean"]),
        std=tuple(payload["std"]),
    )
