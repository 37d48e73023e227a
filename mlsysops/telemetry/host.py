"""Built-in telemetry of the local host, for a laptop without Prometheus.

A policy written against a Prometheus with the node exporter must run unchanged on a
developer's laptop, so this source serves the node exporter's own metric names, units and
labels (``node_cpu_seconds_total{cpu="0", mode="idle"}`` in seconds, memory in bytes),
plus ``instance`` and ``node`` labels holding the host name where Prometheus would add
``instance``. It answers plain metric names only; anything else (PromQL, unknown names) is
a :class:`~mlsysops.wire.QueryError` that says a Prometheus URL is needed.

On Linux it reads ``/proc`` as the node exporter does (``/proc/stat`` counts in USER_HZ
ticks, ``/proc/meminfo`` in kB); elsewhere it falls back to psutil for the core metrics.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from pathlib import Path

import psutil

from mlsysops.telemetry.source import Queries, SourceUnavailable, query_error
from mlsysops.wire import QueryError, Sample

# /proc/stat cpu columns in order; node exporter reports the first eight as
# node_cpu_seconds_total and guest/guest_nice as node_cpu_guest_seconds_total.
_CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
_GUEST_MODES = ("user", "nice")
_STAT_COUNTERS = {
    "ctxt": "node_context_switches_total",
    "processes": "node_forks_total",
    "intr": "node_intr_total",
    "btime": "node_boot_time_seconds",
    "procs_running": "node_procs_running",
    "procs_blocked": "node_procs_blocked",
}
_PARENS = re.compile(r"\((.*)\)")

Series = dict[str, list[tuple[dict[str, str], float]]]
"""``{metric: [(labels without instance/node, value), ...]}``."""


class HostSource:
    """The local host's node-exporter metrics, read from ``proc`` (default ``/proc``)."""

    def __init__(self, *, hostname: str | None = None, proc: str | Path = "/proc") -> None:
        self.name = "host"
        self.hostname = hostname or socket.gethostname()
        self._proc = Path(proc)
        self._user_hz = _user_hz()

    async def collect(self, queries: Queries) -> tuple[list[Sample], list[QueryError]]:
        series, ts = await asyncio.to_thread(self._read)
        host = {"instance": self.hostname, "node": self.hostname}
        samples: list[Sample] = []
        errors: list[QueryError] = []
        for query in sorted(queries):
            if query not in series:
                errors.append(query_error(query, _not_served(query, series), queries[query]))
                continue
            for labels, value in series[query]:
                samples.append(Sample(metric=query, value=value, labels={**labels, **host}, ts=ts))
        return samples, errors

    def metric_names(self) -> list[str]:
        """Every metric name this host serves now."""
        return sorted(self._read()[0])

    # -- reading -----------------------------------------------------------------------
    def _read(self) -> tuple[Series, float]:
        try:
            if (self._proc / "stat").exists():
                series = self._read_proc()
            else:
                series = _read_psutil()
        except (OSError, ValueError) as exc:
            raise SourceUnavailable(f"cannot read host metrics: {exc}") from exc
        _add_loadavg(series)
        ts = time.time()
        series["node_time_seconds"] = [({}, ts)]
        return series, ts

    def _read_proc(self) -> Series:
        series: Series = {}
        _parse_stat((self._proc / "stat").read_text(), self._user_hz, series)
        _parse_meminfo((self._proc / "meminfo").read_text(), series)
        return series


def _user_hz() -> float:
    try:
        return float(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        return 100.0


def _add_loadavg(series: Series) -> None:
    try:
        load1, load5, load15 = os.getloadavg()
    except OSError:
        return
    series["node_load1"] = [({}, load1)]
    series["node_load5"] = [({}, load5)]
    series["node_load15"] = [({}, load15)]


def _parse_stat(text: str, user_hz: float, series: Series) -> None:
    """``/proc/stat``: per-CPU mode times (ticks -> seconds) and the kernel counters."""
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        key = fields[0]
        if key.startswith("cpu") and key != "cpu":
            _add_cpu(key[3:], [int(v) / user_hz for v in fields[1:]], series)
        elif key in _STAT_COUNTERS and len(fields) > 1:
            series[_STAT_COUNTERS[key]] = [({}, float(fields[1]))]


def _add_cpu(cpu: str, seconds: list[float], series: Series) -> None:
    cpu_series = series.setdefault("node_cpu_seconds_total", [])
    for mode, value in zip(_CPU_MODES, seconds, strict=False):
        cpu_series.append(({"cpu": cpu, "mode": mode}, value))
    guest = seconds[len(_CPU_MODES) :]
    if guest:
        guest_series = series.setdefault("node_cpu_guest_seconds_total", [])
        for mode, value in zip(_GUEST_MODES, guest, strict=False):
            guest_series.append(({"cpu": cpu, "mode": mode}, value))


def _parse_meminfo(text: str, series: Series) -> None:
    """``/proc/meminfo`` as node exporter names it: ``Active(anon): 5 kB`` ->
    ``node_memory_Active_anon_bytes 5120``; fields without a unit keep no suffix."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2 or not parts[0].endswith(":"):
            continue
        key = _PARENS.sub(r"_\1", parts[0][:-1])
        value = float(parts[1])
        if len(parts) == 3:  # "kB"
            series[f"node_memory_{key}_bytes"] = [({}, value * 1024)]
        else:
            series[f"node_memory_{key}"] = [({}, value)]


def _read_psutil() -> Series:
    """The core metrics where there is no ``/proc`` (macOS, BSD), in the same names."""
    series: Series = {}
    for index, times in enumerate(psutil.cpu_times(percpu=True)):
        values = times._asdict()
        _add_cpu(str(index), [values.get(mode, 0.0) for mode in _CPU_MODES], series)
    memory = psutil.virtual_memory()
    series["node_memory_MemTotal_bytes"] = [({}, float(memory.total))]
    series["node_memory_MemAvailable_bytes"] = [({}, float(memory.available))]
    series["node_memory_MemFree_bytes"] = [({}, float(memory.free))]
    series["node_boot_time_seconds"] = [({}, float(psutil.boot_time()))]
    return series


def _not_served(query: str, series: Series) -> str:
    names = sorted(n for n in series if not n.startswith("node_memory_"))
    return (
        f"the built-in host source only serves plain node-exporter metric names: "
        f"{', '.join(names)}, and node_memory_<Field>_bytes for each field of /proc/meminfo "
        f"(e.g. node_memory_MemAvailable_bytes, node_memory_MemTotal_bytes); {query!r} is "
        f"not one of them. PromQL expressions and other metrics need a Prometheus URL "
        f"(--prometheus-url or MLSYSOPS_PROMETHEUS_URL)"
    )
