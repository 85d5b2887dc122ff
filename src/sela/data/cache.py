"""The decode cache of image folders: one ``.pt`` file per (folder, file list, decode settings).

Where: ``$SELA_CACHE`` (default ``~/.cache/sela``); ``SELA_NO_CACHE=1`` (or ``load_folder(cache=False)``)
neither reads nor writes it. Private: the folder is created 0700 and each file 0600 (decoded copies of
private images on a shared host). Bounded: after each write the oldest entries (by last use) are removed
until the cache holds at most ``$SELA_CACHE_GB`` GiB (default 20). A failed write (full disk, quota)
warns and leaves no temporary file.

The key (:func:`cache_file`) covers the folder, the decode settings, the class names and, for every file,
its path bytes, size, mtime, ctime, inode and device. ctime cannot be set from user space (``touch -d``
and ``os.utime`` set mtime, and stamp ctime with *now*) and a replaced file has a new inode or a new
ctime, so a file rewritten with the same size and its old mtime restored misses the cache (a copied or
restored folder misses it too, and is decoded once more). Hashing the files' bytes instead would read the
whole folder on every load: on CIFAR-10's 50,000 train JPEGs (46 MB) the stat key costs 0.15 s on top of
the 0.6 s listing, a content hash (read + blake2b) 1.2 s with the files in the page cache, 6 s without.
"""

import hashlib
import json
import os
import pickle
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

CACHE_VERSION = 2  # 2: EXIF orientation, alpha on grey, class ids by name across splits
DEFAULT_MAX_GB = 20.0
STALE_TMP_S = 3600  # a temporary file older than this was left by a killed process
_KEYS = {"images", "targets", "classes", "paths", "failed", "mean", "std"}


def cache_dir() -> Path:
    """Where decoded folders are cached: ``$SELA_CACHE`` or ``~/.cache/sela``."""
    return Path(os.environ.get("SELA_CACHE") or Path.home() / ".cache" / "sela")


def cache_enabled(cache: bool = True) -> bool:
    """``cache``, unless ``$SELA_NO_CACHE`` is set to anything but ``""`` or ``0``."""
    return cache and os.environ.get("SELA_NO_CACHE", "") in ("", "0")


def max_cache_bytes() -> int:
    """The cache's size bound: ``$SELA_CACHE_GB`` GiB (default 20)."""
    try:
        gb = float(os.environ.get("SELA_CACHE_GB") or DEFAULT_MAX_GB)
    except ValueError:
        raise ValueError(
            f"$SELA_CACHE_GB must be a number of GiB, got {os.environ['SELA_CACHE_GB']!r}"
        ) from None
    return int(gb * 2**30)


def cache_file(folder: str, paths: list[str], stats: list[os.stat_result], settings: dict) -> Path:
    """The cache file of ``paths`` (with their ``stats``) under ``folder``, decoded with ``settings``
    (JSON-able: sizes, class names)."""
    folder = os.path.abspath(folder)
    head = json.dumps([CACHE_VERSION, os.fsencode(folder).hex(), settings], sort_keys=True)
    digest = hashlib.sha1(head.encode())
    for path, st in zip(paths, stats, strict=True):
        digest.update(os.fsencode(path))  # bytes as on disk: a non-UTF-8 name is fine
        digest.update(
            f"\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\0{st.st_dev}\n".encode()
        )
    slug = "".join(c if c.isascii() and c.isalnum() else "-" for c in Path(folder).name)[:40]
    return cache_dir() / f"folder-{slug}-{len(paths)}-{digest.hexdigest()[:16]}.pt"


def read_cache(path: Path) -> dict | None:
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
            and _KEYS <= set(payload)
            and isinstance(payload["images"], Tensor)
            and payload["images"].dtype == torch.uint8
        ):
            _touch(path)
            return payload
        reason = "not a sela folder cache"
    warnings.warn(f"ignoring unreadable cache {path} ({reason}); decoding again", stacklevel=3)
    return None


def _touch(path: Path) -> None:
    try:
        os.utime(path)  # its mtime is its last use: eviction removes the least recently used
    except OSError:
        pass  # a read-only cache still serves


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077 and path.stat().st_uid == os.getuid():
        os.chmod(path, 0o700)  # made by an older sela with the umask's 0755


def write_cache(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` (private, atomic), then evict old entries; a failure only warns."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        _private_dir(path.parent)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
        tmp.unlink(missing_ok=True)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(
            f"could not write cache {path} ({reason}); continuing without it (set $SELA_CACHE to a "
            "writable folder with room, or SELA_NO_CACHE=1)",
            stacklevel=3,
        )
        return
    evict(path.parent, max_cache_bytes(), keep=path)


def evict(folder: Path, max_bytes: int, *, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used cache files of ``folder`` until they total ``max_bytes`` at most
    (``keep`` stays), and temporary files left by killed processes. Returns the removed files."""
    entries, removed, now = [], [], time.time()
    for p in folder.glob("folder-*.pt*"):
        try:
            st = p.stat()
        except OSError:
            continue
        if ".pt.tmp" in p.name:
            if now - st.st_mtime > STALE_TMP_S:
                p.unlink(missing_ok=True)
                removed.append(p)
        elif p.suffix == ".pt":
            entries.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in entries)
    for _, size, p in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if p != keep:
            p.unlink(missing_ok=True)
            removed.append(p)
            total -= size
    return removed
