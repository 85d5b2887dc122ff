"""Open a trained model for inspection: a ``sela train`` run, a sela checkpoint, or a foreign checkpoint.

Accepted sources (:func:`load_run`):
  * a run directory written by ``sela train --out DIR`` (it holds ``checkpoint.pt``);
  * a sela checkpoint file (``checkpoint.pt``; it carries its own configuration and model spec);
  * a plain state dict, e.g. torchvision ResNet weights (heads, if any, are read from ``fc``);
  * a released SeLa checkpoint ``{"state_dict": ..., "labels": ...}``.
For the last two the architecture and the dataset are not recorded and must be given. Every file is
loaded with ``weights_only=True`` (:func:`sela.rundir.load_file`): one that holds other objects is refused.

Letters: N training images, H heads, K_h clusters.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sela import rundir
from sela.config import data_settings, legacy_model_spec, recorded_arch, upgrade
from sela.data import SPLITS, EvalTransform, ImageSet, dataset_info, load_dataset
from sela.data.errors import DatasetNotFoundError
from sela.eval.features import extract
from sela.models import SelaModel, check_arch, create_model, load_pretrained, spec_from_state_dict


@dataclass
class Run:
    """A model ready for evaluation, with the data it was (or is to be) evaluated on.

    Attributes:
        model: the network in eval mode on its device.
        labels: (H, N) int64 self-labels of ``train_set`` stored with the model, or None. They follow the
            images as they are now: a run's recorded file list (files.json) realigns them by path when
            files were added (labelled by the model's argmax) or removed (dropped), with a note.
        train_set: the training split (its targets are only used for evaluation); None when it was not
            asked for (``train_split=False``) and the run records what is needed without it.
        test_set: the test (or val) split, or None when the dataset has none.
        transform: the un-augmented evaluation transform (uint8 -> normalised float, ``image_size`` px).
        image_size: the side (px) the model sees: the ``image_size`` asked for, else the run's recorded
            ``eval_size`` (training may have stored larger images; ``train_set`` holds them as stored).
        dataset, arch: names, as ``sela train`` takes them.
        config: the run's resolved configuration, in sections ({} for foreign checkpoints).
        source: the path that was opened; ``run_dir``: the run directory, or None.
        summary: the run's summary.json ({} when absent).
        untrained_heads: heads whose weights were not in the checkpoint (their outputs mean nothing).
        notes: things the caller should tell the user (labels dropped, heads missing, ...).
        channels, mean, std: the images' channels and per-channel statistics (normalisation) as trained.
    """

    model: SelaModel
    labels: Tensor | None
    train_set: ImageSet | None
    test_set: ImageSet | None
    transform: EvalTransform
    image_size: int
    dataset: str
    arch: str
    config: dict = field(default_factory=dict)
    source: Path = Path(".")
    run_dir: Path | None = None
    summary: dict = field(default_factory=dict)
    untrained_heads: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    channels: int = 3
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def trained_heads(self) -> list[int]:
        return [h for h in range(len(self.model.n_clusters)) if h not in self.untrained_heads]


def _as_label_matrix(labels: Any) -> Tensor | None:
    """Released / sela labels as (H, N) int64, or None when they are not integer label arrays."""
    if labels is None:
        return None
    t = torch.as_tensor(np.asarray(labels)) if not isinstance(labels, Tensor) else labels
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.ndim not in (1, 2):
        return None
    return (t[None] if t.ndim == 1 else t).long()


def load_split(
    dataset: str,
    data_dir: str | None,
    split: str,
    size: int | None,
    *,
    strict: bool = False,
    progress: bool | None = None,
) -> ImageSet:
    """``load_dataset`` with its not-found message in the command line's words (``--data-dir``, not the
    API's ``root=``); ``progress``: a folder's decode bar (None: on a terminal)."""
    try:
        return load_dataset(dataset, data_dir, split, image_size=size, strict=strict, progress=progress)
    except DatasetNotFoundError as e:
        text = re.sub(r"\b(check|pass) root=", r"\1 --data-dir", str(e).strip().splitlines()[0])
        raise DatasetNotFoundError(text.replace("download=True", "a --data-dir that holds them")) from None


def load_test_split(
    dataset: str, data_dir: str | None, size: int | None, *, strict: bool = False, progress: bool | None = None
) -> ImageSet | None:
    """The dataset's test (or val) split, or None when it has none."""
    for split in ("test", "val"):
        if split in SPLITS.get(dataset, ()):
            try:
                return load_split(dataset, data_dir, split, size, strict=strict, progress=progress)
            except FileNotFoundError:
                continue
    return None


def _recorded_config(ckpt: dict, run_dir: Path | None) -> dict:
    """A sela checkpoint's configuration, in today's sections (:func:`sela.config.upgrade`): the one it
    carries, else its run directory's config.json."""
    return upgrade(ckpt.get("config") or (rundir.read_json(run_dir / rundir.CONFIG) if run_dir else {}))


def _stored_labels(
    ckpt: Any, n_heads: int, train_set: ImageSet, notes: list[str], match: rundir.FileMatch | str | None
) -> Tensor | None:
    """The (H, N) self-labels stored with the model for the images as they are now, or None (with a note
    when they do not fit). ``match``: the run's recorded file list against the images now; labels of
    files added since are -1 here (:func:`_label_new_files` fills them); a str: the note of a run
    without a file list (:func:`_file_match`), given when its labels fit."""
    labels = _as_label_matrix(ckpt.get("labels")) if isinstance(ckpt, dict) else None
    if labels is None:
        return None
    unknown, match = (match, None) if isinstance(match, str) else (None, match)
    if match is not None and match.rows is not None and match.n_then == labels.shape[1] and not match.same:
        rows = match.rows  # (N_now,): the recorded index of each image now, -1 for a new file
        labels = torch.where(rows[None] >= 0, labels[:, rows.clamp_min(0)], -1)  # (H, N_now)
        notes.append(
            f"the training images changed since the run was trained ({match.describe()}): its labels are "
            f"realigned by path; {int((rows < 0).sum())} new file(s) get the model's argmax, removed ones are dropped"
        )
    if tuple(labels.shape) != (n_heads, len(train_set)):
        notes.append(
            f"the checkpoint's labels {tuple(labels.shape)} do not match {n_heads} heads x "
            f"{len(train_set)} {train_set.name or 'training'} images; they are not evaluated"
        )
        return None
    if unknown:
        notes.append(unknown)
    if match is not None and match.modified:
        notes.append(f"{len(match.modified)} training file(s) changed since the run was trained (e.g. "
                     f"{match.modified[0]}); each keeps its label")  # fmt: skip
    return labels


def _file_match(
    run_dir: Path | None, train_set: ImageSet, data_dir: str | None
) -> rundir.FileMatch | str | None:
    """The run's recorded file list matched to the images now; None without a run directory; for a run
    of files without a file list (sela before files.json), the note to give when its labels are used."""
    if run_dir is None:
        return None
    recorded = rundir.read_file_list(run_dir)
    if recorded is None:
        return None if train_set.paths is None else (
            f"{run_dir} records no file list (a run of sela before {rundir.FILES}): its labels are matched "
            "to the images by position, checked by their number only"
        )  # fmt: skip
    return rundir.match_files(recorded, rundir.FileList.of(train_set.paths, len(train_set), data_dir))


@torch.no_grad()
def _label_new_files(
    model: SelaModel, train_set: ImageSet, transform: EvalTransform, labels: Tensor, chunk: int = 256
) -> Tensor:
    """``labels`` (H, N) with the columns of new files (-1) set to each head's argmax on those images."""
    new = (labels[0] < 0).nonzero().flatten()  # (M,)
    for start in range(0, len(new), chunk):
        rows = new[start : start + chunk]
        if train_set.in_memory:
            x = train_set.images[rows]  # (B, C, H, W) uint8
        else:
            x = torch.stack([train_set[int(i)][0] for i in rows])
        logits = extract(model, x, transform=transform, batch_size=chunk, progress=False).logits
        for h, lg in enumerate(logits):
            labels[h, rows] = lg.argmax(dim=1).cpu()
    return labels


def _check_source_flags(path: Path, sela: bool, config: dict, arch: str | None, dataset: str | None) -> None:
    """A sela run records its architecture (a different --arch is an error); a foreign one needs both."""
    if sela and arch is not None and arch != recorded_arch(config):
        raise ValueError(f"{path} was trained as {recorded_arch(config)!r}; drop --arch {arch}")
    if not sela and (arch is None or dataset is None):
        raise ValueError(
            f"{path} is not a sela run, so give its architecture and data: --arch NAME --dataset NAME"
        )


def _train_split(dataset: str, data_dir: str | None, size: int | None) -> ImageSet:
    train_set = load_split(dataset, data_dir, "train", size)
    if len(train_set) == 0:
        raise ValueError(f"the {dataset} training split is empty; check --data-dir")
    return train_set


def _locate(source: str | os.PathLike) -> tuple[Path, Path | None]:
    """The checkpoint file of ``source`` and its run directory (None for a file outside one)."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a run directory or a checkpoint file")
    if path.is_dir():
        if not (path / rundir.CHECKPOINT).is_file():
            raise ValueError(
                f"{path} holds no {rundir.CHECKPOINT}; pass a run directory of `sela train --out DIR`"
            )
        return path / rundir.CHECKPOINT, path
    if path.name == rundir.CHECKPOINT and (path.parent / rundir.CONFIG).is_file():
        return path, path.parent
    return path, None


def _sela_model(ckpt: dict, config: dict, channels: int, side: int, path: Path) -> SelaModel:
    """A sela checkpoint's network, rebuilt from its spec (format 1: from its config) with its weights."""
    spec = ckpt.get("model_spec") or legacy_model_spec(config, channels, side)
    model = create_model(**spec)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit the network it records: {str(e).splitlines()[0]}") from None
    return model


def _foreign_model(
    ckpt: Any, arch: str, clusters: list[int] | None, side: int
) -> tuple[SelaModel, list[int]]:
    """A foreign checkpoint's network (heads and widths as its tensors have them) and its untrained heads."""
    check_arch(arch)
    model = create_model(**spec_from_state_dict(arch, ckpt, n_clusters=clusters, input_size=side))
    skipped = load_pretrained(model, ckpt)
    return model, sorted({int(name.split(".")[1]) for name in skipped})


def load_run(
    source: str | os.PathLike,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    image_size: int | None = None,
    arch: str | None = None,
    clusters: list[int] | None = None,
    device: torch.device | str = "cpu",
    test_split: bool = True,
    train_split: bool = True,
) -> Run:
    """Open ``source`` (see the module docstring) with the data it is to be evaluated on.

    Args:
        source: a run directory, a sela checkpoint, a state dict file or a released SeLa checkpoint.
        dataset, data_dir, image_size: the data; for a sela run they default to the run's own and
            override it when given. ``image_size`` is the side (px) the model sees; when neither it nor
            the run sets one, the dataset's registered default (``dataset_info(name).default_image_size``).
        arch: the architecture; required for foreign checkpoints, must match for sela runs.
        clusters: K per head for foreign checkpoints without heads (default: the heads found in the
            checkpoint; with none, one placeholder head that is reported as untrained).
        device: where the model runs. test_split: also load the test (or val) split, if any.
        train_split: False: a run that records its images' statistics (config.json's ``_data``) opens
            without its training folder, ``train_set`` and ``labels`` None (export, embed, labels --images).

    Raises ValueError (FileNotFoundError for missing paths) with a message that names the fix.
    """
    path, run_dir = _locate(source)
    ckpt = rundir.load_file(path)
    sela = rundir.checkpoint_format(ckpt) is not None
    config = _recorded_config(ckpt, run_dir) if sela else {}
    _check_source_flags(path, sela, config, arch, dataset)
    recorded = data_settings(config)
    arch = recorded_arch(config) or arch
    dataset = dataset or recorded["dataset"]
    data_dir = data_dir if data_dir is not None else recorded["data_dir"]
    size = image_size or recorded["image_size"] or dataset_info(dataset).default_image_size
    facts = None if train_split or not sela else _recorded_images(run_dir)
    train_set, (channels, mean, std, side) = _images(facts, dataset, data_dir, size)
    if sela:
        model, untrained = _sela_model(ckpt, config, channels, side, path), []
    else:
        model, untrained = _foreign_model(ckpt, arch, clusters, side)
    notes = [f"heads {untrained} are not in the checkpoint; their cluster metrics are skipped"] * bool(
        untrained
    )
    model = model.to(device).eval()
    shown = side if image_size else recorded["eval_size"] or side  # what the run's evaluation saw
    transform = EvalTransform(shown, mean=mean, std=std).to(device)
    sample = train_set if train_set is not None else torch.zeros((2, channels, side, side), dtype=torch.uint8)
    check_fits(model, sample, transform, arch=arch, image_size=shown)
    labels = _labels_now(ckpt, model, train_set, transform, notes, run_dir if sela else None, data_dir)
    test_set = load_test_split(dataset, data_dir, size) if test_split else None
    return Run(
        model=model, labels=labels, train_set=train_set, test_set=test_set, transform=transform,
        image_size=shown, dataset=dataset, arch=arch, config=config, source=Path(source), run_dir=run_dir,
        summary=rundir.read_json(run_dir / rundir.SUMMARY) if run_dir else {}, untrained_heads=untrained,
        notes=notes, channels=channels, mean=mean, std=std,
    )  # fmt: skip


def _labels_now(
    ckpt: Any, model: SelaModel, train_set: ImageSet | None, transform: EvalTransform, notes: list[str],
    run_dir: Path | None, data_dir: str | None,
) -> Tensor | None:  # fmt: skip
    """The stored labels of the training images as they are now (:func:`_stored_labels`), new files
    labelled by the model's argmax; None without a training split."""
    if train_set is None:
        return None
    labels = _stored_labels(
        ckpt, len(model.n_clusters), train_set, notes, _file_match(run_dir, train_set, data_dir)
    )
    if labels is not None and bool((labels < 0).any()):
        labels = _label_new_files(model, train_set, transform, labels)
    return labels


def _images(facts: tuple | None, dataset: str, data_dir: str | None, size: int | None):
    """The training split (None when ``facts``, the recorded ones, stand in for it) and the images'
    (channels, mean, std, side)."""
    if facts is not None:
        return None, (*facts[:3], int(size or facts[3]))
    train_set = _train_split(dataset, data_dir, size)
    return train_set, (train_set.channels, train_set.mean, train_set.std, train_set.side(size))


def _recorded_images(run_dir: Path | None) -> tuple[int, tuple, tuple, int] | None:
    """(channels, mean, std, side) of the training images as config.json records them (sela runs since
    files.json), or None."""
    images = rundir.read_json(run_dir / rundir.CONFIG).get("_data") if run_dir else None
    if not isinstance(images, dict) or not all(k in images for k in ("channels", "mean", "std", "side")):
        return None
    return int(images["channels"]), tuple(images["mean"]), tuple(images["std"]), int(images["side"])


@torch.no_grad()
def check_fits(
    model: nn.Module, images: ImageSet | Tensor, transform: EvalTransform, *, arch: str, image_size: int
) -> None:
    """Run two images (of ``images``, or the uint8 batch ``images``) through the model; a ValueError says
    what to change when they do not fit."""
    if isinstance(images, Tensor):
        sample = images  # (n, C, S, S) uint8
    else:
        n = min(2, len(images))
        sample = images.images[:n] if images.in_memory else torch.stack([images[i][0] for i in range(n)])
    c = int(sample.shape[1])
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and first.in_channels != c:
        raise ValueError(
            f"the images have {c} channels but {arch} takes {first.in_channels}; use weights trained on "
            f"{c}-channel images or a dataset with {first.in_channels}-channel images"
        )
    x = transform(sample.to(next(model.parameters()).device))
    try:
        model.forward_features(x)
    except RuntimeError as e:
        raise ValueError(
            f"{c}x{image_size}x{image_size} images do not fit {arch} ({str(e).strip().splitlines()[0]}); "
            f"pass --image-size {getattr(model, 'default_input_size', image_size)}"
        ) from None
