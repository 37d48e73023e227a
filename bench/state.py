"""Figure 6: what one policy call costs in arguments, and the largest status message.

A mechanism reports every application (Fluidity: two components each, one instance per
component). What is measured, at N applications:

- per analyze call, the time to build the arguments an application's policy receives
  (its description, the system description, the mechanisms with its part of the
  status, the telemetry), as the State builds them (``StateView``: frozen values shared
  between calls, the application's part only);
- the baseline, in the same run: the way before (one deep copy of the whole status and
  of the description per call, and the whole status as one message);
- the memory one call allocates (tracemalloc peak), both ways;
- the largest message stored: one application's part and the status without its
  applications, against the whole status as one message.

No NATS is involved: the State's caches are filled directly with what the executor
stores, so the figures are the State's own cost.
"""

from __future__ import annotations

import statistics
import time
import tracemalloc
import types
from collections.abc import Callable
from typing import Any

from mlsysops import settings as settings_mod
from mlsysops import wire
from mlsysops.state import StateView, _decode_desc, _decode_piece, _decode_status, piece_key

LIMIT_BYTES = 256 * 1024


def fleet_status(apps: int) -> dict[str, Any]:
    """A Fluidity-shaped status of ``apps`` applications, two components each."""
    return {"namespace": "default", "applications": {
        f"app{i}": {f"c{c}": [{"host": f"node-{i % 50}", "deployment": f"app{i}-c{c}",
                               "replicas": 1, "ready_replicas": 1, "ready": True}]
                    for c in range(2)}
        for i in range(apps)}}


def _state(apps: int, status: dict[str, Any]) -> StateView:
    bus = types.SimpleNamespace(settings=settings_mod.Settings())
    state = StateView(bus, telemetry=False)  # type: ignore[arg-type]
    spec = {"name": "app0", "components": [
        {"metadata": {"name": f"c{c}"}, "containers": [{"image": "registry.local/demo:1"}]}
        for c in range(2)]}
    for i in range(apps):
        stored = wire.StoredDescription(kind="app", name=f"app{i}", spec={**spec,
                                        "name": f"app{i}"}, accepted_at=0.0)
        state.descs.apply(f"app.app{i}", i + 1, _decode_desc(wire.encode(stored)))
    rest = {k: v for k, v in status.items() if k != "applications"}
    summary = wire.MechanismStatus(mechanism="fluidity", state=rest, options={"nodes": []},
                                   pieces=True)
    state.mechs.apply("mech.fluidity", 1, _decode_status(wire.encode(summary)))
    for app, part in status["applications"].items():
        piece = wire.MechanismPiece(mechanism="fluidity", app=app, state=part)
        state.pieces.apply(piece_key("fluidity", app), 1, _decode_piece(wire.encode(piece)))
    return state


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _per_call(build: Callable[[str], Any], apps: int, loops: int) -> tuple[float, float]:
    """(median ms per call, tracemalloc peak KiB of one call)."""
    names = [f"app{i * 7919 % apps}" for i in range(loops)]
    build(names[0])  # warm the caches
    times = []
    for name in names:
        started = time.perf_counter()
        build(name)
        times.append(time.perf_counter() - started)
    tracemalloc.start()
    build(names[-1])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return statistics.median(times) * 1000, peak / 1024


def measure_one(apps: int, loops: int) -> dict[str, Any]:
    status = fleet_status(apps)
    state = _state(apps, status)
    options = {"nodes": []}

    def new(app: str) -> Any:
        return (state.app_description(app), state.system_description(),
                state.mechanisms(app), state.telemetry())

    def old(app: str) -> Any:  # the baseline: copies of the whole status per call
        stored = state.descs.value(f"app.{app}")
        return ([{"name": app, "spec": _copy(stored.spec if stored else {})}],
                _copy(state.system_description()),
                {"fluidity": {"state": _copy(status), "options": _copy(options)}},
                state.telemetry())

    new_ms, new_kib = _per_call(new, apps, loops)
    old_ms, old_kib = _per_call(old, apps, max(3, loops // 20))
    pieces = [len(wire.encode(wire.MechanismPiece(mechanism="fluidity", app=a, state=p)))
              for a, p in status["applications"].items()]
    summary = len(wire.encode(wire.MechanismStatus(
        mechanism="fluidity", state={"namespace": "default"}, pieces=True)))
    whole = len(wire.encode(wire.MechanismStatus(mechanism="fluidity", state=status)))
    return {"apps": apps, "new_ms": new_ms, "old_ms": old_ms, "ratio": new_ms / old_ms,
            "new_kib": new_kib, "old_kib": old_kib, "largest_piece": max(pieces),
            "summary_bytes": summary, "whole_bytes": whole,
            "under_limit": max(max(pieces), summary) <= LIMIT_BYTES}


def measure(sizes: list[int], loops: int) -> list[dict[str, Any]]:
    return [measure_one(apps, loops) for apps in sizes]
