"""Dataset registry: ``register_dataset`` names a loader and records what sela needs to know about it.

Each dataset is registered once, next to its loader (``sela.data.datasets`` registers the built-in ones),
with its splits, its per-channel statistics, the side (px) sela resizes it to by default, and whether its
files are downloaded. ``load_dataset`` dispatches through it; ``list_datasets``, ``dataset_info`` and
``SPLITS`` read it. A new dataset is one decorated loader.

Two kinds of loader (``DatasetInfo.streams``):
  * in memory (the default): ``loader(root: str, split: str, download: bool) -> ImageSet`` at the
    native size; ``root`` is already resolved (``data_root(name, root)``) and ``load_dataset`` resizes;
  * streamable (folders): ``loader(root, split, *, image_size, in_memory, strict, cache) -> ImageSet``
    with ``root`` as the caller gave it (None when unset); the loader fits the images itself.
"""

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from sela.data.imageset import ImageSet

DatasetLoader = Callable[..., ImageSet]
Stats = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass(frozen=True)
class DatasetInfo:
    """What sela knows about one registered dataset.

    Attributes:
        name: the name ``load_dataset`` takes.
        splits: the split names ``load_dataset`` accepts, the training split (``"train"``) first.
        loader: reads one split (see the module docstring for its signature).
        stats: (mean, std) per channel of the train split in [0, 1] units, used for every split; None
            when the loader computes them from the data.
        default_image_size: the side (px) ``sela train`` and the inspection commands resize the images to
            when no size is given; None keeps the native size. ``load_dataset`` itself never applies it.
        downloads: the files are downloaded when missing (``download=True``).
        streams: the loader takes ``image_size``, ``in_memory``, ``strict`` and ``cache`` (folders).
        recipe: the ``sela.recipes`` recipe that ``sela train --recipe auto`` takes for this dataset
            (the embedded digits: its demo's); None: chosen from the images and the device.
    """

    name: str
    splits: tuple[str, ...]
    loader: DatasetLoader
    stats: Stats | None = None
    default_image_size: int | None = None
    downloads: bool = False
    streams: bool = False
    recipe: str | None = None


_DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(
    name: str,
    *,
    splits: tuple[str, ...],
    stats: Stats | None = None,
    default_image_size: int | None = None,
    downloads: bool = False,
    streams: bool = False,
    recipe: str | None = None,
) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator that registers ``loader`` under ``name`` with the fields of :class:`DatasetInfo`."""

    def decorator(loader: DatasetLoader) -> DatasetLoader:
        if name in _DATASETS:
            raise ValueError(f"a dataset named {name!r} is already registered; pick another name")
        if not splits or isinstance(splits, str):
            raise ValueError(f"{name}: splits must be a tuple of split names, e.g. ('train', 'test')")
        _DATASETS[name] = DatasetInfo(
            name, tuple(splits), loader, stats, default_image_size, downloads, streams, recipe
        )
        return loader

    return decorator


def unregister_dataset(name: str) -> DatasetInfo:
    """Remove ``name`` from the registry (e.g. a dataset a test registered) and return its record."""
    return _DATASETS.pop(dataset_info(name).name)


def list_datasets() -> list[str]:
    """Names accepted by ``load_dataset``, in the order they were registered."""
    return list(_DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    """The record of dataset ``name``; ``ValueError`` naming the choices for an unknown name."""
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(_DATASETS)}")
    return _DATASETS[name]


class _Splits(Mapping):
    """``SPLITS[name]``: the splits of every registered dataset, read from the registry when asked."""

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return _DATASETS[name].splits

    def __iter__(self) -> Iterator[str]:
        return iter(list(_DATASETS))

    def __len__(self) -> int:
        return len(_DATASETS)

    def __repr__(self) -> str:
        return repr(dict(self))


SPLITS: Mapping[str, tuple[str, ...]] = _Splits()
