"""The Monitor scaled out: one collector, every wish, descriptions in publish order.

Two monitor replicas must behave like the single Monitor of the specification: one
telemetry snapshot per interval (policies that analyse on telemetry would otherwise run
twice), the telemetry every context asks for (every application of every policy), the
last *published* description kept whichever replica validated what, and a description
published with no reply while no monitor ran taken in when one comes up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats
import pytest
import yaml

from mlsysops import runtime, wire
from mlsysops import settings as settings_mod
from mlsysops.bus import Bus
from services.analyzer.service import Analyzer
from services.monitor.service import Monitor
from tests import loopkit as kit


class Replicas:
    """Services run as named replicas in this event loop."""

    def __init__(self, cfg: settings_mod.Settings) -> None:
        self.cfg = cfg
        self.tasks: dict[str, asyncio.Task[int]] = {}

    def start(self, instance: str, build: type = Monitor, **overrides: Any) -> None:
        settings = settings_mod.Settings(**{**self.cfg.__dict__, "instance": instance,
                                            **overrides})
        name = "monitor" if build is Monitor else "analyzer"
        self.tasks[instance] = asyncio.ensure_future(runtime.run(Bus(settings, name), build))

    async def stop(self, instance: str) -> None:
        task = self.tasks.pop(instance)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


@pytest.fixture
async def replicas(cfg: settings_mod.Settings) -> AsyncIterator[Replicas]:
    layout = Bus(cfg, "monitor")  # streams and buckets, as any service creates them
    await layout.connect()
    await layout.close()
    group = Replicas(cfg)
    yield group
    for instance in list(group.tasks):
        await group.stop(instance)


async def _put_context(url: str, key: str, telemetry: dict[str, Any] | None) -> None:
    """A policy context as the analyzer stores it, asking for ``telemetry``."""
    context = {"configuration": {"analyze_interval": "10s"}}
    if telemetry is not None:
        context["telemetry"] = telemetry  # type: ignore[assignment]
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value("mlsysops-context")
        await kv.put(key, wire.encode(wire.ContextRecord(context=context)))
    finally:
        await nc.close()


async def _snapshots(url: str, seconds: float) -> list[dict[str, Any]]:
    """The telemetry snapshots published during ``seconds``."""
    seen: list[dict[str, Any]] = []
    nc = await nats.connect(url)
    try:
        async def cb(msg: Any) -> None:
            seen.append(json.loads(msg.data))

        await nc.subscribe("mlsysops.telemetry.>", cb=cb)
        await asyncio.sleep(seconds)
    finally:
        await nc.close()
    return seen


async def _collector_status(url: str) -> dict[str, Any]:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value("mlsysops-status")
        try:
            return json.loads((await kv.get("telemetry")).value or b"{}")  # type: ignore[no-any-return]
        except Exception:
            return {}
    finally:
        await nc.close()


async def _stored_spec(url: str, name: str) -> dict[str, Any] | None:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value("mlsysops-desc")
        try:
            entry = await kv.get(f"app.{name}")
        except Exception:
            return None
        return json.loads(entry.value or b"{}")["spec"]  # type: ignore[no-any-return]
    finally:
        await nc.close()


def _app(name: str, tag: str, padding: int = 0) -> bytes:
    """An application whose image tag says which publication it is; ``padding`` env
    variables make it large (validated off the event loop, so slower)."""
    container: dict[str, Any] = {"image": f"registry.local/demo:{tag}"}
    if padding:
        container["env"] = [{"name": f"V{i}", "value": "x" * 40} for i in range(padding)]
    doc = {"MLSysOpsApp": {"name": name, "components": [
        {"metadata": {"name": "c0"}, "containers": [container]}]}}
    return yaml.safe_dump(doc).encode()


def _tag(spec: dict[str, Any] | None) -> str:
    if spec is None:
        return "<none>"
    image = spec["components"][0]["containers"][0]["image"]
    return str(image).rsplit(":", 1)[-1]


# ----------------------------------------------------------------------------- collection
@pytest.mark.slow
async def test_two_monitors_publish_one_snapshot_per_interval(cfg, replicas) -> None:
    await _put_context(cfg.nats_url, "watcher.shop",
                       {"metrics": ["node_load1"], "system_scrape_interval": "1s"})
    replicas.start("monitor-a")
    replicas.start("monitor-b")
    await kit.wait_for(lambda: _collector_status(cfg.nats_url), timeout=20,
                       what="a collecting monitor")
    seen = await _snapshots(cfg.nats_url, 6.0)
    # one collector: about six snapshots in six seconds; two collectors give about twelve
    assert 3 <= len(seen) <= 7, [s["id"] for s in seen]


@pytest.mark.slow
async def test_when_the_collecting_monitor_stops_the_other_collects(cfg, replicas) -> None:
    await _put_context(cfg.nats_url, "watcher.shop",
                       {"metrics": ["node_load1"], "system_scrape_interval": "1s"})
    replicas.start("monitor-a")
    status = await kit.wait_for(lambda: _collector_status(cfg.nats_url), timeout=20,
                                what="monitor-a collecting")
    assert status["collector"] == "monitor-a"
    replicas.start("monitor-b")
    await asyncio.sleep(2)
    await replicas.stop("monitor-a")
    seen = await _snapshots(cfg.nats_url, 5.0)
    assert len(seen) >= 2  # taken over at once (the lease is released on stop)
    status = await _collector_status(cfg.nats_url)
    assert status["collector"] == "monitor-b"


@pytest.mark.slow
async def test_a_metric_asked_for_by_one_application_only_is_collected(cfg, replicas) -> None:
    # one policy, two applications: only the second application's context asks for memory
    await _put_context(cfg.nats_url, "watcher.first", {"metrics": ["node_load1"],
                                                       "system_scrape_interval": "1s"})
    await _put_context(cfg.nats_url, "watcher.second",
                       {"metrics": ["node_memory_MemAvailable_bytes"]})
    replicas.start("monitor-a")

    async def both() -> list[str]:
        snaps = await _snapshots(cfg.nats_url, 1.5)
        metrics = {s["metric"] for snap in snaps for s in snap["samples"]}
        return sorted(metrics) if {"node_load1", "node_memory_MemAvailable_bytes"} <= metrics \
            else []

    await kit.wait_for(both, timeout=20, what="both applications' metrics in the snapshots")

    async def asked() -> dict[str, Any]:
        return (await _collector_status(cfg.nats_url)).get("queries", {})

    queries = await kit.wait_for(asked, timeout=10, what="the collector's status")
    assert queries == {"node_load1": ["watcher"], "node_memory_MemAvailable_bytes": ["watcher"]}


@pytest.mark.slow
async def test_a_wish_added_at_run_time_is_followed(cfg, replicas) -> None:
    await _put_context(cfg.nats_url, "watcher.first", {"metrics": ["node_load1"],
                                                       "system_scrape_interval": "1s"})
    replicas.start("monitor-a")
    await kit.wait_for(lambda: _collector_status(cfg.nats_url), timeout=20, what="collection")
    await _put_context(cfg.nats_url, "other.shop", {"metrics": ["node_memory_MemAvailable_bytes"]})

    async def followed() -> bool:
        status = await _collector_status(cfg.nats_url)
        return "node_memory_MemAvailable_bytes" in status.get("queries", {})

    await kit.wait_for(followed, timeout=10, what="the new wish collected")


# ----------------------------------------------------------------------------- descriptions
@pytest.mark.slow
async def test_concurrent_updates_keep_the_last_published_description(cfg, replicas) -> None:
    replicas.start("monitor-a")
    replicas.start("monitor-b")
    await kit.publish_desc(cfg.nats_url, "app", "warmup", _app("warmup", "0"))
    names = [f"shop{i}" for i in range(8)]
    nc = await nats.connect(cfg.nats_url)
    try:
        for name in names:  # a large (slow to validate) version, at once a small newer one
            await nc.publish(f"mlsysops.desc.app.{name}", _app(name, "old", padding=3000))
            await nc.publish(f"mlsysops.desc.app.{name}", _app(name, "new"))
        await nc.flush()
    finally:
        await nc.close()

    async def settled() -> dict[str, str]:
        tags = {name: _tag(await _stored_spec(cfg.nats_url, name)) for name in names}
        return tags if "<none>" not in tags.values() else {}

    await kit.wait_for(settled, timeout=60, what="every application stored")
    await asyncio.sleep(3)  # anything still being validated lands meanwhile
    tags = {name: _tag(await _stored_spec(cfg.nats_url, name)) for name in names}
    assert tags == dict.fromkeys(names, "new")


@pytest.mark.slow
async def test_a_description_published_while_no_monitor_runs_is_taken_in_later(
        cfg, replicas) -> None:
    replicas.start("analyzer-a", Analyzer)  # the loop runs, but no monitor
    await asyncio.sleep(1)
    nc = await nats.connect(cfg.nats_url)
    try:
        await nc.publish("mlsysops.desc.app.late", _app("late", "1"))  # plain pub, no reply
        await nc.flush()
    finally:
        await nc.close()
    await asyncio.sleep(1)
    assert await _stored_spec(cfg.nats_url, "late") is None
    replicas.start("monitor-a")
    spec = await kit.wait_for(lambda: _stored_spec(cfg.nats_url, "late"), timeout=20,
                              what="the description taken in")
    assert _tag(spec) == "1"


@pytest.mark.slow
async def test_every_outcome_is_announced_also_for_a_plain_publication(cfg, replicas) -> None:
    replicas.start("monitor-a")
    await kit.publish_desc(cfg.nats_url, "app", "warmup", _app("warmup", "0"))
    outcomes: list[wire.DescReply] = []
    nc = await nats.connect(cfg.nats_url)
    try:
        async def cb(msg: Any) -> None:
            outcomes.append(msgspec.json.decode(msg.data, type=wire.DescReply))

        await nc.subscribe("mlsysops.desc_result.>", cb=cb)
        await nc.publish("mlsysops.desc.app.bad", b"MLSysOpsApp: {name: bad}")
        await nc.publish("mlsysops.desc.app.good", _app("good", "1"))
        await kit.wait_for(lambda: len(outcomes) >= 2, timeout=10, what="two outcomes")
    finally:
        await nc.close()
    by_name = {o.name: o for o in outcomes}
    assert not by_name["bad"].accepted and by_name["bad"].errors
    assert by_name["good"].accepted and by_name["good"].seq > by_name["bad"].seq
