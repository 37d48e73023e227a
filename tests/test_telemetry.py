"""The telemetry layer: desired queries, sources, the adaptive collector, the policy view.

Unit tests drive the collector with an in-memory source and fake time (nothing sleeps for
real). The tests marked ``slow`` run a real Prometheus and node exporter (fixtures
``prometheus`` and ``node_exporter`` from ``tests/prom_fixtures.py``, imported by
``tests/conftest.py``): skipped locally without the Debian packages, failed in CI.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping, Set
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlsysops.telemetry import (
    Collector,
    HostSource,
    PrometheusSource,
    SourceUnavailable,
    desired_queries,
    telemetry_view,
)
from mlsysops.telemetry.prometheus import api_error
from mlsysops.telemetry.source import query_error
from mlsysops.wire import TELEMETRY, ErrorEvent, QueryError, Sample, Telemetry, encode
from tests.prom_fixtures import Daemon, free_port

pytestmark = pytest.mark.timeout(60)


# =========================================================================== helpers
class FakeTime:
    """Injected clock and sleep: a sleep waits until the test calls :meth:`advance`."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.pending: list[tuple[float, asyncio.Future[None]]] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        entry = (delay, asyncio.get_running_loop().create_future())
        self.pending.append(entry)
        try:
            await entry[1]
        finally:
            self.pending.remove(entry)

    async def sleeping(self) -> float:
        """Wait (in loop turns, not time) until the loop sleeps; the delay it asked."""
        await until(lambda: bool(self.pending), "the collector to sleep")
        return self.pending[0][0]

    async def advance(self) -> float:
        """Let the pending sleep finish, moving the clock by its delay."""
        delay, future = self.pending[0][0], self.pending[0][1]
        self.now += delay
        future.set_result(None)
        await until(lambda: all(f is not future for _, f in self.pending), "the sleep to end")
        return delay


async def until(predicate: Callable[[], bool], what: str, turns: int = 10_000) -> None:
    """Spin the event loop (no real time passes) until ``predicate`` holds."""
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"gave up waiting for {what}")


async def eventually(predicate: Callable[[], bool], what: str, within: float = 10.0) -> None:
    """Wait in real time (for real servers) until ``predicate`` holds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


class FakeSource:
    """In-memory source: one sample per query, scripted failures and query errors."""

    name = "fake"

    def __init__(self) -> None:
        self.asked: list[set[str]] = []
        self.failures: list[Exception] = []
        self.bad: dict[str, str] = {}

    async def collect(
        self, queries: Mapping[str, Set[str]]
    ) -> tuple[list[Sample], list[QueryError]]:
        self.asked.append(set(queries))
        if self.failures:
            raise self.failures.pop(0)
        samples = [Sample(metric=q, value=1.0) for q in sorted(queries) if q not in self.bad]
        errors = [query_error(q, self.bad[q], queries[q]) for q in sorted(queries) if q in self.bad]
        return samples, errors


class Sink:
    """Collects what a collector publishes and reports."""

    def __init__(self) -> None:
        self.published: list[Telemetry] = []
        self.reports: list[ErrorEvent] = []

    async def publish(self, telemetry: Telemetry) -> None:
        self.published.append(telemetry)

    async def report(self, event: ErrorEvent) -> None:
        self.reports.append(event)

    def metrics(self, index: int = -1) -> set[str]:
        return {s.metric for s in self.published[index].samples}


def fake_collector(source: FakeSource, sink: Sink, ft: FakeTime, **kwargs: Any) -> Collector:
    return Collector(
        source,
        sink.publish,
        sink.report,
        clock=ft.clock,
        sleep=ft.sleep,
        wall=lambda: ft.now + 1_700_000_000,
        **kwargs,
    )


@asynccontextmanager
async def running(collector: Collector) -> AsyncIterator[asyncio.Task[None]]:
    """Run the collector's loop for the block; fail if it stopped by itself."""
    task = asyncio.create_task(collector.run())
    try:
        yield task
        await asyncio.sleep(0)
        assert not task.done(), f"collector stopped: {task.exception() if task.done() else ''}"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def policy(*metrics: str, interval: str | None = None) -> dict[str, Any]:
    section: dict[str, Any] = {"metrics": list(metrics)}
    if interval is not None:
        section["system_scrape_interval"] = interval
    return {"telemetry": section}


# =========================================================================== desired_queries
def test_desired_queries_unions_metrics_and_takes_the_smallest_interval() -> None:
    queries, interval, problems = desired_queries(
        {
            "p1": policy("node_load1", "rate(node_cpu_seconds_total[1m])", interval="10s"),
            "p2": policy("node_load1", " node_memory_MemAvailable_bytes ", interval="2s"),
            "p3": policy("node_load5"),  # no interval: the others decide
            "p4": {"other": "context without telemetry"},
            "p5": {"telemetry": None},
        }
    )
    assert queries == {
        "node_load1": {"p1", "p2"},
        "rate(node_cpu_seconds_total[1m])": {"p1"},
        "node_memory_MemAvailable_bytes": {"p2"},
        "node_load5": {"p3"},
    }
    assert interval == 2.0
    assert problems == []
    assert desired_queries({}) == ({}, None, [])
    assert desired_queries({"p": policy("x", interval="1m")})[1] == 60.0


def test_desired_queries_reports_bad_sections_and_keeps_the_valid_parts() -> None:
    queries, interval, problems = desired_queries(
        {
            "bad_interval": policy("node_load1", interval="soon"),
            "too_fast": policy("node_load5", interval="0s"),
            "not_a_list": {"telemetry": {"metrics": "node_load1", "system_scrape_interval": "3s"}},
            "bad_item": policy("node_load15", 42, ""),  # type: ignore[arg-type]
            "not_a_mapping": {"telemetry": ["node_load1"]},
            "good": policy("up", interval="4s"),
        }
    )
    assert queries == {
        "node_load1": {"bad_interval"},
        "node_load5": {"too_fast"},
        "node_load15": {"bad_item"},
        "up": {"good"},
    }
    assert interval == 3.0  # not_a_list's interval is valid and still counts
    by_policy: dict[str, list[str]] = {}
    for name, message in problems:
        by_policy.setdefault(name, []).append(message)
    assert set(by_policy) == {"bad_interval", "too_fast", "not_a_list", "bad_item", "not_a_mapping"}
    assert "'soon' is not a duration" in by_policy["bad_interval"][0]
    assert "shorter than the minimum" in by_policy["too_fast"][0]
    assert "must be a list of strings" in by_policy["not_a_list"][0]
    assert [m.split(" must")[0] for m in by_policy["bad_item"]] == [
        "telemetry.metrics[1]",
        "telemetry.metrics[2]",
    ]
    assert "must be a mapping" in by_policy["not_a_mapping"][0]


# =========================================================================== Collector (fakes)
async def test_update_changes_queries_and_interval_at_once() -> None:
    source, sink, ft = FakeSource(), Sink(), FakeTime()
    collector = fake_collector(source, sink, ft, default_interval=5.0)
    collector.update({"a": {"p1"}}, 30.0)
    async with running(collector):
        assert await ft.sleeping() == 30.0
        assert source.asked == [{"a"}]
        assert sink.metrics() == {"a"}

        # a new policy asks for more, more often: collected now, not in 30 s
        collector.update({"a": {"p1"}, "b": {"p2"}}, 2.0)
        await until(lambda: len(source.asked) == 2, "the second collection")
        assert source.asked[1] == {"a", "b"}
        assert ft.now == 1000.0  # no time passed: the update woke the loop
        assert await ft.sleeping() == 2.0
        assert sink.metrics() == {"a", "b"}

        # p1 goes away: "a" is no longer asked, the interval falls back to the default
        collector.update({"b": {"p2"}}, None)
        await until(lambda: len(source.asked) == 3, "the third collection")
        assert source.asked[2] == {"b"}
        assert await ft.sleeping() == 5.0
        assert collector.status()["queries"] == {"b": ["p2"]}
        assert collector.status()["interval"] == 5.0

        # the same configuration again changes nothing and wakes nobody
        collector.update({"b": {"p2"}}, None)
        await ft.advance()
        await until(lambda: len(source.asked) == 4, "the periodic collection")
        await ft.sleeping()
        assert ft.sleeps == [30.0, 2.0, 5.0, 5.0]
    assert [t.id for t in sink.published] == [
        f"fake-{n}-{int((1000.0 + 1_700_000_000 + dt) * 1000)}"
        for n, dt in ((1, 0), (2, 0), (3, 0), (4, 5))
    ]


async def test_without_queries_nothing_is_collected_until_a_policy_asks() -> None:
    source, sink, ft = FakeSource(), Sink(), FakeTime()
    collector = fake_collector(source, sink, ft, default_interval=5.0)
    async with running(collector):
        assert await ft.sleeping() == 5.0
        await ft.advance()
        assert await ft.sleeping() == 5.0
        assert source.asked == [] and sink.published == []
        collector.update({"a": {"p"}}, None)
        await until(lambda: len(sink.published) == 1, "a collection")
        collector.update({}, None)  # every policy gone: back to idle, no hot loop
        assert await ft.sleeping() == 5.0
        await ft.advance()
        assert await ft.sleeping() == 5.0
        assert len(source.asked) == 1


async def test_outage_is_reported_once_backs_off_and_recovery_is_reported() -> None:
    source, sink, ft = FakeSource(), Sink(), FakeTime()
    collector = fake_collector(source, sink, ft, default_interval=5.0)
    collector.update({"a": {"p"}}, None)
    async with running(collector):
        await ft.sleeping()
        assert collector.status()["state"] == "up"
        source.failures = [SourceUnavailable("connection refused")] * 6
        await ft.advance()  # the next tick meets the outage
        delays = []
        for _ in range(6):
            delays.append(await ft.sleeping())
            status = collector.status()
            assert status["state"] == "down"
            assert status["last_error"] == "connection refused"
            assert status["retry_in"] == delays[-1]
            assert len(sink.reports) == 1  # once per outage, not per retry
            await ft.advance()
        assert delays == [1, 2, 4, 8, 10, 10]  # exponential, capped at 10 s
        assert await ft.sleeping() == 5.0  # back to the normal period
        assert collector.status()["state"] == "up"
        assert collector.status()["retry_in"] is None
    outage, recovery = sink.reports
    assert (outage.kind, outage.name) == ("telemetry", "fake")
    assert outage.message == "fake unavailable: connection refused"
    assert (recovery.kind, recovery.name) == ("telemetry", "fake")
    assert recovery.message == "recovered after 35s"
    assert len(source.asked) == 8 and len(sink.published) == 2


async def test_an_update_during_an_outage_is_used_by_the_next_attempt_at_once() -> None:
    source, sink, ft = FakeSource(), Sink(), FakeTime()
    collector = fake_collector(source, sink, ft)
    source.failures = [RuntimeError("bug in the source"), SourceUnavailable("still down")]
    collector.update({"a": {"p"}}, None)
    async with running(collector):
        assert await ft.sleeping() == 1.0
        collector.update({"b": {"p"}}, None)  # wakes the backoff sleep
        await until(lambda: len(source.asked) == 2, "a retry")
        assert source.asked == [{"a"}, {"b"}]
        assert await ft.sleeping() == 2.0  # the backoff keeps growing
        await ft.advance()
        await until(lambda: len(sink.published) == 1, "a collection")
        assert sink.metrics() == {"b"}
    assert len(sink.reports) == 2  # the outage (an unexpected error counts) and recovery
    assert "RuntimeError: bug in the source" in sink.reports[0].message
    assert "Traceback" in sink.reports[0].traceback


async def test_query_errors_are_reported_to_the_asking_policies_once_per_change() -> None:
    source, sink, ft = FakeSource(), Sink(), FakeTime()
    collector = fake_collector(source, sink, ft)
    source.bad = {"rate(x[": "bad_data: parse error"}
    collector.update({"good": {"p1"}, "rate(x[": {"p2"}}, 1.0)

    async def tick() -> None:
        await ft.sleeping()
        await ft.advance()

    async with running(collector):
        await tick()
        await tick()
        await ft.sleeping()
        assert [(r.kind, r.name) for r in sink.reports] == [("policy", "p2")]
        assert "'rate(x['" in sink.reports[0].message and "parse error" in sink.reports[0].message
        assert sink.reports[0].details == {"source": "fake", "query": "rate(x["}
        assert all(t.errors[0].policies == ["p2"] for t in sink.published)
        assert collector.status()["query_errors"] == {"rate(x[": "bad_data: parse error"}

        collector.update({"good": {"p1"}, "rate(x[": {"p2", "p3"}}, 1.0)  # a new asker
        await until(lambda: len(sink.reports) == 2, "the report to p3")
        assert sink.reports[1].name == "p3"

        source.bad = {"rate(x[": "bad_data: another message"}  # the message changes
        await tick()
        await until(lambda: len(sink.reports) == 4, "reports of the new message")
        assert {r.name for r in sink.reports[2:]} == {"p2", "p3"}

        source.bad = {}  # fixed, then broken again: reported again
        await tick()
        await ft.sleeping()
        assert collector.status()["query_errors"] == {}
        source.bad = {"rate(x[": "bad_data: another message"}
        await tick()
        await until(lambda: len(sink.reports) == 6, "reports of the recurrence")
    assert sink.metrics() == {"good"}


async def test_failing_publish_or_report_never_stops_the_loop() -> None:
    source, ft = FakeSource(), FakeTime()
    reports: list[ErrorEvent] = []
    calls = {"publish": 0}

    async def publish(telemetry: Telemetry) -> None:
        calls["publish"] += 1
        raise ConnectionError("nats down")

    async def report(event: ErrorEvent) -> None:
        reports.append(event)
        raise ConnectionError("nats down")

    collector = Collector(source, publish, report, clock=ft.clock, sleep=ft.sleep)
    collector.update({"a": {"p"}}, 1.0)
    async with running(collector):
        for _ in range(3):
            await ft.sleeping()
            await ft.advance()
        await ft.sleeping()
    assert calls["publish"] == 4
    assert [r.message for r in reports] == [
        "publishing telemetry failed: ConnectionError: nats down"
    ]
    assert len(collector.snapshots()) == 4


async def test_history_keeps_the_last_snapshots_and_the_view_uses_them() -> None:
    source, sink, ft = FakeSource(), Sink(), FakeTime()
    collector = fake_collector(source, sink, ft, history=3)
    collector.update({"a": {"p"}}, 1.0)
    async with running(collector):
        for _ in range(5):
            await ft.sleeping()
            await ft.advance()
        await ft.sleeping()
    assert [t.id for t in collector.snapshots()] == [t.id for t in sink.published[-3:]]
    view = collector.view()
    assert len(view["history"]) == 3
    assert view["collected_at"] == sink.published[-1].collected_at


def test_update_refuses_a_non_positive_interval() -> None:
    collector = Collector(FakeSource(), Sink().publish, Sink().report)
    with pytest.raises(ValueError, match="positive"):
        collector.update({"a": {"p"}}, 0)


# =========================================================================== telemetry_view
def snapshot(
    source: str, at: float, *samples: Sample, errors: list[QueryError] | None = None
) -> Telemetry:
    return Telemetry(
        id=f"{source}-{at}",
        source=source,
        collected_at=at,
        samples=list(samples),
        errors=errors or [],
    )


def test_telemetry_view_shape() -> None:
    cpu0 = {"cpu": "0", "mode": "idle", "instance": "n1"}
    snaps = [
        snapshot("prometheus", 10.0, Sample("node_load1", 0.5, {"instance": "n1"}, 9.5)),
        snapshot("host", 11.0, Sample("node_cpu_seconds_total", 100.0, cpu0, 11.0)),
        snapshot(
            "prometheus",
            12.0,
            Sample("node_load1", 0.7, {"instance": "n1"}, 11.5),
            Sample("node_load1", 0.1, {"instance": "n2"}, 11.5),
            Sample("rate(x[1m])", 2.0, {}, 11.5),
            errors=[QueryError("rate(y[", "bad_data: parse error", ["p"])],
        ),
    ]
    view = telemetry_view(snaps, history=2)
    assert view == {
        "latest": {  # the newest snapshot of each source, merged
            "node_cpu_seconds_total": [{"value": 100.0, "labels": cpu0, "ts": 11.0}],
            "node_load1": [
                {"value": 0.7, "labels": {"instance": "n1"}, "ts": 11.5},
                {"value": 0.1, "labels": {"instance": "n2"}, "ts": 11.5},
            ],
            "rate(x[1m])": [{"value": 2.0, "labels": {}, "ts": 11.5}],
        },
        "history": [
            {
                "collected_at": 11.0,
                "source": "host",
                "metrics": {
                    "node_cpu_seconds_total": [{"value": 100.0, "labels": cpu0, "ts": 11.0}]
                },
            },
            {
                "collected_at": 12.0,
                "source": "prometheus",
                "metrics": {
                    "node_load1": [
                        {"value": 0.7, "labels": {"instance": "n1"}, "ts": 11.5},
                        {"value": 0.1, "labels": {"instance": "n2"}, "ts": 11.5},
                    ],
                    "rate(x[1m])": [{"value": 2.0, "labels": {}, "ts": 11.5}],
                },
            },
        ],
        "collected_at": 12.0,
        "errors": {"rate(y[": "bad_data: parse error"},
    }
    json.dumps(view)  # plain data, safe to hand to any policy
    view["latest"]["node_load1"][0]["labels"]["instance"] = "changed"
    assert snaps[2].samples[0].labels["instance"] == "n1"  # policies get copies
    assert [h["collected_at"] for h in telemetry_view(snaps[::-1], 10)["history"]] == [10, 11, 12]
    assert telemetry_view(snaps, 0)["history"] == []
    assert telemetry_view([], 5) == {
        "latest": {},
        "history": [],
        "collected_at": None,
        "errors": {},
    }


# =========================================================================== HostSource
async def test_host_source_serves_node_exporter_names_with_plausible_values() -> None:
    source = HostSource()
    hostname = socket.gethostname()
    asked = {
        name: {"p"}
        for name in (
            "node_load1",
            "node_load5",
            "node_load15",
            "node_memory_MemAvailable_bytes",
            "node_memory_MemTotal_bytes",
            "node_cpu_seconds_total",
            "node_boot_time_seconds",
        )
    }
    samples, errors = await source.collect(asked)
    assert errors == []
    by_name: dict[str, list[Sample]] = {}
    for s in samples:
        by_name.setdefault(s.metric, []).append(s)
        assert s.labels["instance"] == hostname and s.labels["node"] == hostname
        assert abs(s.ts - time.time()) < 5
    assert set(by_name) == set(asked)
    for load in ("node_load1", "node_load5", "node_load15"):
        assert by_name[load][0].value >= 0 and set(by_name[load][0].labels) == {"instance", "node"}
    total = by_name["node_memory_MemTotal_bytes"][0].value
    available = by_name["node_memory_MemAvailable_bytes"][0].value
    assert total == psutil.virtual_memory().total
    assert 0 < available <= total
    cpu = by_name["node_cpu_seconds_total"]
    assert {s.labels["cpu"] for s in cpu} == {
        str(i) for i in range(len(psutil.cpu_times(percpu=True)))
    }
    assert {s.labels["mode"] for s in cpu} == {
        "user",
        "nice",
        "system",
        "idle",
        "iowait",
        "irq",
        "softirq",
        "steal",
    }
    assert (
        all(s.value >= 0 for s in cpu)
        and sum(s.value for s in cpu if s.labels["mode"] == "idle") > 0
    )
    assert time.time() - 10 * 365 * 86400 < by_name["node_boot_time_seconds"][0].value < time.time()
    encode(Telemetry(id="x", source="host", collected_at=1.0, samples=samples))  # JSON-safe


async def test_host_source_refuses_promql_and_unknown_names_and_says_why() -> None:
    samples, errors = await HostSource().collect(
        {
            "rate(node_cpu_seconds_total[1m])": {"p1"},
            "nvidia_gpu_util": {"p2", "p3"},
            "node_load1": {"p1"},
        }
    )
    assert {s.metric for s in samples} == {"node_load1"}
    assert [(e.query, e.policies) for e in errors] == [
        ("nvidia_gpu_util", ["p2", "p3"]),
        ("rate(node_cpu_seconds_total[1m])", ["p1"]),
    ]
    for error in errors:
        assert "only serves plain node-exporter metric names" in error.message
        assert "node_load1" in error.message and "node_cpu_seconds_total" in error.message
        assert "Prometheus URL" in error.message


async def test_host_source_reads_proc_like_the_node_exporter(tmp_path: Path) -> None:
    hz = os.sysconf("SC_CLK_TCK")
    (tmp_path / "stat").write_text(
        "cpu  300 0 200 1000 0 0 0 0 0 0\n"
        f"cpu0 {hz} 0 {2 * hz} {10 * hz} 5 6 7 8 9 10\n"
        "intr 12345 1 2 3\nctxt 777\nbtime 1700000000\nprocesses 42\n"
        "procs_running 3\nprocs_blocked 1\n"
    )
    (tmp_path / "meminfo").write_text(
        "MemTotal:       1000 kB\nMemAvailable:    600 kB\nActive(anon):     10 kB\n"
        "HugePages_Total:       2\n"
    )
    source = HostSource(hostname="laptop", proc=tmp_path)
    names = source.metric_names()
    samples, errors = await source.collect({name: {"p"} for name in names})
    assert errors == []
    values = {(s.metric, tuple(sorted(s.labels.items()))): s.value for s in samples}
    host = (("instance", "laptop"), ("node", "laptop"))

    def value(metric: str, **labels: str) -> float:
        return values[(metric, tuple(sorted({**labels, **dict(host)}.items())))]

    assert value("node_cpu_seconds_total", cpu="0", mode="user") == 1.0
    assert value("node_cpu_seconds_total", cpu="0", mode="system") == 2.0
    assert value("node_cpu_seconds_total", cpu="0", mode="idle") == 10.0
    assert value("node_cpu_seconds_total", cpu="0", mode="steal") == 8 / hz
    assert value("node_cpu_guest_seconds_total", cpu="0", mode="nice") == 10 / hz
    assert value("node_memory_MemTotal_bytes") == 1000 * 1024
    assert value("node_memory_MemAvailable_bytes") == 600 * 1024
    assert value("node_memory_Active_anon_bytes") == 10 * 1024
    assert value("node_memory_HugePages_Total") == 2
    assert value("node_intr_total") == 12345
    assert value("node_context_switches_total") == 777
    assert value("node_boot_time_seconds") == 1_700_000_000
    assert value("node_forks_total") == 42
    assert value("node_procs_running") == 3 and value("node_procs_blocked") == 1


async def test_host_source_unreadable_proc_is_an_outage(tmp_path: Path) -> None:
    (tmp_path / "stat").write_text("cpu0 1 2 3 4\n")  # no meminfo
    with pytest.raises(SourceUnavailable, match="meminfo"):
        await HostSource(proc=tmp_path).collect({"node_load1": {"p"}})


# =========================================================================== Prometheus, no server
async def test_unreachable_prometheus_raises_source_unavailable_at_once() -> None:
    source = PrometheusSource(f"http://127.0.0.1:{free_port()}", timeout=2.0)
    started = time.monotonic()
    try:
        with pytest.raises(SourceUnavailable, match=r"unreachable.*[Cc]onnection refused"):
            await source.collect({"node_load1": {"p"}})
    finally:
        source.close()
    assert time.monotonic() - started < 1.5  # the client's own retries are off


def test_api_error_tells_query_errors_from_server_errors() -> None:
    body = b'{"status":"error","errorType":"bad_data","error":"1:17: parse error: unclosed"}'
    assert api_error(f"HTTP Status Code 400 ({body!r})") == (
        "bad_data",
        "bad_data: 1:17: parse error: unclosed",
    )
    assert api_error("HTTP Status Code 503 (b'Service Unavailable')") == (
        "",
        "HTTP 503: b'Service Unavailable'",
    )
    assert api_error("something else") == ("", "something else")


# =========================================================================== real Prometheus
def real_collector(url: str, sink: Sink, **kwargs: Any) -> tuple[Collector, PrometheusSource]:
    source = PrometheusSource(url, timeout=2.0)
    return Collector(source, sink.publish, sink.report, **kwargs), source


def samples_of(telemetry: Telemetry, metric: str) -> list[Sample]:
    return [s for s in telemetry.samples if s.metric == metric]


@pytest.mark.slow
async def test_prometheus_node_load1_at_1s_is_fresh_and_labelled(
    prometheus: Daemon, node_exporter: Daemon
) -> None:
    age = "time() - timestamp(node_load1)"
    queries, interval, problems = desired_queries(
        {"p": policy("node_load1", age, "time()", interval="1s")}
    )
    sink = Sink()
    collector, source = real_collector(prometheus.url, sink)
    collector.update(queries, interval)
    try:
        async with running(collector):
            await eventually(lambda: len(sink.published) >= 3, "three snapshots")
    finally:
        source.close()
    assert problems == [] and sink.reports == []
    first, *_, last = sink.published
    assert 1.5 <= last.collected_at - first.collected_at <= 4.0  # every second
    for telemetry in sink.published:
        assert telemetry.source == "prometheus" and telemetry.errors == []
        assert TELEMETRY.decode(encode(telemetry)) == telemetry  # survives the wire
        (load,) = samples_of(telemetry, "node_load1")
        assert load.labels == {"instance": node_exporter.target, "job": "node"}
        assert load.value == pytest.approx(os.getloadavg()[0], abs=2.0)
        assert abs(load.ts - telemetry.collected_at) < 1.0
        (scrape_age,) = samples_of(telemetry, age)  # no __name__: named by the query
        assert scrape_age.labels == {"instance": node_exporter.target, "job": "node"}
        assert 0 <= scrape_age.value < 2.5  # scraped within the last scrape interval or so
        (now,) = samples_of(telemetry, "time()")  # a scalar
        assert now.labels == {} and abs(now.value - telemetry.collected_at) < 1.0
    assert collector.status()["state"] == "up"


@pytest.mark.slow
async def test_prometheus_policies_added_and_removed_change_queries_and_interval(
    prometheus: Daemon,
) -> None:
    contexts: dict[str, dict[str, Any]] = {"a": policy("node_load1", interval="30s")}
    sink = Sink()
    collector, source = real_collector(prometheus.url, sink, default_interval=7.0)

    def apply() -> None:
        queries, interval, problems = desired_queries(contexts)
        assert problems == []
        collector.update(queries, interval)

    apply()
    try:
        async with running(collector):
            await eventually(lambda: len(sink.published) == 1, "the first snapshot")
            assert sink.metrics() == {"node_load1"}
            assert collector.status()["interval"] == 30.0

            contexts["b"] = policy("node_memory_MemAvailable_bytes", interval="1s")
            apply()  # collected at once, not after a's 30 s
            await eventually(lambda: len(sink.published) == 2, "a snapshot for b", within=3)
            assert sink.metrics() == {"node_load1", "node_memory_MemAvailable_bytes"}
            await eventually(lambda: len(sink.published) == 4, "two more snapshots", within=5)
            gap = sink.published[3].collected_at - sink.published[2].collected_at
            assert 0.7 <= gap <= 2.0
            assert collector.status()["queries"] == {
                "node_load1": ["a"],
                "node_memory_MemAvailable_bytes": ["b"],
            }

            del contexts["a"]
            apply()
            count = len(sink.published)
            await eventually(lambda: len(sink.published) >= count + 2, "snapshots without a")
            assert sink.metrics() == {"node_memory_MemAvailable_bytes"}  # node_load1 dropped
            assert collector.status()["interval"] == 1.0

            del contexts["b"]
            apply()
            count = len(sink.published)
            await asyncio.sleep(2.0)
            assert len(sink.published) <= count + 1  # at most one that was in flight
            assert collector.status()["queries"] == {}
            assert collector.status()["interval"] == 7.0
    finally:
        source.close()
    assert sink.reports == []


@pytest.mark.slow
async def test_prometheus_outage_is_reported_once_and_the_collector_recovers(
    prometheus: Daemon,
) -> None:
    sink = Sink()
    collector, source = real_collector(prometheus.url, sink, backoff_initial=0.2, backoff_max=1.0)
    attempts = 0
    collect = source.collect

    async def counting(queries: Mapping[str, Set[str]]) -> tuple[list[Sample], list[QueryError]]:
        nonlocal attempts
        attempts += 1
        return await collect(queries)

    source.collect = counting  # type: ignore[method-assign]
    collector.update(*desired_queries({"p": policy("node_load1", interval="1s")})[:2])
    try:
        async with running(collector) as task:
            await eventually(lambda: len(sink.published) >= 1, "a first snapshot")
            await asyncio.to_thread(prometheus.stop)
            await eventually(lambda: len(sink.reports) == 1, "the outage report", within=5)
            before = attempts
            await eventually(lambda: attempts >= before + 4, "several retries", within=8)
            assert len(sink.reports) == 1  # once per outage, not per retry
            assert collector.status()["state"] == "down"
            assert not task.done()

            published = len(sink.published)
            restarted_at = time.time()
            await asyncio.to_thread(prometheus.start)
            await eventually(lambda: len(sink.reports) == 2, "the recovery report", within=10)
            await eventually(
                lambda: (
                    len(sink.published) > published + 1
                    and sink.published[-1].collected_at > restarted_at
                    and bool(samples_of(sink.published[-1], "node_load1"))
                ),
                "fresh snapshots after the restart",
                within=10,
            )
    finally:
        source.close()
    outage, recovery = sink.reports
    assert (outage.kind, outage.name) == ("telemetry", "prometheus")
    assert "prometheus unavailable: Prometheus at" in outage.message
    assert (recovery.kind, recovery.name) == ("telemetry", "prometheus")
    assert recovery.message.startswith("recovered after ") and recovery.message.endswith("s")
    assert collector.status()["state"] == "up"


@pytest.mark.slow
async def test_prometheus_bad_expression_is_reported_to_its_policy_and_good_ones_still_flow(
    prometheus: Daemon,
) -> None:
    contexts = {
        "good": policy("node_load1", interval="1s"),
        "bad": policy("rate(node_load1[", "node_load1"),
    }
    queries, interval, problems = desired_queries(contexts)
    assert problems == []  # PromQL is checked by Prometheus, not here
    sink = Sink()
    collector, source = real_collector(prometheus.url, sink)
    collector.update(queries, interval)
    try:
        async with running(collector):
            await eventually(lambda: len(sink.published) >= 3, "three snapshots")
    finally:
        source.close()
    for telemetry in sink.published:
        assert len(samples_of(telemetry, "node_load1")) == 1
        (error,) = telemetry.errors
        assert error.query == "rate(node_load1[" and error.policies == ["bad"]
        assert error.message.startswith("bad_data:") and "parse error" in error.message
    (report,) = sink.reports  # once, not every tick; only the policy that asked
    assert (report.kind, report.name) == ("policy", "bad")
    assert "rate(node_load1[" in report.message and "parse error" in report.message
    view = collector.view()
    assert [s["labels"]["job"] for s in view["latest"]["node_load1"]] == ["node"]
    assert "rate(node_load1[" in view["errors"]


@pytest.mark.slow
async def test_prometheus_result_kinds(prometheus: Daemon) -> None:
    source = PrometheusSource(prometheus.url, timeout=2.0)
    try:
        samples, errors = await source.collect(
            {
                "node_load1": {"p"},
                'node_load1{job="node"}': {"p"},  # the same series: kept once
                "sum(node_load1)": {"p"},
                "0/0": {"p"},  # NaN: dropped (JSON cannot carry it)
                "node_load1[1m]": {"q"},  # a range vector is not an instant value
                "no_such_metric": {"p"},  # matches nothing: no samples, no error
            }
        )
    finally:
        source.close()
    assert sorted(s.metric for s in samples) == ["node_load1", "sum(node_load1)"]
    assert [(e.query, e.policies) for e in errors] == [("node_load1[1m]", ["q"])]
    assert "range vector" in errors[0].message


@pytest.mark.slow
async def test_host_source_matches_the_real_node_exporter(node_exporter: Daemon) -> None:
    text = (await asyncio.to_thread(node_exporter.get, "/metrics")).decode()
    exporter: dict[str, set[frozenset[tuple[str, str]]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            exporter.setdefault(sample.name, set()).add(frozenset(sample.labels.items()))
    source = HostSource()
    served = set(source.metric_names())
    core = {
        "node_load1",
        "node_load5",
        "node_load15",
        "node_memory_MemAvailable_bytes",
        "node_memory_MemTotal_bytes",
        "node_cpu_seconds_total",
        "node_boot_time_seconds",
        "node_context_switches_total",
        "node_forks_total",
        "node_intr_total",
        "node_procs_running",
        "node_procs_blocked",
        "node_time_seconds",
    }
    assert core <= served and core <= set(exporter)
    exporter_memory = {n for n in exporter if n.startswith("node_memory_")}
    assert exporter_memory <= served, exporter_memory - served
    samples, errors = await source.collect({name: {"p"} for name in core | exporter_memory})
    assert errors == []
    ours: dict[str, set[frozenset[tuple[str, str]]]] = {}
    for s in samples:
        labels = {k: v for k, v in s.labels.items() if k not in ("instance", "node")}
        ours.setdefault(s.metric, set()).add(frozenset(labels.items()))
    for name in core | exporter_memory:
        assert ours[name] == exporter[name], name  # same label sets (cpu/mode pairs, ...)
