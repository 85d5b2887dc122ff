"""Listing and decoding a large image folder: sela's reader against plain Python loops, in one run.

Builds (once; reused when present) ``TMP/folder-N/train/<class>/<date>/*.jpg``: N small JPEGs copied from
the CIFAR-10 JPEG copy (``--source``, default /tmp/data/cifar10), about 1 % re-encoded as PNG, a few file
links, one folder link inside a class (a second way to the same files), a few non-image files and a few
broken ones (an empty file, a truncated JPEG, a text file named .png, a dangling link). Then measures,
as files/s and as ratios against the baseline measured in the same run:

  listing   sela's walker (``sela.data.reader.walk_images``; and ``scan_folder``, the class folders as
            ``sela train --dataset folder`` lists them) against a plain ``os.walk`` that filters names by
            extension (with and without ``os.stat`` of each file, which sela's cache key needs);
  decode    ``sela.data.folder.load_folder(cache=False)`` (what ``sela train --dataset folder`` runs for an
            in-memory folder: listing, thread-pool decode, stacking, channel statistics) and its decoder
            alone (``decode_images``) against a plain loop ``Image.open(p).convert("RGB").resize((32, 32))``
            into one numpy array, with sela's default thread count and with 1 thread;
  cache     ``load_folder`` with a fresh decode cache: the first load (decode + write) and the second (a hit).

Each decode case runs in a forked child process, which reports its time and its peak resident memory (the
RSS it started with, inherited from this process, is shown apart). The files are in the page cache (just
written or listed); a cold disk would be slower for every reader alike.

    python benchmarks/large_folder.py --n 100000 --tmp /tmp/large   # about 5 minutes on 2 busy cores
    python benchmarks/large_folder.py --n 2000 --tmp /tmp/large     # a smoke test

``--alternate R`` instead times the plain loop and ``decode_images`` (one thread) taking turns R times on the
first 10,000 files of the folder: the fairest comparison on a loaded machine.

``--photos M`` instead builds ``TMP/photos-M``: M full-size photos (3000 x 4000 px JPEGs, about 3 MB each:
Imagewoof64 upscaled, with grain; a quarter of them stored sideways with an EXIF orientation tag) in
``train/`` and M / 4 in ``test/``, and reads the train split each way: a plain PIL loop (no reduced JPEG decoding), sela's stream
(what ``sela train`` reads each epoch above the memory budget; ``SELA_MEMORY_GB=0`` forces it, see
``sela.data.folder``) with 0 and 1 DataLoader workers, and sela's in-memory decode (64 px, below the budget).

    python benchmarks/large_folder.py --photos 240 --tmp /tmp/large  # about 4 minutes to build, 2 to read
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from sela.data.folder import class_names, load_folder, scan_folder
from sela.data.imageset import make_loader
from sela.data.reader import IMAGE_EXTENSIONS, decode_images, decode_workers, walk_images

DATES = 30  # date subfolders per class
PNG_EVERY = 97  # about 1 % of the files as PNG
BUILT = ".built"  # hidden: no reader lists it


# ------------------------------------------------------------------------------------------------ build


def _sources(source: Path) -> list[Path]:
    found = sorted(p for p in source.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not found:
        raise SystemExit(f"no JPEGs under {source}; pass --source with the CIFAR-10 JPEG copy")
    return found


def build_small(root: Path, n: int, source: Path) -> Path:
    """``root/train/<class>/<date>/NNNNNNN.jpg`` (see the module docstring); reused when already built."""
    train = root / "train"
    if (root / BUILT).is_file() and (root / BUILT).read_text() == str(n):
        return train
    shutil.rmtree(root, ignore_errors=True)
    files = _sources(source)
    t0, made = time.perf_counter(), set()
    for i in range(n):
        src, day = files[i % len(files)], (i // 10) % DATES
        folder = train / src.parent.name / f"2024-{1 + day // 28:02d}-{1 + day % 28:02d}"
        if folder not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        if i % PNG_EVERY == 0:
            Image.open(src).convert("RGB").save(folder / f"{i:07d}.png")
        else:
            (folder / f"{i:07d}.jpg").write_bytes(src.read_bytes())
    _add_oddities(train)
    (root / BUILT).write_text(str(n))
    print(f"built {root} ({n:,} files) in {time.perf_counter() - t0:.0f} s")
    return train


def _add_oddities(train: Path) -> None:
    """Links, non-image files and broken files, as real folders have."""
    classes = sorted(p for p in train.iterdir() if p.is_dir())
    for k, cls in enumerate(classes[:3]):
        dates = sorted(p for p in cls.iterdir() if p.is_dir())
        first = sorted(dates[0].iterdir())[0]
        os.symlink(os.path.relpath(first, dates[1]), dates[1] / f"link-{k}.jpg")  # a file link
        (dates[0] / "notes.txt").write_text("not an image\n")
        (dates[0] / "Thumbs.db").write_bytes(b"\0" * 64)
        (dates[0] / ".DS_Store").write_bytes(b"\0" * 64)
    first = classes[0]
    os.symlink(sorted(p.name for p in first.iterdir())[0], first / "latest")  # a second way to one date folder
    broken = sorted(first.iterdir())[1]
    (broken / "empty.jpg").write_bytes(b"")
    whole = next(p for p in sorted(broken.iterdir()) if p.suffix == ".jpg" and p.stat().st_size > 0)
    (broken / "truncated.jpg").write_bytes(whole.read_bytes()[: whole.stat().st_size // 3])
    (broken / "text.png").write_text("not a PNG\n")
    os.symlink("gone.jpg", broken / "dangling.jpg")


def build_photos(root: Path, n: int, source: Path) -> Path:
    """``root/{train,test}/<class>/*.jpg``: 3000 x 4000 px JPEGs (upscaled), every 4th stored sideways
    (4000 x 3000) with the EXIF orientation that turns it upright; reused when already built."""
    if (root / BUILT).is_file() and (root / BUILT).read_text() == str(n):
        return root
    shutil.rmtree(root, ignore_errors=True)
    files = _sources(source)
    t0 = time.perf_counter()
    grain = np.random.default_rng(0).integers(-12, 13, (4000, 3000, 3), dtype=np.int16)
    for i in range(n + n // 4):
        src = files[(i * 7919) % len(files)]  # spread over the classes
        split = "train" if i < n else "test"
        folder = root / split / src.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.open(src).convert("RGB").resize((3000, 4000), Image.Resampling.BICUBIC)
        # sensor-like grain: a smooth upscale would make 0.5 MB files that decode 3x faster than photos
        img = Image.fromarray((np.asarray(img, np.int16) + np.roll(grain, i, axis=0)).clip(0, 255).astype(np.uint8))
        exif = Image.Exif()
        if i % 4 == 0:
            img, exif[0x0112] = img.transpose(Image.Transpose.ROTATE_90), 6  # 6: turn 90 degrees clockwise
        img.save(folder / f"IMG_{i:05d}.jpg", quality=90, exif=exif)
    (root / BUILT).write_text(str(n))
    print(f"built {root} ({n + n // 4} photos) in {time.perf_counter() - t0:.0f} s")
    return root


# ---------------------------------------------------------------------------------------------- listing


def plain_walk(top: Path, with_stat: bool) -> int:
    """Image files below ``top`` by a plain ``os.walk`` (links followed), names filtered by extension."""
    count = 0
    for folder, _, names in os.walk(top, followlinks=True):
        for name in names:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                if with_stat:
                    try:
                        os.stat(os.path.join(folder, name))
                    except OSError:
                        continue
                count += 1
    return count


def best_time(fn, repeat: int) -> tuple[float, int]:
    """(the shortest of ``repeat`` runs in s, what ``fn`` returned: a file count)."""
    times, count = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        count = fn()
        times.append(time.perf_counter() - t0)
    return min(times), count


def measure_listing(root: Path, train: Path, repeat: int) -> list[tuple[str, float, int]]:
    cases = [
        ("plain os.walk, names filtered", lambda: plain_walk(train, False)),
        ("plain os.walk + os.stat", lambda: plain_walk(train, True)),
        ("sela walk_images", lambda: len(walk_images(str(train)).paths)),
        ("sela scan_folder (classes)", lambda: len(scan_folder(str(train), class_names(str(root))).listing.paths)),
    ]
    return [(name, *best_time(fn, repeat)) for name, fn in cases]


# ---------------------------------------------------------------------------------------------- decode


def plain_decode(paths: list[str], workers: int) -> int:
    """The plain loop: ``Image.open(p).convert("RGB").resize((32, 32))`` into one (N, 32, 32, 3) array,
    ``workers`` threads over chunks of files; unreadable files are left out. Returns the count read."""
    out = np.empty((len(paths), 32, 32, 3), np.uint8)
    chunk = max(1, min(512, len(paths) // (4 * workers) + 1))

    def one_chunk(start: int) -> int:
        ok = 0
        for i in range(start, min(start + chunk, len(paths))):
            try:
                out[i] = np.asarray(Image.open(paths[i]).convert("RGB").resize((32, 32)))
                ok += 1
            except Exception:  # noqa: BLE001 - the baseline skips what PIL cannot read
                continue
        return ok

    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(one_chunk, range(0, len(paths), chunk)))


def _child(job, conn) -> None:
    rss0 = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    t0 = time.perf_counter()
    count = job()
    seconds = time.perf_counter() - t0
    conn.send((seconds, count, rss0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
    conn.close()


def in_child(job) -> tuple[float, int, int, int]:
    """(seconds, files read, RSS at start in bytes, peak RSS in bytes) of ``job()`` in a forked process."""
    ctx = get_context("fork")
    here, there = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(job, there))
    proc.start()
    result = here.recv()
    proc.join()
    return result


def measure_decode(root: Path, paths: list[str], workers: int, cache: Path) -> list[tuple]:
    """Each decode case in a child: (name, threads, seconds, files, RSS at start, peak RSS)."""

    def sela_load(use_cache: bool) -> int:
        return len(load_folder(str(root), "train", cache=use_cache))

    cases = [
        ("plain PIL loop", workers, lambda: plain_decode(paths, workers)),
        ("sela load_folder, no cache", workers, lambda: sela_load(False)),
        ("sela decode_images", workers, lambda: len(decode_images(paths, None, 64, workers)[1])),
        ("plain PIL loop", 1, lambda: plain_decode(paths, 1)),
        ("sela decode_images", 1, lambda: len(decode_images(paths, None, 64, 1)[1])),
        ("sela load_folder, cache miss (writes)", workers, lambda: sela_load(True)),
        ("sela load_folder, cache hit", workers, lambda: sela_load(True)),
    ]
    os.environ["SELA_CACHE"] = str(cache)
    os.environ.pop("SELA_NO_CACHE", None)
    return [(name, threads, *in_child(job)) for name, threads, job in cases]


def plain_photo_loop(paths: list[str]) -> int:
    """The plain loop for photos, one thread: ``Image.open(p).convert("RGB").resize((256, 256))``."""
    for p in paths:
        np.asarray(Image.open(p).convert("RGB").resize((256, 256)))
    return len(paths)


def stream_pass(root: Path, workers: int) -> int:
    """One pass over the streamed train split (256 px, as ``sela train`` streams it), batches of 64 from
    a DataLoader with ``workers`` processes. Returns the images read."""
    images = load_folder(str(root), "train", in_memory=False)
    return sum(len(x) for x, _ in make_loader(images, 64, num_workers=workers))


def measure_photos(root: Path) -> list[tuple]:
    """The photo folder read each way, in a child each: (name, workers, seconds, files, RSS at start, peak)."""
    paths = walk_images(str(root / "train")).paths
    cases = [
        ("plain PIL loop, 256 px", 0, lambda: plain_photo_loop(paths)),
        ("sela streamed, 256 px", 0, lambda: stream_pass(root, 0)),
        ("sela streamed, 256 px", 1, lambda: stream_pass(root, 1)),
        ("sela in memory (64 px), no cache", decode_workers(), lambda: len(load_folder(str(root), cache=False))),
    ]
    return [(name, w, *in_child(job)) for name, w, job in cases]


def alternate(paths: list[str], rounds: int) -> None:
    """The plain loop and ``decode_images``, one thread each, taking turns ``rounds`` times on the same
    files (so both see the same machine load); prints each one's best files/s and the ratio."""
    jobs = {
        "plain PIL loop": lambda: plain_decode(paths, 1),
        "sela decode_images": lambda: decode_images(paths, None, 64, 1, progress=False),
    }
    best = dict.fromkeys(jobs, float("inf"))
    for _ in range(rounds):
        for name, job in jobs.items():
            t0 = time.perf_counter()
            job()
            best[name] = min(best[name], time.perf_counter() - t0)
    for name, seconds in best.items():
        print(f"{name:<20} 1 thread, best of {rounds} alternated: {len(paths) / seconds:,.0f} files/s")
    print(f"ratio sela / plain: {best['plain PIL loop'] / best['sela decode_images']:.2f}")


# ------------------------------------------------------------------------------------------------ report


def print_tables(listing: list[tuple[str, float, int]], decode: list[tuple], workers: int) -> None:
    base = listing[0][2] / listing[0][1]
    print(f"\nlisting (best of the runs; ratio: files/s against {listing[0][0]})")
    print(f"| {'reader':<32} | {'files':>8} | {'s':>7} | {'files/s':>9} | ratio |")
    for name, seconds, count in listing:
        print(f"| {name:<32} | {count:>8,} | {seconds:7.3f} | {count / seconds:9,.0f} | {count / seconds / base:5.2f} |")
    rates = {(n, t): c / s for n, t, s, c, _, _ in decode}
    print(f"\ndecode (ratio: files/s against the plain PIL loop with the same threads; sela's default: {workers})")
    print(f"| {'reader':<38} | threads | {'files':>8} | {'s':>7} | {'files/s':>8} | ratio | RSS start -> peak |")
    for name, threads, seconds, count, rss0, peak in decode:
        ratio = rates[(name, threads)] / rates[("plain PIL loop", threads)]
        print(
            f"| {name:<38} | {threads:>7} | {count:>8,} | {seconds:7.2f} | {count / seconds:8,.0f} | {ratio:5.2f} "
            f"| {rss0 / 2**20:5.0f} -> {peak / 2**20:5.0f} MiB |"
        )


def print_photos(rows: list[tuple]) -> None:
    base = rows[0][3] / rows[0][2]
    print("\nfull-size photos, train split (ratio: files/s against the plain PIL loop)")
    print(f"| {'reader':<34} | workers | {'files':>5} | {'s':>6} | files/s | ratio | RSS start -> peak |")
    for name, w, seconds, count, rss0, peak in rows:
        print(
            f"| {name:<34} | {w:>7} | {count:>5} | {seconds:6.1f} | {count / seconds:7.1f} | "
            f"{count / seconds / base:5.2f} | {rss0 / 2**20:5.0f} -> {peak / 2**20:5.0f} MiB |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="files in the folder (100000)")
    parser.add_argument("--tmp", type=Path, required=True, help="where the folder is built (and reused)")
    parser.add_argument("--source", type=Path, help="images to copy (CIFAR-10 / Imagewoof64 JPEG copies)")
    parser.add_argument("--repeat", type=int, default=3, help="listing runs, the best counts (3)")
    parser.add_argument("--alternate", type=int, help="only: plain and sela decode on 10,000 files, R turns each")
    parser.add_argument("--photos", type=int, help="full-size photos instead: build M (once), read them each way")
    args = parser.parse_args()
    if args.photos:
        root = build_photos(args.tmp / f"photos-{args.photos}", args.photos, args.source or Path("/tmp/data/imagewoof64"))
        print_photos(measure_photos(root))
        return
    root = args.tmp / f"folder-{args.n}"
    train = build_small(root, args.n, args.source or Path("/tmp/data/cifar10"))
    if args.alternate:
        alternate(walk_images(str(train)).paths[:10_000], args.alternate)
        return
    workers = decode_workers()  # decode_images' default
    listing = measure_listing(root, train, args.repeat)
    paths = walk_images(str(train)).paths
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="cache-") as cache:
        decode = measure_decode(root, paths, workers, Path(cache))
    print_tables(listing, decode, workers)


if __name__ == "__main__":
    main()
