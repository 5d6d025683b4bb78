"""Errors of the search package."""

from __future__ import annotations


class SearchInputError(ValueError):
    """What the user gave cannot work (no embeddings, a dim that does not match, a text query
    for an index whose vectors are not in a text-comparable space): exit code 2."""

    bad_input = True
