"""From every policy's telemetry wishes to one set of queries and one period.

Policies come and go at runtime, and each may ask for metrics in its context. The Monitor
collects the union, as often as the most demanding policy asks. A malformed section is the
policy author's mistake: it is returned for reporting against that policy and never stops
the other policies' telemetry (the valid parts of the section are still used).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlsysops.errors import BadInput
from mlsysops.intervals import parse_duration

MIN_INTERVAL = 0.5
"""Shortest ``system_scrape_interval`` accepted, in seconds (no policy can make a hot loop)."""

_EXAMPLE = '{"telemetry": {"metrics": ["node_load1"], "system_scrape_interval": "5s"}}'


def desired_queries(
    contexts: Mapping[str, Mapping[str, Any]],
) -> tuple[dict[str, set[str]], float | None, list[tuple[str, str]]]:
    """``({query: policies asking}, smallest interval asked or None, [(policy, error)])``."""
    queries: dict[str, set[str]] = {}
    intervals: list[float] = []
    problems: list[tuple[str, str]] = []
    for policy in sorted(contexts):
        metrics, interval, errors = _section(contexts[policy])
        for query in metrics:
            queries.setdefault(query, set()).add(policy)
        if interval is not None:
            intervals.append(interval)
        problems.extend((policy, error) for error in errors)
    return queries, min(intervals, default=None), problems


def _section(context: object) -> tuple[list[str], float | None, list[str]]:
    """Metrics, interval and errors of one policy context (missing section: nothing)."""
    if not isinstance(context, Mapping):
        return [], None, []
    section = context.get("telemetry")
    if section is None:
        return [], None, []
    if not isinstance(section, Mapping):
        return [], None, [f"telemetry must be a mapping like {_EXAMPLE}, not {section!r}"]
    metrics, errors = _metrics(section.get("metrics"))
    interval, interval_error = _interval(section.get("system_scrape_interval"))
    if interval_error:
        errors.append(interval_error)
    return metrics, interval, errors


def _metrics(value: object) -> tuple[list[str], list[str]]:
    """The valid query strings of ``telemetry.metrics`` and one error per bad entry."""
    if value is None:
        return [], []
    if not isinstance(value, list | tuple):
        return [], [f"telemetry.metrics must be a list of strings, not {value!r}"]
    good: list[str] = []
    errors: list[str] = []
    for index, item in enumerate(value):
        if isinstance(item, str) and item.strip():
            good.append(item.strip())
        else:
            errors.append(
                f"telemetry.metrics[{index}] must be a non-empty string (a metric name or "
                f"PromQL expression), not {item!r}"
            )
    return good, errors


def _interval(value: object) -> tuple[float | None, str | None]:
    """Seconds of ``telemetry.system_scrape_interval``, or the reason it is invalid."""
    if value is None:
        return None, None
    try:
        return (
            parse_duration(value, what="telemetry.system_scrape_interval", minimum=MIN_INTERVAL),
            None,
        )
    except BadInput as exc:
        return None, exc.message
