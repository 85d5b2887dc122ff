"""One way to read image files, for every sela command (train, eval, labels, embed, show).

Finding images (:func:`walk_images`): every file with an image suffix below a folder, sorted by path.
Directory links are followed once (a folder reached again through a link, as in a link loop, is left
out); hidden entries (``.name``) are left out; so are sela's own folders (:func:`is_sela_output`: a run
directory, a report), so that ``sela train --data-dir . --out run`` never learns its own plots. A
dangling link or an entry that cannot be listed is *skipped*: named in ``Listing.skipped``, like a file
that does not decode. File names are ``str`` as :func:`os.fsdecode` gives them: a name that is not
UTF-8 keeps its bytes as surrogates, so ``open`` reads it and :func:`os.fsencode` gives its bytes back
(write such paths with ``errors="surrogateescape"``).

Decoding (:func:`decode_image`) always gives 8-bit RGB (H, W, 3):
  * the EXIF orientation is applied (a phone photo stands upright);
  * transparency (RGBA, LA, PA, P or L/RGB with a transparent colour) is composited on neutral grey
    ``BACKGROUND`` (128), not black; grey images become R = G = B;
  * 16-bit and float grey (``I;16*``, ``I``, ``F``) are scaled to 8 bits, not clipped (see :func:`to_rgb`);
  * memory per decode is bounded: a JPEG is decoded reduced (PIL's ``draft``) when a smaller size is
    asked for or when it is above ``MAX_PIXELS``; any other image above ``MAX_PIXELS`` (after that
    reduction) is refused with its name and size instead of being decoded (PIL's own decompression-bomb
    warning is replaced by that one-line message).
Ordinary RGB and grey JPEG/PNG files decode to exactly the pixels sela decoded before this module.

A file that cannot be read raises :class:`ImageReadError` (a ``ValueError``: "could not read PATH
(reason)"). The set readers skip it instead: :func:`decode_images` returns the failures and
:func:`report_unreadable` turns them into one warning (the count and the first few names) or, with
``strict``, one ``ValueError``.
"""

import os
import stat
import struct
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
MAX_PIXELS = 2**26  # 67 Mpx (8192 x 8192) per decoded image; 201 MB as RGB
BACKGROUND = (128, 128, 128)  # what transparent pixels become
SHOWN = 5  # failures named in a warning
# What PIL raises on a damaged or hostile file (found by tests/reliability/test_reader_fuzz.py); a file
# that raises one of these is unreadable, never a crash of the whole command.
READ_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    zlib.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
    MemoryError,
    Image.DecompressionBombError,
)
_ORIENTATION = 0x0112  # the EXIF tag
_TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height
# Files that mark a folder as sela's own output: a run directory, a report.
_SELA_MARKERS = (
    ("checkpoint.pt",),
    ("config.json", "metrics.jsonl"),
    ("config.json", ".lock"),
    ("index.html", "top_clusters.png"),
)


class ImageReadError(ValueError):
    """A file that could not be read as an image; the message is one line, "could not read PATH (why)".

    Raised inside a DataLoader worker, it comes back to the main process as the same one line (PyTorch
    re-creates the exception from a message that holds the worker's whole traceback; that is cut here).
    """

    def __init__(self, message: str):
        if message.startswith("Caught ") and "Original Traceback" in message:
            last = message.strip().splitlines()[-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


def printable(path: str) -> str:
    """``path`` for a one-line message: line breaks escaped."""
    return path.replace("\n", "\\n").replace("\r", "\\r")


def _reason(err: BaseException, path: str = "") -> str:
    """``Type: first line`` of ``err``, without the file name that PIL's messages repeat."""
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    if path:
        for shown in (f": {path!r}", f" {path!r}", f" {path}"):
            first = first.replace(shown, "")
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


# ---------------------------------------------------------------------------------------------- listing


@dataclass
class Listing:
    """Image files found below a folder: ``paths`` (sorted) with their ``stats`` (``os.stat``, links
    followed), ``skipped``: "PATH (reason)" for each entry that could not be listed, and ``broken``: the
    paths of the image-named entries among them (a dangling link)."""

    paths: list[str] = field(default_factory=list)
    stats: list[os.stat_result] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)

    def extend(self, other: "Listing") -> None:
        self.paths += other.paths
        self.stats += other.stats
        self.skipped += other.skipped
        self.broken += other.broken


def is_image_name(name: str) -> bool:
    """A visible file name with one of ``IMAGE_EXTENSIONS`` (any case)."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def is_sela_output(folder: str) -> bool:
    """Whether ``folder`` is a sela run directory (``checkpoint.pt``, or ``config.json`` with
    ``metrics.jsonl`` or the run lock) or a sela report (``index.html`` with ``top_clusters.png``)."""
    return any(all(os.path.isfile(os.path.join(folder, m)) for m in group) for group in _SELA_MARKERS)


def _visit(path: str, visited: set[tuple[int, int]]) -> bool:
    """Mark the directory ``path`` as seen; False if it was seen before (a second link to it, a loop)."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino)
    if key in visited:
        return False
    visited.add(key)
    return True


def list_folder(path: str, listing: Listing, visited: set[tuple[int, int]]) -> list[str]:
    """Add the image files directly in ``path`` to ``listing``; return its subfolders (unvisited)."""
    try:
        if not _visit(path, visited):
            return []
        with os.scandir(path) as it:
            entries = list(it)
    except OSError as err:
        listing.skipped.append(f"{path} (could not list the folder: {_reason(err)})")
        return []
    subdirs = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            is_dir = entry.is_dir()  # follows links; False for a dangling one
        except OSError:
            is_dir = False
        if is_dir:
            subdirs.append(entry.path)
        elif is_image_name(entry.name):
            try:
                st = entry.stat()  # follows links: a dangling link fails here
                if not stat.S_ISREG(st.st_mode):
                    raise OSError("not a regular file")
            except OSError as err:
                listing.skipped.append(f"{entry.path} ({_reason(err, entry.path)})")
                listing.broken.append(entry.path)
            else:
                listing.paths.append(entry.path)
                listing.stats.append(st)
    return subdirs


def walk_images(top: str, *, visited: set[tuple[int, int]] | None = None) -> Listing:
    """Every image file below ``top`` (see the module docstring), sorted by path.

    ``visited`` (``(st_dev, st_ino)`` of folders) is shared by walks that must not see a folder twice.
    """
    listing = Listing()
    visited = set() if visited is None else visited
    dirs = [top]
    while dirs:
        folder = dirs.pop()
        if folder != top and is_sela_output(folder):
            continue
        dirs += list_folder(folder, listing, visited)
    order = sorted(range(len(listing.paths)), key=listing.paths.__getitem__)
    listing.paths = [listing.paths[i] for i in order]
    listing.stats = [listing.stats[i] for i in order]
    return listing


def subfolders(folder: str) -> list[str]:
    """The sorted names of the visible subfolders of ``folder`` that are not sela's own output."""
    with os.scandir(folder) as it:
        names = [e.name for e in it if not e.name.startswith(".") and _is_dir(e)]
    return sorted(n for n in names if not is_sela_output(os.path.join(folder, n)))


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


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


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB; transparency on ``BACKGROUND``; wide grey modes scaled, not clipped.

    PIL's own ``convert`` clips 16-bit grey (``I;16*``, ``I``) and float (``F``) pixels at 255, which saturates
    nearly every pixel of a 16-bit PNG. 16-bit values become ``round(v / 257)`` (65535 -> 255, within 1 of
    ``v >> 8``); 32-bit integers or floats outside those ranges are stretched from their own min..max.
    """
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return _wide_grey(img)
    if _has_alpha(img):
        rgba = (img.convert("LA") if img.mode == "La" else img).convert("RGBA")
        background = Image.new("RGBA", img.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _wide_grey(img: Image.Image) -> Image.Image:
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


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_ORIENTATION, 1)
    except READ_ERRORS:  # a damaged EXIF block: read the pixels as they are stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _reduce(img: Image.Image, size: tuple[int, int] | None, turned: bool, max_pixels: int) -> None:
    """Ask a JPEG to decode reduced (``draft``): to cover ``size`` (H, W) as shown, or to fit the budget."""
    w, h = img.size
    if size is not None:
        th, tw = (size[1], size[0]) if turned else size  # the target in the file's own (unrotated) frame
        scale = max(th / h, tw / w)
    elif w * h > max_pixels:
        scale = (max_pixels / (w * h)) ** 0.5 / 2  # draft gives at most twice the asked side: within budget
    else:
        return
    img.draft("RGB", (max(1, round(w * scale)), max(1, round(h * scale))))  # fast JPEG downscale


def _read(path: str, size: tuple[int, int] | None, max_size: int | None, max_pixels: int) -> np.ndarray:
    with Image.open(path) as img:
        w, h = img.size
        if size is None and max_size is not None and max(w, h) > max_size:
            size = (max_size, max_size)
        orientation = _orientation(img)
        _reduce(img, size, orientation in _TRANSPOSED, max_pixels)
        if img.size[0] * img.size[1] > max_pixels:
            raise ImageReadError(
                f"could not read {printable(path)} ({w} x {h} px is above the limit of {max_pixels:,} px "
                "per image; make it smaller)"
            )
        img.load()
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
        if size is not None:
            img = fit_image(img, *size)
        return np.asarray(img)


def _read_one(path: str, size: tuple[int, int] | None, max_size: int | None, max_pixels: int) -> np.ndarray:
    try:
        return _read(path, size, max_size, max_pixels)
    except ImageReadError:
        raise
    except READ_ERRORS as err:
        raise ImageReadError(f"could not read {printable(path)} ({_reason(err, path)})") from err


@contextmanager
def quiet_bomb_warnings() -> Iterator[None]:
    """PIL's DecompressionBombWarning off: ``MAX_PIXELS`` is stricter and names the file. Call it from the
    thread that starts the decoding (``warnings.catch_warnings`` is process-wide, not per thread)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def decode_image(
    path: str | os.PathLike,
    size: tuple[int, int] | None = None,
    max_size: int | None = None,
    *,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """One image file -> (H, W, 3) uint8, fitted to ``size`` = (H, W) or capped at ``max_size`` px.

    Raises :class:`ImageReadError` ("could not read PATH (why)") for a file that is not a readable image.
    """
    with quiet_bomb_warnings():
        return _read_one(os.fspath(path), size, max_size, max_pixels)


def _decode_chunk(
    paths: list[str], size: tuple[int, int] | None, max_size: int | None
) -> list[np.ndarray | str]:
    out: list[np.ndarray | str] = []
    for path in paths:
        try:
            out.append(_read_one(path, size, max_size, MAX_PIXELS))
        except ImageReadError as err:
            out.append(str(err).removeprefix("could not read "))
    return out


def decode_workers() -> int:
    """The threads :func:`decode_images` uses by default: twice the CPUs, at most 16 (PIL lets go of the
    GIL while it decodes, so threads overlap file reads and decoding)."""
    return min(16, 2 * (os.cpu_count() or 1))


def decode_images(
    paths: list[str],
    size: tuple[int, int] | None,
    max_size: int | None,
    workers: int | None = None,
    *,
    progress: bool | None = None,
    channels_first: bool = False,
) -> tuple[np.ndarray, list[int], list[str]]:
    """Decode ``paths`` in a thread pool into (N_ok, H, W, 3) uint8 at one common size, or (N_ok, 3, H, W)
    with ``channels_first`` (what a tensor wants, without a second copy of the whole set to permute).

    Returns the images, the positions in ``paths`` that decoded, and "PATH (reason)" for each failure.
    Images whose size differs from the most common one are fitted to it. ``workers``: threads (default
    :func:`decode_workers`). ``progress``: a tqdm bar on stderr ("decode", images done and images/s);
    None shows it only when stderr is a terminal, False never.
    """
    workers = workers or decode_workers()
    chunk = max(1, min(512, len(paths) // (4 * workers) + 1))
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    bar = tqdm(total=len(paths), desc="decode", unit="img", disable=None if progress is None else not progress)
    results: list[np.ndarray | str] = []
    with quiet_bomb_warnings(), ThreadPoolExecutor(workers) as pool, bar:
        for part in pool.map(_decode_chunk, chunks, [size] * len(chunks), [max_size] * len(chunks)):
            results += part
            bar.update(len(part))
    ok = [i for i, a in enumerate(results) if isinstance(a, np.ndarray)]
    failed = [a for a in results if isinstance(a, str)]
    if not ok:
        return np.zeros((0, 3, 1, 1) if channels_first else (0, 1, 1, 3), np.uint8), ok, failed
    height, width = Counter(results[i].shape[:2] for i in ok).most_common(1)[0][0]
    images = np.empty((len(ok), 3, height, width) if channels_first else (len(ok), height, width, 3), np.uint8)
    for row, i in enumerate(ok):
        a, results[i] = results[i], None  # each decoded image is let go once it is copied
        if a.shape[:2] != (height, width):
            a = np.asarray(fit_image(Image.fromarray(a), height, width))
        images[row] = a.transpose(2, 0, 1) if channels_first else a  # (3, H, W) or (H, W, 3)
    return images, ok, failed


# ------------------------------------------------------------------------------------------------ policy


def report_unreadable(skipped: list[str], *, strict: bool, stacklevel: int = 3) -> None:
    """One warning for the files in ``skipped`` ("PATH (reason)"): their count and the first ``SHOWN``;
    with ``strict``, a ``ValueError`` naming them instead. Nothing for an empty list."""
    if not skipped:
        return
    n = len(skipped)
    shown = "; ".join(printable(s) for s in skipped[:SHOWN]) + (
        f"; and {n - SHOWN} more" if n > SHOWN else ""
    )
    if strict:
        raise ValueError(f"could not read {n} image(s): {shown}; fix or remove them, or drop --strict")
    warnings.warn(f"could not read {n} image(s), skipped them: {shown}", stacklevel=stacklevel)
