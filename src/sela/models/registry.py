"""Model registry: ``register_model`` names a factory, ``create_model`` builds it with its heads.

``clusters_per_head`` expands the ``clusters`` setting (one K for all heads, or one per head) to K per head.

Every factory has the signature ``factory(n_clusters: list[int], **kwargs) -> SelaModel``; the
registry validates ``n_clusters`` once, here, so factories can trust it. Every model it builds records
how: ``model.spec`` = {"arch": name, "n_clusters": [...], **kwargs}, JSON-ready, so that
``create_model(**model.spec)`` rebuilds the same network (a checkpoint stores the spec). A new
architecture is one decorated factory.
"""

from collections.abc import Callable, Sequence

from sela.models.base import SelaModel

ModelFactory = Callable[..., SelaModel]

_MODELS: dict[str, ModelFactory] = {}

DEFAULT_N_CLUSTERS: tuple[int, ...] = (128,)
TIMM_PREFIX = "timm:"  # ``timm:<name>``: any timm model (sela.models.timm_backbone)


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator that registers ``factory(n_clusters, **kwargs)`` under ``name``."""

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _MODELS:
            raise ValueError(f"a model named {name!r} is already registered; pick another name")
        _MODELS[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted (timm's models, ``timm:<name>``, are not listed)."""
    return sorted(_MODELS)


def check_arch(arch: str) -> str:
    """``arch`` if it names a registered model or a timm model (``timm:<name>``), else a ValueError that says
    what to choose (timm not installed: how to install it)."""
    if arch.startswith(TIMM_PREFIX):
        from sela.models.timm_backbone import check_timm_name

        check_timm_name(arch.removeprefix(TIMM_PREFIX))
    elif arch not in _MODELS:
        raise ValueError(
            f"unknown architecture {arch!r}; choose one of {', '.join(list_models())}, or timm:<name>"
        )
    return arch


def _factory(arch: str) -> ModelFactory:
    if arch.startswith(TIMM_PREFIX):
        from sela.models.timm_backbone import timm_factory

        return timm_factory(arch.removeprefix(TIMM_PREFIX))
    return _MODELS[arch]


def _check_n_clusters(n_clusters: Sequence[int] | int) -> list[int]:
    ks = [n_clusters] if isinstance(n_clusters, int) else list(n_clusters)
    if not ks:
        raise ValueError("n_clusters is empty; give at least one head, e.g. n_clusters=[128]")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(f"n_clusters holds {k!r}; every head needs an integer number of clusters >= 2")
    return ks


def clusters_per_head(clusters: list[int], heads: int) -> list[int]:
    """K for each of ``heads`` heads: one K for all heads (a list of one), or one K per head, as given.

    Raises:
        ValueError: ``heads`` < 1, or ``clusters`` lists neither one value nor one per head.
    """
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be an integer >= 1, got {heads!r}")
    if len(clusters) == 1:
        return list(clusters) * heads
    if len(clusters) != heads:
        raise ValueError(f"clusters lists {len(clusters)} values for {heads} heads; give one or {heads}")
    return list(clusters)


def _plain(value):
    """Tuples as lists, recursively: the JSON form of a keyword argument."""
    return [_plain(v) for v in value] if isinstance(value, list | tuple) else value


def create_model(
    arch: str,
    n_clusters: Sequence[int] | int = DEFAULT_N_CLUSTERS,
    *,
    normalize_heads: bool = False,
    **kwargs,
) -> SelaModel:
    """Build the registered model ``arch`` with one linear head per entry of ``n_clusters``.

    Args:
        arch: a name from ``list_models()``, or ``timm:<name>`` for a timm model (the ``timm`` extra).
        n_clusters: clusters K per head; an int means one head. Every K must be >= 2.
        normalize_heads: cosine heads: L2-normalised head inputs (see ``SelaModel.normalize_heads``),
            unit-norm prototype rows and a zero, frozen bias (the swapped objective's, and the sela
            objective's with a temperature: build with ``normalize_heads=objective.cosine_heads``).
        **kwargs: passed to the model's factory (e.g. ``in_channels``, ``widths``, ``input_size``).

    Raises:
        ValueError: an unknown name, bad ``n_clusters``, or a keyword the architecture does not take.
    """
    check_arch(arch)
    ks = _check_n_clusters(n_clusters)
    try:
        model = _factory(arch)(ks, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        key = str(e).split("unexpected keyword argument")[-1].strip(" '\"")
        raise ValueError(
            f"{arch} does not take the setting {key!r}; drop it or choose another --arch"
        ) from None
    model.normalize_heads = False
    if normalize_heads:
        model._make_cosine_heads()
    model.spec = {"arch": arch, "n_clusters": ks, "normalize_heads": normalize_heads}
    model.spec.update({k: _plain(v) for k, v in kwargs.items()})
    return model
