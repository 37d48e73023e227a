"""The telemetry handed to policies: plain dicts built from recent snapshots.

Policies must not depend on wire types, so snapshots become plain JSON-like data here, in
the shape documented in :mod:`mlsysops.telemetry` (public API for policy authors).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from mlsysops.wire import Sample, Telemetry


def telemetry_view(snapshots: Sequence[Telemetry], history: int) -> dict[str, Any]:
    """``{"latest", "history", "collected_at", "errors"}`` from snapshots of any sources."""
    ordered = sorted(snapshots, key=lambda t: t.collected_at)
    newest = _newest_per_source(ordered)
    latest: dict[str, list[dict[str, Any]]] = {}
    errors: dict[str, str] = {}
    for telemetry in newest:
        _group(telemetry.samples, latest)
        errors.update((e.query, e.message) for e in telemetry.errors)
    kept = ordered[-history:] if history > 0 else []
    return {
        "latest": latest,
        "history": [_snapshot(t) for t in kept],
        "collected_at": ordered[-1].collected_at if ordered else None,
        "errors": errors,
    }


def _newest_per_source(ordered: Sequence[Telemetry]) -> list[Telemetry]:
    """The newest snapshot of each source, by source name (a stable merge order)."""
    newest: dict[str, Telemetry] = {}
    for telemetry in ordered:
        newest[telemetry.source] = telemetry
    return [newest[name] for name in sorted(newest)]


def _snapshot(telemetry: Telemetry) -> dict[str, Any]:
    metrics: dict[str, list[dict[str, Any]]] = {}
    _group(telemetry.samples, metrics)
    return {"collected_at": telemetry.collected_at, "source": telemetry.source, "metrics": metrics}


def _group(samples: Iterable[Sample], into: dict[str, list[dict[str, Any]]]) -> None:
    for sample in samples:
        into.setdefault(sample.metric, []).append(
            {"value": sample.value, "labels": dict(sample.labels), "ts": sample.ts}
        )
