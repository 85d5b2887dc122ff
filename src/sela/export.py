"""Labels and features out of sela: a run's self-labels with confidences, labelling new images, clustering
a run's embedding into N groups (``sela labels --k``, ``--k-scan``), clustering a feature file, embedding
images with a run's backbone, and exporting the backbone's weights.

The labels CSV format is :mod:`sela.rundir`'s (``path`` or ``index``, ``head0`` .., ``confidence0`` ..);
a confidence is the largest softmax probability of that head's logits on the un-augmented image, in
0..1. ``sela train``'s labels.csv is the same format without the confidence columns.

An embedding file (:func:`write_embedding`) is picked by its suffix: ``.npy`` (N, D) float32 with the
image paths in ``<stem>.paths.txt`` next to it, ``.pt`` ``{"features": (N, D) float32, "paths": [...]}``
(loads with ``torch.load(..., weights_only=True)``), or ``.csv`` (``path, f0 .. f{D-1}``).

Letters: N images, H heads, K_h clusters of head h, D features.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sela.clusters import (
    DEFAULT_RELAX,
    KScan,
    OTKMeans,
    balance_lines,
    check_relax,
    format_scan,
    parse_k_list,
    scan_k,
)
from sela.data import EvalTransform, ImageSet, make_loader
from sela.data.reader import IMAGE_EXTENSIONS, decode_images, printable, report_unreadable, walk_images
from sela.eval.features import extract
from sela.labeller import SelfLabeller, feature_matrix
from sela.models.export import (
    ONNX_INPUT,
    ONNX_OPSET,
    ONNX_OUTPUT,
    backbone_payload,
    backbone_spec,
    check_onnx_packages,
    export_onnx,
    info_path,
    onnx_difference,
    timm_recipe,
    torchvision_recipe,
)
from sela.models.resnet import ResNet
from sela.rundir import atomic_write, atomic_write_all, load_file, write_json, write_labels_csv
from sela.runs import Run
from sela.sinkhorn import DEFAULT_LAM, assign

# ------------------------------------------------------------------------------------------ model outputs


def head_outputs(
    model: nn.Module,
    images: Tensor | torch.utils.data.Dataset,
    *,
    transform: EvalTransform,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    workers: int = 0,
    progress: bool | None = None,
) -> list[Tensor]:
    """H tensors (N, K_h) of the heads' logits on un-augmented images (uint8 tensor or dataset).

    A dataset is read by a DataLoader with ``workers`` processes (streamed images decode there).
    """
    source = images if isinstance(images, Tensor) else make_loader(images, batch_size, num_workers=workers)
    return extract(
        model, source, transform=transform, device=device, batch_size=batch_size, progress=progress
    ).logits


def train_features(
    run: Run,
    *,
    batch_size: int = 256,
    workers: int = 0,
    layer: str | None = None,
    progress: bool | None = None,
) -> Tensor:
    """(N, D) float32 backbone features of a run's training images, un-augmented: what ``sela embed``
    computes for them (the run's input size and normalisation; ``layer`` as there)."""
    if run.train_set is None:
        raise ValueError(f"{run.source} was opened without its training images; pass its run directory")
    images = run.train_set.source()
    source = images if isinstance(images, Tensor) else make_loader(images, batch_size, num_workers=workers)
    return extract(
        run.model, source, transform=run.transform, batch_size=batch_size, layer=layer, heads=False,
        progress=progress,
    ).features  # fmt: skip


def confidences(logits: list[Tensor]) -> Tensor:
    """(H, N) largest softmax probability of each head's (N, K_h) logits."""
    return torch.stack([lg.float().softmax(dim=1).amax(dim=1) for lg in logits])


def assign_labels(logits: list[Tensor], *, balanced: bool = False, lam: float = DEFAULT_LAM) -> Tensor:
    """(H, N) clusters from each head's (N, K_h) logits: argmax, or equal-sized clusters by Sinkhorn.

    ``balanced`` spreads the N images as evenly as possible over each head's K_h clusters
    (:func:`sela.sinkhorn.assign` with ``lam``), which only makes sense for a set of many images.
    """
    if not balanced:
        return torch.stack([lg.argmax(dim=1) for lg in logits])
    if lam <= 0:
        raise ValueError(f"--lam must be positive, got {lam}")
    n, k = logits[0].shape[0], max(lg.shape[1] for lg in logits)
    if n < k:
        raise ValueError(f"--balanced spreads images over {k} clusters but got only {n}; drop --balanced")
    return torch.stack([assign(lg.float(), lam=lam).labels.cpu() for lg in logits])


# ---------------------------------------------------------------------------------------------- inputs


def list_images(source: str | os.PathLike) -> list[str]:
    """Image files to label, as absolute paths: every image below a folder, or the lines of a text list.

    A folder is walked by :func:`sela.data.reader.walk_images`, as ``sela train`` walks its data (links
    followed once, sela's run directories left out; a dangling link is listed, so that it is named with
    the files that cannot be read). A list is UTF-8 (a byte-order mark is fine; bytes that are not
    UTF-8 are kept as they are); a relative path in it is relative to the list file's folder; blank lines
    and lines starting with ``#`` are skipped. The paths :func:`write_embedding` writes are absolute, so a
    ``.paths.txt`` reads back as a list from anywhere.
    """
    source = Path(source)
    if source.is_dir():
        found = walk_images(os.path.abspath(source))
        if not found.paths:
            raise ValueError(f"no images under {source} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        unlisted = [s for s in found.skipped if not s.startswith(tuple(found.broken))]
        report_unreadable(unlisted, strict=False)  # folders; a broken file is named when it is read
        return sorted(found.paths + found.broken)
    if not source.is_file():
        raise FileNotFoundError(f"--images {source} does not exist; pass a folder of images or a file list")
    if source.suffix.lower() in IMAGE_EXTENSIONS:
        return [os.path.abspath(source)]
    try:
        text = source.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    except OSError as err:
        raise ValueError(f"could not read the file list {source} ({err.strerror or err})") from None
    if "\0" in text:
        raise ValueError(f"{source} is neither an image nor a text list of image paths")
    folder = os.path.abspath(source.parent)
    paths = [
        os.path.normpath(os.path.join(folder, line.strip()))  # an absolute line stays as it is
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    if not paths:
        raise ValueError(f"the file list {source} is empty; put one image path per line")
    return paths


def read_images(paths: list[str], size: int, *, channels: int = 3) -> tuple[Tensor, list[str], list[str]]:
    """Decode image files into uint8 (M, C, size, size) (shorter side to ``size``, center crop), as
    ``sela train`` decodes them; unreadable files are left out.

    Returns the images, the M paths that were read (in order) and "PATH (reason)" for each file left out.
    """
    images, ok, failed = decode_images(paths, (size, size), None)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (M, 3, S, S)
    if channels == 1:
        x = x.float().mul(torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1, keepdim=True)
        x = x.round().clamp(0, 255).to(torch.uint8)  # (M, 1, S, S)
    return x, [paths[i] for i in ok], failed


def load_images(paths: list[str], size: int, *, channels: int = 3) -> Tensor:
    """Decode every one of ``paths`` into uint8 (N, C, size, size) (see :func:`read_images`); a
    ``ValueError`` naming the files that could not be read."""
    x, _, failed = read_images(paths, size, channels=channels)
    report_unreadable(failed, strict=True)
    return x


def _none_read(failed: list[str]) -> ValueError:
    shown = "; ".join(printable(f) for f in failed[:3]) + (
        f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
    )
    return ValueError(f"could not read any of the {len(failed)} image(s): {shown}")


def load_features(path: str | os.PathLike) -> Tensor:
    """An (N, D) float32 feature matrix from a ``.npy`` file or a ``.pt`` file holding one tensor."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass an (N, D) array saved as .npy or .pt")
    if path.suffix not in (".npy", ".pt", ".pth"):
        raise ValueError(f"{path} must be a .npy or .pt file; save the features with np.save or torch.save")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is an empty file; save an (N, D) array into it")
    if path.suffix == ".npy":
        x = _load_npy(path)
    else:
        x = load_file(path, "feature file")
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biuf":
            raise ValueError(f"{path} must hold real numbers, got dtype {x.dtype}")
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise ValueError(f"{path} holds a {type(x).__name__}, not one array; save only the (N, D) tensor")
    return feature_matrix(x, str(path))


def _load_npy(path: Path) -> np.ndarray:
    """A .npy array, memory-mapped first so that a header claiming more than the file holds is caught
    before anything is allocated; pickled object arrays are refused."""
    try:
        x = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(f"{path} is not a readable array ({str(e).strip().splitlines()[0]})") from None
    return np.array(x)  # reads the data (a header that claims more than the file holds fails above)


def cluster_features(
    features: Tensor,
    *,
    n_clusters: int,
    n_heads: int = 1,
    lam: float = DEFAULT_LAM,
    epochs: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor, int]:
    """Self-label (N, D) features with :class:`sela.labeller.SelfLabeller`.

    Returns the (H, N) balanced labels, the (H, N) confidences of each head and the labeller's best head.
    """
    if n_clusters > features.shape[0]:
        raise ValueError(f"--k {n_clusters} exceeds the {features.shape[0]} rows; ask for fewer clusters")
    more = {} if epochs is None else {"epochs": epochs}  # None: SelfLabeller's own default
    labeller = SelfLabeller(n_clusters, n_heads=n_heads, lam=lam, seed=seed, device=device, **more)
    labeller.fit(features)
    conf = torch.stack(
        [torch.from_numpy(labeller.predict_proba(features, head=h)).amax(dim=1) for h in range(n_heads)]
    )
    return torch.from_numpy(labeller.labels_per_head_), conf, labeller.best_head_


# ------------------------------------------------------------------------------------- run-level commands


def size_histograms(labels: Tensor, n_clusters: list[int], csv_path: str | os.PathLike) -> list[Path]:
    """One cluster-size PNG per head next to a labels CSV: ``<stem>_sizes_head<h>.png``."""
    from sela.plots import plot_cluster_sizes

    csv_path = Path(csv_path)
    written = []
    for h, k in enumerate(n_clusters):

        def write(tmp: Path, h: int = h, k: int = k) -> None:
            plot_cluster_sizes(labels[h : h + 1], [k], tmp, histogram=True, heads=[h])

        written.append(atomic_write(csv_path.with_name(f"{csv_path.stem}_sizes_head{h}.png"), write))
    return written


def _run_labels(run: Run, *, batch_size: int, workers: int, progress: bool | None) -> tuple[Tensor, Tensor]:
    """A run's (H, N) training self-labels and the (H, N) confidences of its heads on those images."""
    if run.labels is None:
        raise ValueError(
            f"{run.source} holds no self-labels of these {len(run.train_set)} training images; "
            "pass the run directory of `sela train` with its own data"
        )
    logits = head_outputs(
        run.model,
        run.train_set.source(),
        transform=run.transform,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
    )
    return run.labels, confidences(logits)


def export_run_labels(
    run: Run,
    out: str | os.PathLike,
    *,
    batch_size: int = 256,
    workers: int = 0,
    progress: bool | None = None,
) -> tuple[Path, list[Path]]:
    """Write a run's training self-labels with each head's confidence, and the size histograms.

    Returns the CSV path and the PNG paths.
    """
    labels, conf = _run_labels(run, batch_size=batch_size, workers=workers, progress=progress)
    path = write_labels_csv(out, labels, paths=run.train_set.paths, confidence=conf)
    return path, size_histograms(labels, list(run.model.n_clusters), path)


def _new_image_labels(
    run: Run, images: str | os.PathLike, *, balanced: bool, lam: float, batch_size: int, progress: bool | None
) -> tuple[Tensor, Tensor, list[str]]:
    """(H, M) labels and confidences of the heads on the M new images that could be read, and their paths."""
    if run.untrained_heads:
        raise ValueError(f"heads {run.untrained_heads} of {run.source} are untrained; label with a sela run")
    x, paths, failed = read_images(list_images(images), run.image_size, channels=run.channels)
    if not paths:
        raise _none_read(failed)
    report_unreadable(failed, strict=False)  # (M, C, S, S): the files that were read
    logits = head_outputs(run.model, x, transform=run.transform, batch_size=batch_size, progress=progress)
    return assign_labels(logits, balanced=balanced, lam=lam), confidences(logits), paths  # (H, M) each


def label_images(
    run: Run,
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    balanced: bool = False,
    lam: float = DEFAULT_LAM,
    batch_size: int = 256,
    progress: bool | None = None,
) -> tuple[Path, list[Path], Tensor]:
    """Label new images (a folder or a file list) with a run's trained heads and write them as CSV.

    Each image is fitted to the run's input size and normalised like its training set; a file that cannot
    be read is left out with one warning. Returns the CSV path, the size-histogram PNGs and the (H, M)
    labels of the M images read.
    """
    labels, conf, paths = _new_image_labels(
        run, images, balanced=balanced, lam=lam, batch_size=batch_size, progress=progress
    )
    path = write_labels_csv(out, labels, paths=paths, confidence=conf)
    return path, size_histograms(labels, list(run.model.n_clusters), path), labels


# ------------------------------------------------------------------------ sela labels: one entry point


def check_labels_request(
    *,
    k: int | None = None,
    k_scan: str | None = None,
    balanced: bool = False,
    images: str | None = None,
    into: str | None = None,
    copy: bool = False,
    head: int | None = None,
    marginal: str | None = None,
    relax: float | None = None,
) -> tuple[list[int], float | None]:
    """Check how ``sela labels``'s options combine, before any work: returns the K of ``k_scan`` ([]
    without one) and the relaxed marginal's rho (None: equal cluster sizes). ``ValueError`` naming the fix.
    """
    clustering = k is not None or bool(k_scan)
    rules = [
        (balanced and not images, "--balanced applies to new images; add --images PATH (a run's own labels are balanced)"),
        (balanced and clustering, "--balanced is for the heads' labels; --k's clusters are balanced already"),
        (k is not None and k < 2, f"--k must be 2 or more, got {k}"),
        (k is not None and bool(k_scan), "--k-scan measures which K to take; run it first, then --k N"),
        (bool(k_scan) and bool(into), "--into lays out one clustering; drop --k-scan, or use --k N"),
        (copy and not into, "--copy applies to --into DIR; add --into"),
        (head is not None and (not into or k is not None), "--head picks the heads' clustering for --into"),
        ((marginal or relax is not None) and not clustering, "--marginal and --relax apply to --k or --k-scan"),
        (marginal == "uniform" and relax is not None, "--relax weighs the relaxed marginal; drop --marginal uniform"),
    ]  # fmt: skip
    for broken, message in rules:
        if broken:
            raise ValueError(message)
    if into:
        from sela.report import check_layout_dir

        check_layout_dir(into)
    rho = relax if relax is not None else DEFAULT_RELAX if marginal == "relaxed" else None
    check_relax(rho)
    return (parse_k_list(k_scan) if k_scan else []), rho


@dataclass
class LabelExport:
    """What :func:`export_labels` wrote and the clusterings in it.

    Attributes:
        csv, plots: the labels CSV and its size histograms (one per clustering).
        labels, confidence: (H, N) clusters and confidences (0..1), one row per head or the one k-means.
        n_clusters, names: K and a name ("head 0", "k-means") of each row.
        what: the images and how they were labelled, for the line that reports the export.
        paths: the N images' files, or None when they have none; then ``images`` holds their pixels.
        uniform: whether equal cluster sizes were asked for (the balance check's yardstick).
    """

    csv: Path
    plots: list[Path]
    labels: Tensor
    confidence: Tensor
    n_clusters: list[int]
    names: list[str]
    what: str
    paths: list[str] | None = None
    images: ImageSet | None = None
    uniform: bool = True
    best: int = 0  # the clustering --into lays out by default (the run's best head)
    source: str = ""

    def report(self) -> list[str]:
        """Lines for the user: what was written, then the balance of each clustering (which warns where
        it is far from what was asked: :func:`sela.clusters.balance_lines`)."""
        plots = ", ".join(str(p) for p in self.plots)
        balance = balance_lines(
            self.labels, self.n_clusters, names=self.names, confidence=self.confidence, uniform=self.uniform
        )
        return [
            f"wrote {self.csv}: {self.what}, with confidences",
            f"wrote size histograms: {plots}",
            *balance,
        ]


def _embedding(
    run: Run, images: str | os.PathLike | None, *, batch_size: int, workers: int, progress: bool | None
) -> tuple[Tensor, list[str] | None, ImageSet | None, str]:
    """(N, D) backbone features of new images (``images``) or of the run's training images, their paths
    (None without files), the training set when it has no files (its pixels), and what they are."""
    if images is not None:
        x, paths = embed_images(run, images, batch_size=batch_size, progress=progress)
        return x, paths, None, f"{len(paths)} new images"
    x = train_features(run, batch_size=batch_size, workers=workers, progress=progress)
    paths = run.train_set.paths
    return x, paths, None if paths is not None else run.train_set, f"{len(x)} training images"


def export_labels(
    run: Run,
    out: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    balanced: bool = False,
    lam: float = DEFAULT_LAM,
    k: int | None = None,
    relax: float | None = None,
    seed: int = 0,
    batch_size: int = 256,
    workers: int = 0,
    progress: bool | None = None,
) -> LabelExport:
    """``sela labels``: write a labels CSV (and its size histograms) of one of three clusterings.

    * ``k``: the backbone features (:func:`train_features`, or of ``images``) clustered into K groups by
      :class:`sela.clusters.OTKMeans` (``relax``: rho of the relaxed marginal; None: equal sizes), the
      confidence the plan's row maximum; one label column.
    * ``images`` without ``k``: the heads' labels of new images (argmax, or equal sizes with ``balanced``).
    * neither: the run's own training self-labels, with each head's confidence.
    """
    n_clusters = list(run.model.n_clusters)
    names = [f"head {h}" for h in range(len(n_clusters))]
    more = {"batch_size": batch_size, "progress": progress}
    if k is not None:
        x, paths, pixels, what = _embedding(run, images, workers=workers, **more)
        fit = OTKMeans(k, relax=relax, seed=seed, device=run.device).fit(x)
        labels, conf = torch.from_numpy(fit.labels_)[None], torch.from_numpy(fit.confidence_)[None]  # (1, N)
        marginal = "equal sizes" if relax is None else f"relaxed sizes, rho {relax:g}"
        n_clusters, names, what = [k], ["k-means"], f"{what} clustered into {k} ({marginal}) x 1 column"
    elif images is not None:
        labels, conf, paths = _new_image_labels(run, images, balanced=balanced, lam=lam, **more)
        pixels, how = None, "balanced" if balanced else "argmax"
        what = f"{len(paths)} new images ({how}) x {len(names)} heads"
    else:
        labels, conf = _run_labels(run, workers=workers, **more)
        paths, pixels = run.train_set.paths, None if run.train_set.paths is not None else run.train_set
        what = f"{labels.shape[1]} training images (self-labels) x {len(names)} heads"
    path = write_labels_csv(out, labels, paths=paths, confidence=conf)
    plots = size_histograms(labels, n_clusters, path)
    best = 0 if k is not None else int(run.summary.get("best_head", 0))
    return LabelExport(path, plots, labels, conf, n_clusters, names, what, paths, pixels, relax is None, best,
                       str(run.source))  # fmt: skip


def write_layout(
    exported: LabelExport, into: str | os.PathLike, *, head: int | None = None, copy: bool = False
) -> str:
    """Lay an export's images out as one folder per cluster (:func:`sela.report.write_cluster_folders`)
    of its clustering ``head`` (default: the run's best head); returns the line that says what was written."""
    from sela.report import SHEET_NAME, write_cluster_folders

    h = exported.best if head is None else head
    if not 0 <= h < len(exported.n_clusters):
        raise ValueError(f"--head {h} does not exist; the run has heads 0..{len(exported.n_clusters) - 1}")
    layout = write_cluster_folders(
        into, exported.labels[h], exported.n_clusters[h], confidence=exported.confidence[h], paths=exported.paths,
        images=exported.images, copy=copy, title=f"sela clusters: {exported.names[h]}",
        info={"source": exported.source, "clustering": exported.names[h], "labels": str(exported.csv)},
    )  # fmt: skip
    why = " (the images have no files)" if exported.paths is None else ""
    return (
        f"wrote {layout.folders} cluster folders under {into} ({exported.names[h]}, {layout.mode}{why}), each "
        f"with {SHEET_NAME}; index: {layout.index}"
    )


def scan_run(
    run: Run,
    ks: list[int],
    out: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    relax: float | None = None,
    seed: int = 0,
    batch_size: int = 256,
    workers: int = 0,
    progress: bool | None = None,
) -> list[str]:
    """``sela labels --k-scan``: score clusterings of the run's embedding at every K of ``ks``
    (:func:`sela.clusters.scan_k`), plot the signals to ``out`` (.png) and write the table next to it
    (.csv). Returns the lines to print: the table and the recommended K with its reason."""
    out = _output_file(out, (".png",), "K scans")
    x, _, _, what = _embedding(run, images, batch_size=batch_size, workers=workers, progress=progress)
    scan = scan_k(x, ks, seed=seed, relax=relax, device=run.device, progress=progress)
    written = write_k_scan(scan, out, title=f"{run.arch} on {run.dataset}: {scan.n} of {what}")
    return [f"scanned K = {', '.join(map(str, ks))} on {scan.n} of {what}", *format_scan(scan),
            f"wrote {written[0]} and {written[1]}"]  # fmt: skip


def write_k_scan(scan: KScan, out: str | os.PathLike, *, title: str = "") -> list[Path]:
    """The scan's plot at ``out`` (.png; :func:`sela.plots.plot_k_scan`) and its table at ``<stem>.csv``."""
    from sela.plots import plot_k_scan

    ks = [s.k for s in scan.scores]
    signals = {
        "stability (NMI of two halves)": [s.stability for s in scan.scores],
        "silhouette (cosine)": [s.silhouette for s in scan.scores],
        "silhouette x stability": [s.silhouette * s.stability for s in scan.scores],
    }
    out = Path(out)
    rows = [["k", "stability", "silhouette", "largest", "smallest", "cost", "recommended"]]
    rows += [[s.k, f"{s.stability:.4f}", f"{s.silhouette:.4f}", f"{s.largest:.3f}", f"{s.smallest:.3f}",
              f"{s.cost:.4f}", int(s.k == scan.best)] for s in scan.scores]  # fmt: skip

    def table(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(rows)

    return atomic_write_all(
        {
            out: lambda tmp: plot_k_scan(ks, signals, scan.best, tmp, title=title),
            out.with_suffix(".csv"): table,
        }
    )


# ------------------------------------------------------------------------------- features and weights out

EMBEDDING_FORMATS = (".npy", ".pt", ".csv")
WEIGHT_FORMATS = (".pt", ".pth", ".onnx")
# what each export layout is, in the line `sela export` prints
LAYOUTS = {"torchvision": "torchvision keys", "timm": "timm keys", "sela": "sela spec", "onnx": "ONNX graph"}


def _output_file(out: str | os.PathLike, suffixes: tuple[str, ...], what: str) -> Path:
    """``out`` as a file path with one of ``suffixes``; a ValueError naming the fix otherwise."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"-o {out} is a directory; give a file name like {out / ('out' + suffixes[0])}")
    if out.suffix.lower() not in suffixes:
        raise ValueError(f"-o {out}: {what} are written as {', '.join(suffixes)}; end the name with one")
    return out


def check_embedding_path(out: str | os.PathLike, paths: list[str] | None = None) -> Path:
    """The embedding file ``out`` (``.npy``, ``.pt`` or ``.csv``), checked before any work is done; with
    ``paths``, also that ``.npy``'s one-path-a-line ``.paths.txt`` can hold them (no newline in a name)."""
    out = _output_file(out, EMBEDDING_FORMATS, "features")
    odd = next((p for p in paths or () if "\n" in p or "\r" in p), None)
    if odd is not None and out.suffix.lower() == ".npy":
        raise ValueError(
            f"the image path {odd!r} holds a line break, which {out.with_suffix('.paths.txt').name} (one path "
            "a line) cannot hold; write -o with .pt or .csv, or rename the file"
        )
    return out


def embed_images(
    run: Run,
    images: str | os.PathLike,
    *,
    layer: str | None = None,
    batch_size: int = 256,
    progress: bool | None = None,
) -> tuple[Tensor, list[str]]:
    """(N, D) float32 features of images (a folder or a file list) from a run's backbone, and their paths.

    Images are decoded ``batch_size`` at a time (never all at once), fitted to the run's input size and
    normalised like its training set. A file that cannot be read is left out of both (one warning names
    the files at the end); the paths are absolute (:func:`list_images`). ``layer`` picks an intermediate layer (``run.model.feature_layers``)
    instead of the pooled output. ``progress``: a bar over the images; None shows it on a terminal only.
    """
    if layer is not None and layer not in run.model.feature_layers:
        raise ValueError(f"--layer {layer!r} is not a layer of {run.arch}; choose {run.model.feature_layers}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    listed = list_images(images)
    chunks, paths, failed = [], [], []
    with tqdm(
        total=len(listed), desc="embed", unit="img", disable=None if progress is None else not progress
    ) as bar:
        for start in range(0, len(listed), batch_size):
            batch = listed[start : start + batch_size]
            x, read, unread = read_images(batch, run.image_size, channels=run.channels)
            paths += read
            failed += unread
            if read:
                found = extract(
                    run.model, x, transform=run.transform, batch_size=batch_size, layer=layer, heads=False
                )
                chunks.append(found.features)  # (B, D)
            bar.update(len(batch))
    if not paths:
        raise _none_read(failed)
    report_unreadable(failed, strict=False)
    return torch.cat(chunks), paths  # (N, D)


def write_embedding(out: str | os.PathLike, features: Tensor, paths: list[str]) -> list[Path]:
    """Write (N, D) features with their N image paths in the format of ``out``'s suffix (module docstring).

    Returns the files written (for ``.npy``: the array and ``<stem>.paths.txt``).
    """
    out = check_embedding_path(out, paths)
    if features.ndim != 2 or features.shape[0] != len(paths):
        raise ValueError(f"need (N, D) features for {len(paths)} paths, got {tuple(features.shape)}")
    x = features.detach().float().cpu().contiguous()  # (N, D)
    suffix = out.suffix.lower()
    if suffix == ".pt":
        record = {"features": x, "paths": list(paths)}
        return [atomic_write(out, lambda tmp: torch.save(record, tmp))]
    if suffix == ".npy":
        array = x.numpy()
        listing = out.with_suffix(".paths.txt")

        def save_array(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would append .npy to tmp's name
                np.save(f, array, allow_pickle=False)

        text = "".join(
            f"{p}\n" for p in paths
        )  # both written, then both renamed: never one without the other
        return atomic_write_all(
            {out: save_array, listing: lambda tmp: tmp.write_text(text, errors="surrogateescape")}
        )

    def save_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="", errors="surrogateescape") as f:
            writer = csv.writer(f)
            writer.writerow(["path", *(f"f{d}" for d in range(x.shape[1]))])
            for path, row in zip(paths, x.tolist(), strict=True):
                writer.writerow([path, *(f"{v:.9g}" for v in row)])  # 9 digits round-trip float32

    return [atomic_write(out, save_csv)]


def export_backbone(run: Run, out: str | os.PathLike, *, extra: dict | None = None) -> tuple[Path, Path]:
    """Write a run's backbone for use without sela, and a JSON file next to it that says how.

    ``out`` ``.pt``/``.pth`` receives :func:`sela.models.export.backbone_payload`: a ResNet's plain state
    dict with torchvision's keys, else ``{"spec", "state_dict"}``. ``out`` ``.onnx`` receives the ONNX graph
    of :func:`sela.models.export.export_onnx` (normalised images in, (B, D) features out, dynamic batch),
    checked against the model with onnxruntime. ``<stem>.json`` records the spec, the feature width D, the
    preprocessing (side, pixel scale, mean, std) and the lines that load the file (for ONNX also the input
    and output names and shapes, and the check's largest difference); ``extra`` is merged into it. Returns
    both paths.
    """
    out = _output_file(out, WEIGHT_FORMATS, "weights")
    if out.suffix.lower() == ".onnx":
        return _export_onnx(run, out, extra)
    model, spec = run.model, backbone_spec(run.model)
    payload = backbone_payload(model)
    recipe = torchvision_recipe(spec, str(out)) if isinstance(model, ResNet) else None
    layout = "torchvision" if recipe else "sela"
    if timm_recipe(spec, str(out)):
        recipe, layout = timm_recipe(spec, str(out)), "timm"
    info = {
        "arch": run.arch,
        "layout": layout,
        "spec": spec,
        "feature_dim": model.feature_dim,
        "load": recipe or ["import sela.models", f"m = sela.models.load_exported({str(out)!r})"],
        "preprocess": _preprocess(run),
        "source": str(run.source),
        **(extra or {}),
    }
    weights = atomic_write(out, lambda tmp: torch.save(payload, tmp))
    return weights, write_json(info_path(out), info)


def _preprocess(run: Run) -> dict:
    """How an image becomes the backbone's input: the JSON's ``preprocess``."""
    mean, std = run.mean, run.std
    return {
        "image_size": run.image_size,
        "channels": run.channels,
        "resize": "shorter side to image_size (bilinear, antialiased), then a central square crop",
        "scale": "pixel / 255, then (x - mean) / std per channel",
        "mean": None if mean is None else list(mean),
        "std": None if std is None else list(std),
        **({"gray": "0.299 R + 0.587 G + 0.114 B, rounded"} if run.channels == 1 else {}),
    }


def _export_onnx(run: Run, out: Path, extra: dict | None) -> tuple[Path, Path]:
    """The ONNX export of :func:`export_backbone`: the graph, checked by onnxruntime on random normalised
    images (another batch size than the traced one), and its JSON."""
    check_onnx_packages()
    c, side, d = run.channels, run.image_size, run.model.feature_dim
    graph = atomic_write(out, lambda tmp: export_onnx(run.model, tmp, channels=c, side=side))
    x = torch.randn(3, c, side, side, generator=torch.Generator().manual_seed(0))  # (B, C, S, S)
    difference = onnx_difference(graph, run.model, x)
    if not difference < 1e-3:
        graph.unlink()
        raise ValueError(
            f"the ONNX graph of {run.arch} differs from the model by {difference:.3g}; use -o *.pt"
        )
    info = {
        "arch": run.arch,
        "layout": "onnx",
        "spec": backbone_spec(run.model),
        "feature_dim": d,
        "input": {"name": ONNX_INPUT, "shape": ["batch", c, side, side], "dtype": "float32"},
        "output": {"name": ONNX_OUTPUT, "shape": ["batch", d], "dtype": "float32"},
        "opset": ONNX_OPSET,
        "max_abs_difference": difference,
        "load": [
            "import onnxruntime",
            f"s = onnxruntime.InferenceSession({str(out)!r})",
            f"features = s.run(None, {{{ONNX_INPUT!r}: x}})[0]  # x: (B, {c}, {side}, {side}) float32, preprocessed",
        ],
        "preprocess": _preprocess(run),
        "source": str(run.source),
        **(extra or {}),
    }
    return graph, write_json(info_path(out), info)
