"""Labels and features out of sela: a run's self-labels with confidences, labelling new images, clustering
a feature file, embedding images with a run's backbone, and exporting the backbone's weights.

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
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sela.data import EvalTransform, make_loader
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
    logits = head_outputs(
        run.model,
        run.train_set.source(),
        transform=run.transform,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
    )
    path = write_labels_csv(out, run.labels, paths=run.train_set.paths, confidence=confidences(logits))
    return path, size_histograms(run.labels, list(run.model.n_clusters), path)


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
    if run.untrained_heads:
        raise ValueError(f"heads {run.untrained_heads} of {run.source} are untrained; label with a sela run")
    x, paths, failed = read_images(list_images(images), run.image_size, channels=run.channels)
    if not paths:
        raise _none_read(failed)
    report_unreadable(failed, strict=False)  # (M, C, S, S): the files that were read
    logits = head_outputs(run.model, x, transform=run.transform, batch_size=batch_size, progress=progress)
    labels = assign_labels(logits, balanced=balanced, lam=lam)  # (H, M)
    path = write_labels_csv(out, labels, paths=paths, confidence=confidences(logits))
    return path, size_histograms(labels, list(run.model.n_clusters), path), labels


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
