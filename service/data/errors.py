"""The one error type of the data layer.

A ``DataError`` is a ``ValueError`` so callers (and the CLI) can treat every "your data is wrong"
problem alike; the message always names the offending path, file, column or row.
"""

from __future__ import annotations


class DataError(ValueError):
    """Input data is missing, malformed or too corrupt to use; the message says which and where."""


class TooManyBadImagesError(DataError):
    """More undecodable images than ``data.max_bad_fraction`` allows."""


class CorruptImageError(DataError):
    """One image's bytes could not be decoded (readers skip and count these)."""
