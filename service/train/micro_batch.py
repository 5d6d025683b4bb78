"""``train.micro_batch_size`` (cached-gradient steps, :mod:`service.train.gradcache`): the rule,
checked on the driver by pre-flight and resolved once when a worker builds its training state."""

from __future__ import annotations

from service.config import Config


class GradCacheError(ValueError):
    """The configured loss or micro-batch size cannot run as an exact cached-gradient step."""


def gradcache_problems(config: Config) -> list[str]:
    """Why ``train.micro_batch_size`` cannot run with this config (empty: it can, or it is off)."""
    m = config.train.micro_batch_size
    if m is None:
        return []
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        return [f"train.micro_batch_size must be a positive integer or null, got {m!r}"]
    return []


def resolve_micro_batch(config: Config) -> int | None:
    """``train.micro_batch_size`` checked (once, when the training state is built), or None.

    >>> resolve_micro_batch(Config()) is None
    True
    """
    problems = gradcache_problems(config)
    if problems:
        raise GradCacheError("; ".join(problems))
    return config.train.micro_batch_size
