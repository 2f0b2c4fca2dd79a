"""The one exception type of the data layer."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A data file or data set is missing, corrupt, malformed or unusable.

    The message always names the file (or split) concerned and, where possible, says how to fix it.
    It subclasses `ValueError` so that callers catching bad input in general also catch it.
    """
