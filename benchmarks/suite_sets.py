"""The image folders of the suite (benchmarks/suite.py): variants of CIFAR-10, Imagewoof64 and MNIST.

Each set is an ImageFolder tree ``<cache>/<name>/{train,test}/<class>/*`` made once from a source folder
(``/tmp/data/<source>``, extracted from ``../shared/data/*.tar.gz`` when missing) and reused while its
``set.json`` records the same specification. The variants span the axes real folders vary on:

  * colour vs greyscale: ``*-grey`` converts every image to one channel (PIL mode L, saved as PNG);
  * image side: ``imagewoof64-32px`` (downscaled), ``cifar10-16px`` (downscaled), ``cifar10-64px`` (upscaled);
  * number of training images: ``cifar10-2k``, ``cifar10-5k``, ``cifar10-10k`` (class-balanced);
  * content: ``mnist-10k`` (shapes), the CIFAR-10 sets (objects), the Imagewoof sets (fine-grained dog breeds);
  * balanced vs long-tailed: ``cifar10-longtail`` keeps 1 - 0.1 c of class c's 1,000 images (5,500 in all;
    classes numbered by sorted folder name); its test split stays balanced.

The test split is always the source's whole test split, converted the same way as the training images.
Choosing is deterministic: each class's files are sorted by name and permuted by ``numpy``'s generator
seeded with ``SetSpec.seed``; files kept unchanged are copied byte for byte, converted ones are written
as PNG (no second lossy encoding). Resizing uses sela's own reader (:func:`sela.data.reader.fit_image`:
shorter side to S, bilinear, antialiased, centre crop), so a set at S px is what ``--image-size S`` shows.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from sela.data.reader import IMAGE_EXTENSIONS, fit_image

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
ARCHIVES = {"cifar10": "cifar10-jpeg.tar.gz", "imagewoof64": "imagewoof64-jpeg.tar.gz", "mnist": "mnist-png.tar.gz"}
# where each archive's tree lands relative to the data root (cifar10's archive holds train/ and test/ directly)
ARCHIVE_TARGET = {"cifar10": "cifar10", "imagewoof64": "", "mnist": ""}
SPEC_FILE = "set.json"
VERSION = 1  # bump when the way sets are made changes: cached sets are then made again


@dataclass(frozen=True)
class SetSpec:
    """How one suite set is made from a source folder.

    Attributes:
        name: the set's folder name.
        source: the source folder's name under the data root (``cifar10``, ``imagewoof64``, ``mnist``).
        kind: what the images show (``objects``, ``shapes``, ``fine-grained``), for the table.
        per_class: training images kept per class (balanced); None keeps them all.
        total: training images kept in all, each class in its own proportion (MNIST's official
            counts are not balanced); None: see ``per_class``.
        longtail: class c (sorted folder names, c = 0..C-1) keeps round((1 - 0.1 c) x per_class) images.
        grey: convert every image to one channel (PIL mode L).
        side: resize every image to side x side px (None: as the source).
        seed: the seed of the per-class permutation.
    """

    name: str
    source: str
    kind: str
    per_class: int | None = None
    total: int | None = None
    longtail: bool = False
    grey: bool = False
    side: int | None = None
    seed: int = 0

    def converts(self) -> bool:
        """Whether images are re-encoded (grey or resized) rather than copied."""
        return self.grey or self.side is not None


SUITE: tuple[SetSpec, ...] = (
    SetSpec("mnist-10k", "mnist", "shapes", total=10_000),
    SetSpec("cifar10-2k", "cifar10", "objects", per_class=200),
    SetSpec("cifar10-5k", "cifar10", "objects", per_class=500),
    SetSpec("cifar10-10k", "cifar10", "objects", per_class=1000),
    SetSpec("cifar10-longtail", "cifar10", "objects", per_class=1000, longtail=True),
    SetSpec("cifar10-grey", "cifar10", "objects", per_class=1000, grey=True),
    SetSpec("cifar10-16px", "cifar10", "objects", per_class=1000, side=16),
    SetSpec("cifar10-64px", "cifar10", "objects", per_class=1000, side=64),
    SetSpec("imagewoof64", "imagewoof64", "fine-grained"),
    SetSpec("imagewoof64-grey", "imagewoof64", "fine-grained", grey=True),
    SetSpec("imagewoof64-32px", "imagewoof64", "fine-grained", side=32),
)
BY_NAME = {s.name: s for s in SUITE}


def select(names: list[str] | None) -> list[SetSpec]:
    """The suite's sets named in ``names`` (all when None or empty), in suite order."""
    if not names:
        return list(SUITE)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown set(s) {', '.join(unknown)}; choose from {', '.join(BY_NAME)}")
    return [s for s in SUITE if s.name in names]


# ---------------------------------------------------------------------------------------------- choosing


def class_files(split_dir: Path) -> dict[str, list[Path]]:
    """{class folder name: its image files sorted by name}, classes sorted by name."""
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image>")
    return {
        c: sorted(p for p in (split_dir / c).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) for c in classes
    }


def keep_counts(available: list[int], spec: SetSpec) -> list[int]:
    """Training images kept per class (classes in sorted order) for ``spec``, given ``available`` per class.

    ``total``: proportional, by largest remainders, summing to ``total``; ``per_class`` with ``longtail``:
    round((1 - 0.1 c) x per_class) for class c; ``per_class``: that many each; neither: all.
    """
    n = len(available)
    if spec.total is not None:
        if spec.total > sum(available):
            raise ValueError(f"{spec.name}: total {spec.total} exceeds the {sum(available)} images available")
        exact = np.asarray(available, dtype=float) * spec.total / sum(available)
        counts = np.floor(exact).astype(int)
        for c in np.argsort(-(exact - counts), kind="stable")[: spec.total - counts.sum()]:
            counts[c] += 1
        return counts.tolist()
    if spec.per_class is None:
        return list(available)
    if spec.longtail and n > 10:
        raise ValueError(f"{spec.name}: the long tail 1 - 0.1 c needs at most 10 classes, got {n}")
    wanted = [round((1 - 0.1 * c) * spec.per_class) if spec.longtail else spec.per_class for c in range(n)]
    short = [c for c in range(n) if wanted[c] > available[c]]
    if short:
        raise ValueError(f"{spec.name}: class {short[0]} has {available[short[0]]} images, {wanted[short[0]]} asked")
    return wanted


def choose(files: dict[str, list[Path]], counts: list[int], seed: int) -> dict[str, list[Path]]:
    """The first ``counts[c]`` files of each class's seeded permutation, back in name order."""
    rng = np.random.default_rng(seed)
    chosen = {}
    for (name, paths), k in zip(files.items(), counts, strict=True):
        order = rng.permutation(len(paths))[:k]
        chosen[name] = [paths[i] for i in sorted(order)]
    return chosen


# ---------------------------------------------------------------------------------------------- writing


def convert(src: Path, dst_dir: Path, spec: SetSpec) -> None:
    """Write ``src`` into ``dst_dir`` as ``spec`` asks: a byte copy, or grey and/or resized as PNG."""
    if not spec.converts():
        shutil.copyfile(src, dst_dir / src.name)
        return
    with Image.open(src) as img:
        img = ImageOps.exif_transpose(img)
        img = img.convert("L" if spec.grey else "RGB")
        if spec.side is not None:
            img = fit_image(img, spec.side, spec.side)
        img.save(dst_dir / (src.stem + ".png"))


def write_split(chosen: dict[str, list[Path]], dst: Path, spec: SetSpec, workers: int = 4) -> dict[str, int]:
    """Write the chosen files of one split under ``dst/<class>/``; returns {class: images written}."""
    for name in chosen:
        (dst / name).mkdir(parents=True, exist_ok=True)
    jobs = [(src, dst / name) for name, paths in chosen.items() for src in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda job: convert(job[0], job[1], spec), jobs))
    return {name: len(paths) for name, paths in chosen.items()}


def first_image(folder: Path) -> tuple[int, str]:
    """The side (px) and colour (``grey`` for one channel, else ``colour``) of the first image under
    ``folder`` (every image of a suite set is square, of one size and of one mode)."""
    first = next(p for d in sorted(folder.iterdir()) for p in sorted(d.iterdir()))
    with Image.open(first) as img:
        return img.size[0], "grey" if img.mode in ("L", "LA", "I;16", "I", "F", "1") else "colour"


def describe(spec: SetSpec, counts: dict[str, dict[str, int]], side: int, colour: str) -> dict:
    """The record written to ``set.json``: the specification, the counts per split and class, the side
    (px) and colour of the images."""
    return {
        "version": VERSION,
        "spec": asdict(spec),
        "n_train": sum(counts["train"].values()),
        "n_test": sum(counts["test"].values()),
        "counts": counts,
        "side": side,
        "colour": colour,
        "kind": spec.kind,
    }


def read_record(folder: Path, spec: SetSpec) -> dict | None:
    """``folder``'s set.json when it describes ``spec`` as made by this VERSION, else None."""
    path = folder / SPEC_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    same = record.get("version") == VERSION and record.get("spec") == asdict(spec)
    return record if same else None


def make_set(spec: SetSpec, data_root: Path, cache: Path, *, workers: int = 4) -> tuple[Path, dict]:
    """The folder of ``spec`` under ``cache`` and its record, made from ``data_root/<source>`` unless a
    folder of the same specification is already there. Written into a temporary folder and renamed, so an
    interrupted run leaves no half-made set behind."""
    folder = cache / spec.name
    record = read_record(folder, spec)
    if record is not None:
        return folder, record
    source = data_root / spec.source
    for split in ("train", "test"):
        if not (source / split).is_dir():
            raise ValueError(f"{source}/{split} is missing; extract the data first (see ../shared/README.md)")
    tmp = cache / f".{spec.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {}
    for split in ("train", "test"):
        files = class_files(source / split)
        if split == "train":
            files = choose(files, keep_counts([len(v) for v in files.values()], spec), spec.seed)
        counts[split] = write_split(files, tmp / split, spec, workers)
    record = describe(spec, counts, *first_image(tmp / "train"))
    (tmp / SPEC_FILE).write_text(json.dumps(record, indent=1))
    if folder.exists():
        shutil.rmtree(folder)  # a set of an older specification
    tmp.rename(folder)
    return folder, record


def ensure_source(name: str, data_root: Path, archives: Path = SHARED_DATA) -> Path:
    """``data_root/name`` with train/ and test/, extracted from the shared archive when missing."""
    folder = data_root / name
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        return folder
    archive = archives / ARCHIVES[name]
    if not archive.is_file():
        raise ValueError(f"{folder} is missing and so is {archive}; extract the data (../shared/README.md)")
    target = data_root / ARCHIVE_TARGET[name]
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    if not (folder / "train").is_dir():
        raise ValueError(f"extracting {archive} into {target} gave no {folder}/train; check the archive")
    return folder
