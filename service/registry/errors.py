"""Registry errors: each message names the offending model, version, alias or file."""

from __future__ import annotations


class RegistryError(ValueError):
    """Base class for model-registry problems."""


class RegistryLookupError(RegistryError, LookupError):
    """Unknown registered model, version or alias; the message lists what does exist."""


class EncoderSpecError(RegistryError):
    """The encoder's metadata (input size, normalisation, architecture) is missing or invalid."""
