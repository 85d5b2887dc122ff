"""Labels in and out of sela: CSV export and import, labelling new images, clustering a feature file.

The CSV format (written by :func:`write_labels_csv`, read back by :func:`read_labels_csv`) has one line
per image: its ``path`` (or ``index``), its cluster under each head (``head0`` .. ``head{H-1}``) and,
optionally, each head's confidence (``confidence0`` ..): the largest softmax probability of that head's
logits on the un-augmented image, in 0..1. ``sela train``'s labels.csv is the same format without the
confidence columns.

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

from sela.data import EvalTransform, make_loader
from sela.data.folder import IMAGE_EXTENSIONS, decode_image
from sela.eval.features import extract
from sela.labeller import SelfLabeller, feature_matrix
from sela.runs import Run
from sela.sinkhorn import assign


@dataclass
class LabelTable:
    """The contents of a labels CSV.

    Attributes:
        ids: the first column of each row (a path, or an index as text).
        id_column: ``"path"`` or ``"index"``.
        labels: (H, N) int64 clusters.
        confidence: (H, N) float32 confidences, or None when the file has none.
    """

    ids: list[str]
    id_column: str
    labels: Tensor
    confidence: Tensor | None = None


def write_labels_csv(
    path: str | os.PathLike,
    labels: Tensor,
    *,
    paths: list[str] | None = None,
    confidence: Tensor | None = None,
) -> Path:
    """Write (H, N) labels (and (H, N) confidences) as CSV, one row per image; returns the path."""
    labels = torch.as_tensor(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, N), got shape {tuple(labels.shape)}")
    h, n = labels.shape
    if paths is not None and len(paths) != n:
        raise ValueError(f"{len(paths)} paths for {n} labels; pass one path per image")
    if confidence is not None and tuple(confidence.shape) != (h, n):
        raise ValueError(f"confidence must be (H, N) = ({h}, {n}), got {tuple(confidence.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        header = ["path" if paths is not None else "index"] + [f"head{i}" for i in range(h)]
        if confidence is not None:
            header += [f"confidence{i}" for i in range(h)]
        out.writerow(header)
        cols = labels.t().tolist()  # (N, H)
        conf = confidence.t().tolist() if confidence is not None else None  # (N, H)
        for i, row in enumerate(cols):
            extra = [f"{c:.4f}" for c in conf[i]] if conf is not None else []
            out.writerow([paths[i] if paths is not None else i, *row, *extra])
    return path


def read_labels_csv(path: str | os.PathLike) -> LabelTable:
    """Read a labels CSV written by :func:`write_labels_csv` or ``sela train``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a labels CSV written by `sela labels`")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:1] not in (["path"], ["index"]):
        raise ValueError(f"{path} is not a sela labels CSV (its header must start with path or index)")
    header = rows[0]
    heads = [i for i, name in enumerate(header) if name.startswith("head")]
    confs = [i for i, name in enumerate(header) if name.startswith("confidence")]
    if not heads or (confs and len(confs) != len(heads)):
        raise ValueError(f"{path} has no head0.. columns, or not one confidence column per head")
    body = rows[1:]
    try:
        labels = torch.tensor([[int(r[i]) for r in body] for i in heads], dtype=torch.int64)
        confidence = (
            torch.tensor([[float(r[i]) for r in body] for i in confs], dtype=torch.float32) if confs else None
        )
    except (ValueError, IndexError) as e:
        raise ValueError(f"{path} has a malformed row ({e}); rewrite it with `sela labels`") from None
    return LabelTable([r[0] for r in body], header[0], labels.reshape(len(heads), len(body)), confidence)


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


def confidences(logits: list[Tensor]) -> Tensor:
    """(H, N) largest softmax probability of each head's (N, K_h) logits."""
    return torch.stack([lg.float().softmax(dim=1).amax(dim=1) for lg in logits])


def assign_labels(logits: list[Tensor], *, balanced: bool = False, lam: float = 25.0) -> Tensor:
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
    """Image files to label: every image below a folder (sorted), or the lines of a text file list.

    Relative paths in a list are taken relative to the list's folder; blank lines and lines starting
    with ``#`` are skipped.
    """
    source = Path(source)
    if source.is_dir():
        found = sorted(
            str(p)
            for p in source.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        if not found:
            raise ValueError(f"no images under {source} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        return found
    if not source.is_file():
        raise FileNotFoundError(f"--images {source} does not exist; pass a folder of images or a file list")
    if source.suffix.lower() in IMAGE_EXTENSIONS:
        return [str(source)]
    try:
        lines = source.read_text().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{source} is neither an image nor a text list of image paths") from None
    paths = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line)
            paths.append(str(p if p.is_absolute() else source.parent / p))
    if not paths:
        raise ValueError(f"the file list {source} is empty; put one image path per line")
    return paths


def load_images(paths: list[str], size: int, *, channels: int = 3) -> Tensor:
    """Decode image files into uint8 (N, C, size, size) (shorter side to ``size``, center crop)."""
    images, failed = [], []
    for p in paths:
        try:
            images.append(decode_image(p, (size, size)))  # (S, S, 3)
        except (OSError, ValueError, SyntaxError) as e:
            failed.append(f"{p} ({type(e).__name__})")
    if failed:
        more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
        raise ValueError(f"could not read {len(failed)} image(s): {', '.join(failed[:3])}{more}; remove them")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)
    if channels == 1:
        x = x.float().mul(torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1, keepdim=True)
        x = x.round().clamp(0, 255).to(torch.uint8)  # (N, 1, S, S)
    return x


def load_features(path: str | os.PathLike) -> Tensor:
    """An (N, D) float32 feature matrix from a ``.npy`` file or a ``.pt`` file holding one tensor."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass an (N, D) array saved as .npy or .pt")
    if path.suffix not in (".npy", ".pt", ".pth"):
        raise ValueError(f"{path} must be a .npy or .pt file; save the features with np.save or torch.save")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is an empty file; save an (N, D) array into it")
    try:
        if path.suffix == ".npy":
            x = np.load(path, allow_pickle=False)
        else:
            x = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} is not a readable array ({str(e).strip().splitlines()[0]})") from None
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biuf":
            raise ValueError(f"{path} must hold real numbers, got dtype {x.dtype}")
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise ValueError(f"{path} holds a {type(x).__name__}, not one array; save only the (N, D) tensor")
    return feature_matrix(x, str(path))


def cluster_features(
    features: Tensor,
    *,
    n_clusters: int,
    n_heads: int = 1,
    lam: float = 25.0,
    epochs: int = 200,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor, int]:
    """Self-label (N, D) features with :class:`sela.labeller.SelfLabeller`.

    Returns the (H, N) balanced labels, the (H, N) confidences of each head and the labeller's best head.
    """
    if n_clusters > features.shape[0]:
        raise ValueError(f"--k {n_clusters} exceeds the {features.shape[0]} rows; ask for fewer clusters")
    labeller = SelfLabeller(n_clusters, n_heads=n_heads, lam=lam, epochs=epochs, seed=seed, device=device)
    labeller.fit(features)
    conf = torch.stack(
        [torch.from_numpy(labeller.predict_proba(features, head=h)).amax(dim=1) for h in range(n_heads)]
    )
    return torch.from_numpy(labeller.labels_per_head_), conf, labeller.best_head_


# ------------------------------------------------------------------------------------- run-level commands


def size_histograms(labels: Tensor, n_clusters: list[int], csv_path: str | os.PathLike) -> list[Path]:
    """One cluster-size PNG per head next to a labels CSV: ``<stem>_sizes_head<h>.png``."""
    from sela.report import plot_head_sizes

    csv_path = Path(csv_path)
    return [
        plot_head_sizes(labels[h], k, csv_path.with_name(f"{csv_path.stem}_sizes_head{h}.png"), head=h)
        for h, k in enumerate(n_clusters)
    ]


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
    if run.labels is None:
        raise ValueError(
            f"{run.source} holds no self-labels of these {len(run.train_set)} training images; "
            "pass the run directory of `sela train` with its own data"
        )
    source = run.train_set.images if run.train_set.in_memory else run.train_set
    logits = head_outputs(
        run.model, source, transform=run.transform, batch_size=batch_size, workers=workers, progress=progress
    )
    path = write_labels_csv(out, run.labels, paths=run.train_set.paths, confidence=confidences(logits))
    return path, size_histograms(run.labels, list(run.model.n_clusters), path)


def label_images(
    run: Run,
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    balanced: bool = False,
    lam: float = 25.0,
    batch_size: int = 256,
    progress: bool | None = None,
) -> tuple[Path, list[Path], Tensor]:
    """Label new images (a folder or a file list) with a run's trained heads and write them as CSV.

    Each image is fitted to the run's input size and normalised like its training set. Returns the CSV
    path, the size-histogram PNGs and the (H, M) labels.
    """
    if run.untrained_heads:
        raise ValueError(f"heads {run.untrained_heads} of {run.source} are untrained; label with a sela run")
    paths = list_images(images)
    channels = int(run.train_set.images.shape[1]) if run.train_set.in_memory else 3
    x = load_images(paths, run.image_size, channels=channels)  # (M, C, S, S)
    logits = head_outputs(run.model, x, transform=run.transform, batch_size=batch_size, progress=progress)
    labels = assign_labels(logits, balanced=balanced, lam=lam)  # (H, M)
    path = write_labels_csv(out, labels, paths=paths, confidence=confidences(logits))
    return path, size_histograms(labels, list(run.model.n_clusters), path), labels
