"""The sweep's search space: parsed from ``config.tune.space``, validated, turned into Tune domains.

``tune.space`` maps a dotted Config key to a distribution::

    loss.temperature: {type: loguniform, low: 0.05, high: 1.0}
    augment.strength: {type: uniform, low: 0.25, high: 1.5}
    augment.min_scale: {type: uniform, low: 0.08, high: 0.5}
    train.lr: {type: choice, values: [0.001, 0.002, 0.004]}

Everything that can be checked without Ray is checked here, before any trial starts: the key
exists in ``Config.flat()`` and is not a resource/bookkeeping key, the range is non-empty and not
inverted, and every endpoint (or choice) yields a Config (``Config.with_values``) that passes
every owner's rules — so a trial never dies on a value the sampler was allowed to draw.

    >>> from service.config import Config
    >>> specs = parse_space(Config())
    >>> sorted(specs)
    ['augment.strength', 'loss.temperature']
    >>> specs["loss.temperature"].kind, specs["loss.temperature"].low
    ('loguniform', 0.05)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from service.config import Config, ConfigError

KINDS = ("loguniform", "uniform", "choice")

# Keys a sweep must not vary: the resource math (workers × CPUs/GPUs), ASHA's max_t (epochs),
# the run's length (time budget, max_steps),
# where trials write, and the sweep/tracking settings themselves are fixed for the whole sweep.
RESERVED_KEYS = frozenset(
    {
        "train.num_workers",
        "train.cpus_per_worker",
        "train.use_gpu",
        "train.epochs",
        "train.time_budget_minutes",
        "train.max_steps",
        "train.storage_path",
        "train.run_name",
        "train.max_failures",
    }
)
RESERVED_PREFIXES = ("tune.", "mlflow.", "fault.")


class SearchSpaceError(ConfigError):
    """``tune.space`` is malformed; the message names the key and the offending value."""


@dataclass(frozen=True)
class ParamSpec:
    """One searched Config key and its distribution."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()

    def to_tune(self) -> Any:
        """The matching ``ray.tune`` search domain (Ray is imported only here)."""
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        return tune.choice(list(self.values))

    def probe_values(self) -> list[Any]:
        """Values that bound what the sampler can draw: both endpoints, or every choice."""
        return [self.low, self.high] if self.kind != "choice" else list(self.values)


def _field_type(key: str) -> str:
    """The annotated type of a dotted Config key as a string, e.g. ``"float"``, ``"int | None"``."""
    section, _, name = key.partition(".")
    sub = next(f for f in dataclasses.fields(Config) if f.name == section)
    obj = sub.default_factory()  # type: ignore[misc]
    return str(next(f.type for f in dataclasses.fields(obj) if f.name == name))


def _number(key: str, what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise SearchSpaceError(f"tune.space[{key!r}].{what} must be a number, got {value!r}")
    try:
        number = float(value)  # YAML reads "1e-3" (no dot) as a string
    except ValueError:
        raise SearchSpaceError(
            f"tune.space[{key!r}].{what} must be a number, got {value!r}"
        ) from None
    if not math.isfinite(number):
        raise SearchSpaceError(f"tune.space[{key!r}].{what} must be finite, got {value!r}")
    return number


def parse_param(key: str, spec: Any, known_keys: set[str]) -> ParamSpec:
    """Validate one ``tune.space`` entry's shape (not yet its values against the Config)."""
    if key not in known_keys:
        close = sorted(k for k in known_keys if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1])
        hint = f"; did you mean {close}?" if close else "; keys are dotted Config keys"
        raise SearchSpaceError(
            f"tune.space key {key!r} is not a Config key{hint} (e.g. 'loss.temperature')"
        )
    if key in RESERVED_KEYS or key.startswith(RESERVED_PREFIXES):
        raise SearchSpaceError(
            f"tune.space key {key!r} cannot be searched: it is fixed for the whole sweep "
            f"(resources, epochs / time budget = ASHA's max_t, storage, tune/mlflow/fault settings)"
        )
    if not isinstance(spec, dict):
        raise SearchSpaceError(
            f"tune.space[{key!r}] must be a mapping like {{type: uniform, low: 0.1, high: 1.0}}, "
            f"got {spec!r}"
        )
    kind = spec.get("type")
    if kind not in KINDS:
        raise SearchSpaceError(f"tune.space[{key!r}].type must be one of {KINDS}, got {kind!r}")
    allowed = {"type", "values"} if kind == "choice" else {"type", "low", "high"}
    extra = sorted(set(spec) - allowed)
    if extra:
        raise SearchSpaceError(
            f"tune.space[{key!r}] has unknown field(s) {extra} for type {kind!r}; "
            f"allowed: {sorted(allowed)}"
        )
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise SearchSpaceError(
                f"tune.space[{key!r}].values must be a non-empty list, got {values!r}"
            )
        return ParamSpec(key, kind, values=tuple(values))

    hint = _field_type(key)
    if not hint.startswith("float"):
        raise SearchSpaceError(
            f"tune.space[{key!r}] is a {hint} field; {kind} draws floats. "
            f"Use {{type: choice, values: [...]}} for it"
        )
    for name in ("low", "high"):
        if spec.get(name) is None:
            raise SearchSpaceError(f"tune.space[{key!r}] ({kind}) needs {name!r}")
    low, high = _number(key, "low", spec["low"]), _number(key, "high", spec["high"])
    if low == high:
        raise SearchSpaceError(
            f"tune.space[{key!r}] range is empty (low == high == {low}); widen it, or fix the "
            f"value with --set {key}={low} and drop it from the space"
        )
    if low > high:
        raise SearchSpaceError(
            f"tune.space[{key!r}] range is inverted (low={low} > high={high}); swap them"
        )
    if kind == "loguniform" and low <= 0:
        raise SearchSpaceError(
            f"tune.space[{key!r}] is loguniform, so low must be > 0, got low={low}"
        )
    return ParamSpec(key, kind, low=low, high=high)


def parse_space(config: Config) -> dict[str, ParamSpec]:
    """Validate ``config.tune.space`` against the Config and return its specs, by key.

    Raises ``SearchSpaceError`` (a ``ConfigError``) naming the key and the offending value.
    """
    space = config.tune.space
    if not isinstance(space, dict) or not space:
        raise SearchSpaceError(
            f"tune.space must map at least one Config key to a distribution, got {space!r}"
        )
    known = set(config.flat())
    specs = {key: parse_param(key, spec, known) for key, spec in space.items()}
    problems = []
    for spec in specs.values():
        for value in spec.probe_values():
            rejected = _rejections(config, {spec.key: value})
            problems += [f"tune.space[{spec.key!r}] can draw {value!r}: {p}" for p in rejected]
    if problems:
        raise SearchSpaceError(
            "\n  - ".join(["the search space reaches invalid configs:", *problems])
        )
    return specs


def _rejections(config: Config, values: dict[str, Any]) -> list[str]:
    """What the pre-flight rules of a single run say of ``config`` with ``values`` set."""
    from service.train.preflight import config_problems  # the same rules as a single run

    try:
        return config_problems(config.with_values(values))
    except ConfigError as exc:
        return [str(exc)]


def parse_points(config: Config, specs: dict[str, ParamSpec]) -> list[dict[str, Any]]:
    """Validate ``config.tune.points_to_evaluate``: each point names only searched keys, with
    values the space can hold (inside a range, or one of the choices), and gives a valid Config.
    Raises ``SearchSpaceError`` naming the point and the key."""
    points = config.tune.points_to_evaluate
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise SearchSpaceError(
            f"tune.points_to_evaluate must be a list of mappings (key: value), got {points!r}"
        )
    problems = []
    for i, point in enumerate(points):
        found = len(problems)
        for key, value in point.items():
            spec = specs.get(key)
            if spec is None:
                problems.append(f"point {i}: {key!r} is not searched (tune.space: {sorted(specs)})")
            elif spec.kind == "choice" and value not in spec.values:
                problems.append(f"point {i}: {key}={value!r} is not one of {list(spec.values)}")
            elif spec.kind != "choice" and not (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and spec.low <= value <= spec.high
            ):
                problems.append(
                    f"point {i}: {key}={value!r} is not a number in [{spec.low}, {spec.high}]"
                )
        if len(problems) == found:  # its values fit the space: does the whole config pass?
            problems += [f"point {i}: {p}" for p in _rejections(config, point)]
    if problems:
        raise SearchSpaceError("\n  - ".join(["tune.points_to_evaluate:", *problems]))
    return [dict(p) for p in points]


def to_param_space(specs: dict[str, ParamSpec]) -> dict[str, Any]:
    """Tune ``param_space``: flat dotted keys → domains (trials read them back by the same key)."""
    return {key: spec.to_tune() for key, spec in specs.items()}
