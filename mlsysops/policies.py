"""What the framework reads from a policy: its settings, and checks of what it returns.

A policy's ``initialize()`` returns its initial context. The framework honours these keys
(everything else belongs to the policy): ``configuration.analyze_interval``, ``scope``
(``application`` or ``global``), ``core``, ``mechanisms``, ``packages`` and
``telemetry``. :func:`policy_settings` turns them into a :class:`PolicySettings` or a
clear load error; :func:`interval_of` reads the interval from a live context;
:func:`check_context` and :func:`check_plan` check what analyze and plan hand back.

Mechanism names of upstream policies (:data:`MECHANISM_ALIASES`) are resolved here: in a
plan's keys by :func:`check_plan`, and in the ``mechanisms`` argument of a policy that
declared one by :func:`mechanisms_argument` (see docs/upstream.md).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import re
from dataclasses import dataclass, field
from typing import Any

from mlsysops.errors import BadInput, PluginError
from mlsysops.intervals import parse_duration

DEFAULT_INTERVAL = 10.0
MIN_INTERVAL = 0.1
# Names policies written for upstream use for mechanisms that have another name here:
# seed policies declare "fluidity_proxy" and plan for "fluidity" (the same mechanism);
# upstream's CPU-frequency policy plans for "CPUFrequencyConfigurator" (cpu_freq here).
# A plan's command for an alias goes to the mechanism (check_plan), and a policy that
# declared an alias finds that mechanism's status under it too (mechanisms_argument).
MECHANISM_ALIASES = {"fluidity_proxy": "fluidity", "CPUFrequencyConfigurator": "cpu_freq"}


@dataclass(frozen=True)
class PolicySettings:
    interval: float = DEFAULT_INTERVAL
    scope: str = "application"
    core: bool = False
    mechanisms: tuple[str, ...] = ()
    on_telemetry: bool = False
    # the declared mechanisms that are aliases, as (alias, mechanism) pairs
    aliases: tuple[tuple[str, str], ...] = field(default=(), compare=False)


def policy_settings(name: str, context: Any) -> PolicySettings:
    """Read and check the framework keys of an initial context."""
    if not isinstance(context, dict):
        raise PluginError(name, f"initialize() must return a dict, not {type(context).__name__}")
    check_context(name, context, what="initialize()")
    config = context.get("configuration") or {}
    if not isinstance(config, dict):
        raise PluginError(name, "context key 'configuration' must be a dict")
    try:
        interval = _parse_interval(config.get("analyze_interval", DEFAULT_INTERVAL))
    except Exception as exc:
        raise PluginError(name, str(exc)) from None
    scope = context.get("scope", "application")
    if scope not in ("application", "global"):
        raise PluginError(
            name, f"context key 'scope' must be 'application' or 'global', not {scope!r}")
    mechanisms = context.get("mechanisms") or []
    if not isinstance(mechanisms, list) or not all(isinstance(m, str) for m in mechanisms):
        raise PluginError(name, "context key 'mechanisms' must be a list of mechanism names")
    _check_packages(name, context.get("packages") or [])
    names: list[str] = mechanisms
    return PolicySettings(
        interval=interval,
        scope=scope,
        core=_flag(name, "core", context.get("core", False)),
        mechanisms=tuple(MECHANISM_ALIASES.get(m, m) for m in names),
        aliases=tuple((m, MECHANISM_ALIASES[m]) for m in names if m in MECHANISM_ALIASES),
        on_telemetry=_flag(name, "configuration.analyze_on_telemetry",
                           config.get("analyze_on_telemetry", False)),
    )


def _parse_interval(value: Any) -> float:
    """Seconds in an ``analyze_interval`` value, or :class:`BadInput` saying why not."""
    return parse_duration(value, what="configuration.analyze_interval", minimum=MIN_INTERVAL)


def interval_of(context: Any, default: float) -> float:
    """The ``configuration.analyze_interval`` of a live context, else ``default``.

    Upstream policies change their interval by editing this key in the context that
    analyze returns; it is parsed as :func:`policy_settings` parses it, and a missing or
    invalid value leaves ``default`` (the interval in force) unchanged.
    """
    config = context.get("configuration") if isinstance(context, dict) else None
    if not isinstance(config, dict) or "analyze_interval" not in config:
        return default
    try:
        return _parse_interval(config["analyze_interval"])
    except BadInput:
        return default


def _check_packages(name: str, packages: Any) -> None:
    if not isinstance(packages, list) or not all(isinstance(p, str) for p in packages):
        raise PluginError(name, "context key 'packages' must be a list of package names")
    for package in packages:
        if not _installed(package):
            raise PluginError(
                name, f"needs package {package!r}, which is not installed (packages are never "
                "installed at run time: add it to the image or virtualenv)"
            )


# The project name at the start of a requirement ("PyYAML>=6", "requests[socks]", "a.b").
_REQUIREMENT = re.compile(r"\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)")


def _installed(requirement: str) -> bool:
    """Whether ``requirement``'s package is installed (its version is not checked).

    A package is named as pip names it, which is often not its module ("PyYAML" installs
    ``yaml``, "nats-py" installs ``nats``): the installed distributions are asked first,
    then, for a bare module name, the import system.
    """
    m = _REQUIREMENT.match(requirement)
    if m is None:
        return False
    project = m.group(1)
    try:
        importlib.metadata.distribution(project)
        return True
    except (importlib.metadata.PackageNotFoundError, ValueError):
        pass
    try:  # find_spec("a.b") imports "a", and raises if it is missing
        return importlib.util.find_spec(project.replace("-", "_")) is not None
    except (ImportError, ValueError):
        return False


def _flag(name: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise PluginError(name, f"context key {key!r} must be true or false, not {value!r}")
    return value


def check_context(name: str, context: Any, *, what: str) -> dict[str, Any]:
    """The context if it is plain JSON data, else a :class:`PluginError` naming the key."""
    if not isinstance(context, dict):
        raise PluginError(name, f"{what} must return a dict context, not {type(context).__name__}")
    bad = _first_non_json(context, "context")
    if bad:
        raise PluginError(name, f"{what} returned a context that is not plain data: {bad}")
    return context


def mechanisms_argument(mechanisms: dict[str, Any], settings: PolicySettings) -> dict[str, Any]:
    """The ``mechanisms`` a policy receives: also under each alias it declared.

    A policy that declared ``CPUFrequencyConfigurator`` finds ``cpu_freq``'s status under
    both names (the same object). Without aliases, ``mechanisms`` itself is returned.
    """
    if not settings.aliases:
        return mechanisms
    out = dict(mechanisms)
    for alias, mechanism in settings.aliases:
        if mechanism in mechanisms and alias not in mechanisms:
            out[alias] = mechanisms[mechanism]
    return out


def check_plan(name: str, plan: Any) -> dict[str, Any]:
    """The plan if it is ``{mechanism: command}`` of plain data, aliases resolved.

    A command keyed by an alias (``CPUFrequencyConfigurator``) is keyed by its mechanism
    (``cpu_freq``) in the plan returned; naming one mechanism twice is an error.
    """
    if plan is None:
        return {}
    if not isinstance(plan, dict):
        raise PluginError(name, f"plan() must return a dict {{mechanism: command}}, not "
                                f"{type(plan).__name__}")
    for key in plan:
        if not isinstance(key, str) or not key:
            raise PluginError(
                name, f"plan() returned a mechanism name {key!r} that is not a non-empty string")
    bad = _first_non_json(plan, "plan")
    if bad:
        raise PluginError(name, f"plan() returned a plan that is not plain data: {bad}")
    return _resolve_aliases(name, plan)


def _resolve_aliases(name: str, plan: dict[str, Any]) -> dict[str, Any]:
    if not any(key in MECHANISM_ALIASES for key in plan):
        return plan
    out: dict[str, Any] = {}
    for key, command in plan.items():
        mechanism = MECHANISM_ALIASES.get(key, key)
        if mechanism in out:
            raise PluginError(
                name, f"plan() has two commands for mechanism {mechanism!r} (one under the "
                      f"alias {key if key != mechanism else _alias_of(plan, mechanism)!r})")
        out[mechanism] = command
    return out


def _alias_of(plan: dict[str, Any], mechanism: str) -> str:
    return next(k for k in plan if MECHANISM_ALIASES.get(k) == mechanism)


def check_result(name: str, what: str, result: Any) -> tuple[Any, Any]:
    """Unpack the ``(value, context)`` pair analyze and plan must return."""
    if not isinstance(result, tuple | list) or len(result) != 2:
        raise PluginError(name, f"{what}() must return a pair (result, context), got "
                                f"{type(result).__name__}")
    return result[0], result[1]


def _first_non_json(value: Any, path: str, depth: int = 0) -> str | None:
    if depth > 64:
        return f"{path} is nested more than 64 levels deep"
    if value is None or isinstance(value, bool | int | str):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} is {value!r}, not a finite number"
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path} has a key {key!r} that is not a string"
            found = _first_non_json(item, f"{path}.{key}", depth + 1)
            if found:
                return found
        return None
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _first_non_json(item, f"{path}[{i}]", depth + 1)
            if found:
                return found
        return None
    return f"{path} is a {type(value).__name__}"
