"""Errors raised by ``sela.data``."""


class DatasetNotFoundError(FileNotFoundError, ValueError):
    """The dataset's files are not where they should be (and could not be downloaded).

    A ``FileNotFoundError`` and a ``ValueError``, so either ``except`` catches it.
    """
