"""Weights and settings of the default strategies, checked once, merged in layers.

A strategy receives its options as a plain dict (from the policy context: deployment
defaults, then per-application overrides). :func:`merge` layers such dicts; the
``from_options`` constructors refuse unknown keys and non-numeric values with a message
that names the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from mlsysops.errors import BadInput
from mlsysops.intervals import parse_duration


class StrategyError(ValueError):
    """Bad strategy options or a strategy that cannot be found or loaded."""


def merge(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Later layers win; nested dicts are merged key by key (recursively)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if isinstance(value, Mapping) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            elif isinstance(value, Mapping):
                out[key] = merge(value)
            else:
                out[key] = value
    return out


T = TypeVar("T")


def configuration(context: Mapping[str, Any], overridable: tuple[str, ...]) -> dict[str, Any]:
    """A policy's deployment settings (its context keys) with the application's overrides."""
    base = {key: context.get(key) for key in overridable}
    return merge(base, context.get("overrides") or {})


def apply_overrides(context: dict[str, Any], params: Any, overridable: tuple[str, ...],
                    check: Callable[[dict[str, Any]], object]) -> str | None:
    """Keep trigger ``params`` as the application's overrides in ``context``.

    ``{"reset": true}`` drops earlier overrides. The merged configuration is passed to
    ``check`` (which raises :class:`StrategyError`) before anything is kept, so a bad
    name, weight or interval never sticks. Returns the refusal message, or None.
    """
    params = params if isinstance(params, dict) else {}
    if params.get("reset"):
        context["overrides"] = {}
    unknown = sorted(set(params) - set(overridable) - {"reset"})
    if unknown:
        return (f"trigger params: unknown key(s) {', '.join(unknown)} "
                f"(known: {', '.join(overridable)}, reset)")
    overrides = merge(context.get("overrides") or {},
                      {k: v for k, v in params.items() if k != "reset"})
    try:
        check(configuration({**context, "overrides": overrides}, overridable))
    except StrategyError as exc:
        return f"trigger params refused: {exc}"
    context["overrides"] = overrides
    return None


def _number(where: str, value: Any, *, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise StrategyError(f"{where} must be a number, got {value!r}")
    if not low <= value <= high:
        raise StrategyError(f"{where} must be between {low:g} and {high:g}, got {value!r}")
    return float(value)


def duration(value: Any, what: str = "duration") -> float:
    """Seconds in ``"500ms"``, ``"10s"``, ``"5m"``... or a number; :class:`StrategyError`
    naming ``what`` otherwise."""
    return _duration(what, value)


def _duration(where: str, value: Any) -> float:
    try:
        return parse_duration(value, what=where)
    except BadInput as exc:
        raise StrategyError(exc.message) from None


def _build(cls: type[T], where: str, options: Mapping[str, Any] | None,
           bounds: Mapping[str, tuple[float, float]], durations: tuple[str, ...] = ()) -> T:
    options = dict(options or {})
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise StrategyError(f"{where}: unknown option(s) {', '.join(unknown)} "
                            f"(known: {', '.join(names)})")
    values: dict[str, Any] = {}
    for key, value in options.items():
        if key in durations:
            values[key] = _duration(f"{where}.{key}", value)
        else:
            low, high = bounds.get(key, (0.0, math.inf))
            values[key] = _number(f"{where}.{key}", value, low=low, high=high)
    return cls(**values)


@dataclass(frozen=True)
class PlacementWeights:
    """Weights of the placement objective (all >= 0) and the utilisation ceiling.

    Units: ``move`` per service moved away from where it runs; ``energy`` per facility
    watt (IT power times PUE); ``carbon`` per gram of CO2 per hour; ``renewable`` per
    facility watt not covered by renewable sources; ``preferred_bonus`` is the fraction
    taken off the energy terms on targets marked ``preferred``; ``max_utilisation`` is the
    fraction of each target's free CPU and memory the placement may fill.
    """

    move: float = 10.0
    energy: float = 1.0
    carbon: float = 1.0
    renewable: float = 0.5
    preferred_bonus: float = 0.1
    max_utilisation: float = 1.0
    time_limit: float = 5.0  # seconds the solver may take
    mip_rel_gap: float = 1e-2  # relative optimality gap accepted

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> PlacementWeights:
        return _build(cls, "weights", options, {
            "preferred_bonus": (0.0, 0.99), "max_utilisation": (0.01, 1.0),
            "time_limit": (0.001, 3600.0), "mip_rel_gap": (0.0, 1.0)})

    @property
    def energy_aware(self) -> bool:
        return self.energy > 0 or self.carbon > 0 or self.renewable > 0


@dataclass(frozen=True)
class ScalingWeights:
    """Weights of the scaling objective, and the stabilisation window (seconds).

    Units: ``utilisation`` per replica of capacity above the rate; ``change`` per replica
    added or removed; ``unmet`` per replica-worth of rate left unserved (when capacity or
    ``max_replicas`` runs out). Scale-down happens when ``utilisation > change`` and the
    lower need has lasted ``stabilisation_window`` seconds.
    """

    utilisation: float = 1.0
    change: float = 0.25
    unmet: float = 1000.0
    stabilisation_window: float = 60.0
    time_limit: float = 2.0

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> ScalingWeights:
        return _build(cls, "weights", options, {"time_limit": (0.001, 3600.0)},
                      durations=("stabilisation_window",))


@dataclass(frozen=True)
class ForecastOptions:
    """Short-horizon forecast: a linear trend fitted over ``window`` seconds of rates,
    read ``horizon`` seconds ahead, plus ``margin`` standard deviations of its residuals."""

    horizon: float = 30.0
    window: float = 120.0
    margin: float = 1.0
    min_points: float = 4

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> ForecastOptions:
        return _build(cls, "forecast", options, {"margin": (0.0, 10.0),
                                                  "min_points": (2.0, 10000.0)},
                      durations=("horizon", "window"))
