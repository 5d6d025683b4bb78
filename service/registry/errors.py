"""Registry errors: each message names the offending model, version, alias or file.

``RegistryInputError`` (and its ``RegistryLookupError``) is the user's request being wrong — an
unknown model, alias or version, class names or a templates file that cannot work, an
image-only model where an image–text one is needed, a non-empty output folder: the command
line says it with exit code 2 (``bad_input``, read by ``service.cli``). Any other
``RegistryError`` is a failure of ours (exit 1).
"""

from __future__ import annotations


class RegistryError(ValueError):
    """Base class for model-registry problems."""


class RegistryInputError(RegistryError):
    """The request names something that does not exist or cannot work; fix the command line."""

    bad_input = True  # service.cli: exit code 2, the message without the class name


class RegistryLookupError(RegistryInputError, LookupError):
    """Unknown registered model, version or alias; the message lists what does exist."""


class EncoderSpecError(RegistryError):
    """The encoder's metadata (input size, normalisation, architecture) is missing or invalid."""
