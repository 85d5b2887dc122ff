"""sela: self-labelling via simultaneous clustering and representation learning (SeLa).

Asano, Rupprecht, Vedaldi, "Self-labelling via simultaneous clustering and representation
learning", ICLR 2020.

The package is layered (bottom to top): ``sela.sinkhorn``, ``sela.models``, ``sela.data`` and
``sela.distributed`` at the bottom; ``sela.labeller``, ``sela.eval`` and ``sela.config`` in the
middle; ``sela.train`` above them and ``sela.cli`` on top. Top-level names are imported lazily so
that importing a bottom module never loads the layers above it.
"""

__version__ = "0.1.0"

_LAZY = {
    "assign": ("sela.sinkhorn", "assign"),
    "Assignment": ("sela.sinkhorn", "Assignment"),
    "SelfLabeller": ("sela.labeller", "SelfLabeller"),
    "create_model": ("sela.models", "create_model"),
    "list_models": ("sela.models", "list_models"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'sela' has no attribute {name!r}")
