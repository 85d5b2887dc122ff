"""``ImageSet``: a dataset as uint8 images in memory (or a streaming ``Dataset``), with its statistics.

Letters: N images, C channels, H x W pixels, B batch. Ground-truth ``targets`` are only for
evaluation; training sees images and their indices. Every item is ``(image uint8 (C, H, W), index)``.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler


@dataclass(eq=False, repr=False)
class ImageSet(Dataset):
    """Images of one split of a dataset, in memory or streamed from disk.

    Attributes:
        images: (N, C, H, W) uint8, or None when the set is streamed (see ``stream``).
        targets: (N,) int64 class ids for evaluation, or None when unlabelled (-1 marks an
            unlabelled image inside a partly labelled set, e.g. STL-10's ``train+unlabeled``).
        classes: class names, ``classes[targets[i]]`` is the name of image i; None if unlabelled.
        paths: source file of each image (folder datasets), else None.
        name: the dataset's name, e.g. ``"cifar10"``.
        mean, std: per-channel statistics in [0, 1] units, for normalisation (length C).
        stream: a ``Dataset`` yielding ``(uint8 (C, H, W), index)`` when ``images`` is None.
        skipped: files of the source that were left out as unreadable, "PATH (reason)" each (folder
            datasets; a streamed set lists those found at listing time). Not part of the N images; a
            caller that knows a run directory writes them down there.
    """

    images: Tensor | None
    targets: Tensor | None = None
    classes: list[str] | None = None
    paths: list[str] | None = None
    name: str = ""
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    stream: Dataset | None = None
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images is None:
            if self.stream is None:
                raise ValueError("an ImageSet needs images (N, C, H, W) uint8 or a stream Dataset")
        elif self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"ImageSet.images must be uint8 (N, C, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}; convert with (x * 255).round().clamp(0, 255).to(torch.uint8)"
            )
        n = len(self)
        if self.targets is not None:
            self.targets = torch.as_tensor(self.targets, dtype=torch.int64)
            if self.targets.shape != (n,):
                raise ValueError(f"targets must have shape ({n},), got {tuple(self.targets.shape)}")
        if self.paths is not None and len(self.paths) != n:
            raise ValueError(f"paths must have {n} entries, got {len(self.paths)}")
        if self.images is not None and (self.mean is None or self.std is None):
            mean, std = channel_stats(self.images)
            self.mean = self.mean or mean
            self.std = self.std or std
        if self.mean is None or self.std is None:
            raise ValueError("a streamed ImageSet needs mean and std; e.g. the ImageNet values")
        self.mean, self.std = tuple(map(float, self.mean)), tuple(map(float, self.std))

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.stream)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """One image (C, H, W) uint8 and its index."""
        if self.images is None:
            return self.stream[index]
        return self.images[index], index

    def __repr__(self) -> str:
        where = f"images={tuple(self.images.shape)}" if self.images is not None else "streamed"
        classes = f", {len(self.classes)} classes" if self.classes else ""
        return f"ImageSet(name={self.name!r}, n={len(self)}, {where}{classes})"

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    @property
    def channels(self) -> int:
        """C: the images' channels (a streamed set decodes to RGB, 3)."""
        return int(self.images.shape[1]) if self.images is not None else 3

    def side(self, image_size: int | None = None) -> int:
        """The side (px) a model sees: ``image_size`` if given, else the images' own (in memory) or 224
        (streamed images, which are resized on the fly)."""
        if image_size:
            return int(image_size)
        return int(self.images.shape[-1]) if self.images is not None else 224

    def source(self) -> Tensor | Dataset:
        """What feature extraction reads: the uint8 images in memory, else the set itself."""
        return self.images if self.images is not None else self

    @property
    def n_classes(self) -> int | None:
        """Number of classes, or None if unlabelled."""
        if self.classes is not None:
            return len(self.classes)
        if self.targets is not None and (self.targets >= 0).any():
            return int(self.targets.max()) + 1
        return None


@torch.no_grad()
def channel_stats(images: Tensor, chunk: int | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units of (N, C, H, W) uint8 images.

    Counted as a 256-bin histogram per channel (exact integers, then float64): about 15x faster than
    summing float64 copies. ``chunk``: images per step (default: 4 M pixels' worth, about 50 MB of scratch).
    """
    c = images.shape[1]
    chunk = chunk or max(1, 2**22 // max(1, images.shape[2] * images.shape[3]))
    counts = torch.zeros(c, 256, dtype=torch.int64)  # (C, 256)
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk].transpose(0, 1).reshape(c, -1)  # (C, B*H*W) uint8
        for ch in range(c):
            counts[ch] += torch.bincount(part[ch], minlength=256)
    values = torch.arange(256, dtype=torch.float64) / 255  # (256,) a pixel value in [0, 1]
    n = counts.sum(1).to(torch.float64).clamp_min(1)  # (C,)
    mean = counts.to(torch.float64) @ values / n  # (C,)
    var = (counts.to(torch.float64) * (values[None] - mean[:, None]).square()).sum(1) / n  # (C,)
    return tuple(mean.tolist()), tuple(var.clamp_min(1e-12).sqrt().tolist())


def make_loader(
    imageset: ImageSet,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    sampler: Sampler | Sequence[int] | None = None,
    *,
    drop_last: bool = False,
    pin_memory: bool = False,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """A ``DataLoader`` over ``imageset`` giving batches ``(uint8 (B, C, H, W), int64 (B,) indices)``.

    Meant for streamed sets; for in-memory sets, indexing ``imageset.images`` on the device is
    faster. ``sampler`` and ``shuffle`` are exclusive.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if sampler is not None and shuffle:
        raise ValueError("pass either shuffle=True or a sampler, not both")
    return DataLoader(
        imageset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        generator=generator,
        persistent_workers=num_workers > 0,
    )
