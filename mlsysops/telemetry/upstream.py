"""The telemetry keys of the upstream MLSysOps agent, for policies written for it.

Upstream policies receive ``telemetry`` as ``{"prometheus_endpoint", "grafana_endpoint",
"dataframe", "query"}``: a pandas DataFrame of recent samples (a ``timestamp`` column
and one column per metric) and a coroutine that filters it. This framework hands policies
its own plain-data view (``latest``, ``history``, ...; see :mod:`mlsysops.telemetry`).
:func:`with_upstream_keys` puts both side by side, so that a policy of either kind runs
unchanged, and so that a policy which never reads the upstream keys pays nothing for
them: pandas is imported, and the DataFrame built, only when ``dataframe`` is read or
``query`` is awaited.

The DataFrame, from the snapshots the service keeps (at most ``--telemetry-history``):

- one row per collection time, oldest first (snapshots of several sources taken at the
  same instant share a row), index ``0..n-1``; ``timestamp`` is that time in Unix seconds;
- one float column per metric name, named as in ``telemetry["latest"]``; a metric absent
  from a row is NaN;
- a metric with several series (several ``instance`` labels, say) gives the value of its
  first sample, as the upstream agent does; ``telemetry["latest"]`` has every series.

``await telemetry["query"](start_time=None, end_time=None, latest=False)`` (upstream's
parameters, in upstream's order) returns the whole DataFrame, the rows with ``start_time
<= timestamp <= end_time`` (either bound may be left out), or with ``latest=True`` one row
holding ``telemetry["latest"]``: the newest snapshot of each source, merged, stamped with
the newest time. With no telemetry yet, ``latest=True`` raises :class:`ValueError`, as
upstream's does.

Within one policy call the DataFrame is built once, from the snapshots as they are when
it is first needed, and every read of ``dataframe`` and every ``query`` of that call (and
of copies of the telemetry argument) sees that same data. Each read hands out a new
DataFrame object; pandas' copy-on-write keeps the one cached for other calls unchanged
whatever the policy does to its own.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from mlsysops import wire

if TYPE_CHECKING:
    import pandas as pd

    from mlsysops.settings import Settings

UPSTREAM_KEYS = ("prometheus_endpoint", "grafana_endpoint", "dataframe", "query")
_CACHE_SIZE = 8  # snapshot sets whose DataFrames are kept (calls begun before the newest)


def with_upstream_keys(view: dict[str, Any], snapshots: Callable[[], Sequence[wire.Telemetry]],
                       settings: Settings) -> UpstreamTelemetry:
    """``view`` (its keys and value objects, not copied) plus the four upstream keys.

    ``snapshots`` is called only if the policy reads ``dataframe`` or awaits ``query``;
    ``view`` is never changed. A key ``view`` already has keeps its value.
    """
    frames = _Frames(snapshots)
    telemetry = UpstreamTelemetry(view, frames)
    for key, value in (("prometheus_endpoint", settings.prometheus_url or None),
                       ("grafana_endpoint", grafana_url(settings)),
                       ("dataframe", _PENDING),
                       ("query", frames.query)):
        dict.setdefault(telemetry, key, value)
    return telemetry


def grafana_url(settings: Settings) -> str | None:
    """``--grafana-url`` (``MLSYSOPS_GRAFANA_URL``); None if unset."""
    return settings.grafana_url or None


class _Pending:
    """Stands in, inside the dict, for a DataFrame not built yet; never handed out."""

    def __repr__(self) -> str:
        return "<DataFrame, built when read>"


_PENDING = _Pending()


class UpstreamTelemetry(dict[str, Any]):
    """A plain dict to its reader, whose ``dataframe`` value is built on first read.

    Every way of reading values (``[]``, ``get``, ``items``, ``values``, ``pop``, copies,
    ``dict(t)``, ``{**t}``, ``t | other``) gives the DataFrame, never the stand-in.
    """

    __slots__ = ("_frames",)

    def __init__(self, view: dict[str, Any], frames: _Frames) -> None:
        super().__init__(view)
        self._frames = frames

    def _resolve(self) -> None:
        if dict.get(self, "dataframe") is _PENDING:
            dict.__setitem__(self, "dataframe", self._frames.dataframe())

    def __getitem__(self, key: str) -> Any:
        value = dict.__getitem__(self, key)
        if value is _PENDING:
            self._resolve()
            value = dict.__getitem__(self, key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def __iter__(self) -> Iterator[str]:
        # Defined so that dict(t), {**t} and f(**t) go through keys() and [] rather than
        # reading the stored values directly (CPython's fast path for plain dicts).
        return dict.__iter__(self)

    def items(self) -> Any:
        self._resolve()
        return dict.items(self)

    def values(self) -> Any:
        self._resolve()
        return dict.values(self)

    def pop(self, key: str, *default: Any) -> Any:
        if key == "dataframe":
            self._resolve()
        return dict.pop(self, key, *default)

    def popitem(self) -> tuple[str, Any]:
        self._resolve()
        return dict.popitem(self)

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key in self:
            return self[key]
        return dict.setdefault(self, key, default)

    def copy(self) -> UpstreamTelemetry:
        out = UpstreamTelemetry({}, self._frames)  # a DataFrame not built yet stays so
        dict.update(out, dict.items(self))
        return out

    __copy__ = copy

    def __deepcopy__(self, memo: dict[int, Any]) -> UpstreamTelemetry:
        out = UpstreamTelemetry({}, self._frames)  # the call's data, built once, is shared
        memo[id(self)] = out
        for key, value in dict.items(self):
            dict.__setitem__(out, key, value if value is _PENDING else copy.deepcopy(value, memo))
        return out

    def __or__(self, other: Any) -> Any:
        if not isinstance(other, dict):
            return NotImplemented
        out = self.copy()
        out.update(other)
        return out

    def __eq__(self, other: object) -> bool:
        self._resolve()
        return dict.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __repr__(self) -> str:
        self._resolve()
        return dict.__repr__(self)


class _Frames:
    """The DataFrame of one policy call: built at most once, from the shared cache."""

    def __init__(self, snapshots: Callable[[], Sequence[wire.Telemetry]]) -> None:
        self._snapshots = snapshots
        self._built: _Built | None = None

    def _get(self) -> _Built:
        if self._built is None:
            self._built = _cached(_take(self._snapshots))
        return self._built

    def dataframe(self) -> pd.DataFrame:
        return self._get().frame.copy(deep=False)

    async def query(self, start_time: float | None = None, end_time: float | None = None,
                    latest: bool = False) -> pd.DataFrame:
        """Upstream's ``query``: everything, a time range, or the latest row."""
        built = self._get()
        if latest:
            if built.latest is None:
                raise ValueError("no telemetry yet: no latest row available")
            return built.latest.copy(deep=False)
        frame = built.frame
        if start_time is None and end_time is None:
            return frame.copy(deep=False)
        keep = frame["timestamp"] >= _bound("start_time", start_time, -math.inf)
        keep &= frame["timestamp"] <= _bound("end_time", end_time, math.inf)
        return frame[keep]

    def __copy__(self) -> _Frames:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _Frames:
        return self  # a deep copy of the telemetry argument shares the call's data


def _bound(name: str, value: Any, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"query({name}=...) must be a time in Unix seconds, not {value!r}")
    return float(value)


def _take(snapshots: Callable[[], Sequence[wire.Telemetry]]) -> tuple[wire.Telemetry, ...]:
    """The snapshots as a tuple (a deque being appended to is read again)."""
    for _ in range(3):
        try:
            return tuple(snapshots())
        except RuntimeError:  # "deque mutated during iteration", from another thread
            continue
    return tuple(snapshots())


class _Built:
    __slots__ = ("frame", "latest")

    def __init__(self, frame: pd.DataFrame, latest: pd.DataFrame | None) -> None:
        self.frame = frame
        self.latest = latest


_cache: dict[tuple[str, ...], _Built] = {}
_cache_lock = threading.Lock()


def _cached(snapshots: tuple[wire.Telemetry, ...]) -> _Built:
    """The DataFrames of these snapshots, built once per distinct set."""
    key = tuple(f"{t.source}\0{t.id}" for t in snapshots)
    with _cache_lock:
        built = _cache.get(key)
    if built is not None:
        return built
    built = _build(snapshots)
    with _cache_lock:
        while len(_cache) >= _CACHE_SIZE:
            del _cache[next(iter(_cache))]
        _cache[key] = built
    return built


def _build(snapshots: Sequence[wire.Telemetry]) -> _Built:
    import pandas as pd

    ordered = sorted(snapshots, key=lambda t: t.collected_at)
    rows: dict[float, dict[str, float]] = {}
    for telemetry in ordered:
        _first_values(telemetry.samples, rows.setdefault(telemetry.collected_at, {}))
    frame = _frame(pd, list(rows), list(rows.values()))
    if not ordered:
        return _Built(frame, None)
    newest: dict[str, wire.Telemetry] = {t.source: t for t in ordered}
    merged: dict[str, float] = {}
    for source in sorted(newest):  # the merge order of telemetry["latest"]
        _first_values(newest[source].samples, merged)
    return _Built(frame, _frame(pd, [ordered[-1].collected_at], [merged]))


def _first_values(samples: Sequence[wire.Sample], into: dict[str, float]) -> None:
    for sample in samples:
        into.setdefault(sample.metric, sample.value)


def _frame(pd: Any, times: list[float], rows: list[dict[str, float]]) -> pd.DataFrame:
    metrics: dict[str, None] = {}
    for row in rows:
        metrics.update(dict.fromkeys(row))
    columns: dict[str, Any] = {"timestamp": pd.Series(times, dtype="float64")}
    for metric in metrics:
        if metric != "timestamp":
            columns[metric] = pd.Series([row.get(metric, math.nan) for row in rows],
                                        dtype="float64")
    return pd.DataFrame(columns)
