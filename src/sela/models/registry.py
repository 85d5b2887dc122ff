"""Model registry: ``register_model`` names a factory, ``create_model`` builds it with its heads.

Every factory has the signature ``factory(n_clusters: list[int], **kwargs) -> SelaModel``; the
registry validates ``n_clusters`` once, here, so factories can trust it.
"""

from collections.abc import Callable, Sequence

from sela.models.base import SelaModel

ModelFactory = Callable[..., SelaModel]

_MODELS: dict[str, ModelFactory] = {}

DEFAULT_N_CLUSTERS: tuple[int, ...] = (128,)


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator that registers ``factory(n_clusters, **kwargs)`` under ``name``."""

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _MODELS:
            raise ValueError(f"a model named {name!r} is already registered; pick another name")
        _MODELS[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)


def _check_n_clusters(n_clusters: Sequence[int] | int) -> list[int]:
    ks = [n_clusters] if isinstance(n_clusters, int) else list(n_clusters)
    if not ks:
        raise ValueError("n_clusters is empty; give at least one head, e.g. n_clusters=[128]")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(f"n_clusters holds {k!r}; every head needs an integer number of clusters >= 2")
    return ks


def create_model(name: str, n_clusters: Sequence[int] | int = DEFAULT_N_CLUSTERS, **kwargs) -> SelaModel:
    """Build the registered model ``name`` with one linear head per entry of ``n_clusters``.

    Args:
        name: a name from ``list_models()``.
        n_clusters: clusters K per head; an int means one head. Every K must be >= 2.
        **kwargs: passed to the model's factory (e.g. ``in_channels``, ``widths``, ``input_size``).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    return _MODELS[name](_check_n_clusters(n_clusters), **kwargs)
