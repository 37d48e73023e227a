"""The shared consumer under load: it takes only what it can work on, and keeps it alive.

``consume()`` (mlsysops/consumer.py) must fetch no more messages than it has free slots,
and send in-progress acks for every message it holds, so that neither a message waiting
for a slot nor one whose handler outlives the ack wait is redelivered while it is still
being worked on. Through the executor, a redelivery of a live request would report a
completed apply as "interrupted" and free its claim early.

Also here: what the executor reports when an apply's outcome is unknown (cut by a stopped
executor, or abandoned at its deadline), and how soon.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from typing import Any

import nats
import nats.js.api as api
import pytest
from nats.aio.msg import Msg

from mlsysops import wire
from mlsysops.bus import Bus
from mlsysops.consumer import consume
from mlsysops.errors import CallAbandoned
from mlsysops.plugins import Plugin
from tests import loopkit as kit

pytestmark = pytest.mark.timeout(180)

DEADLINE = "apply exceeded its deadline of 1s, was abandoned, and its outcome is unknown"


# --------------------------------------------------------------------------- consume()
class Deliveries:
    """What a test handler saw: each delivery's stream sequence and delivery count."""

    def __init__(self, work: float) -> None:
        self.work = work
        self.seen: list[tuple[int, int]] = []
        self.done: list[int] = []

    async def handler(self, msg: Msg) -> None:
        meta = msg.metadata
        self.seen.append((meta.sequence.stream, meta.num_delivered or 0))
        await asyncio.sleep(self.work)
        await msg.ack()
        self.done.append(meta.sequence.stream)


async def _bus(cfg: Any) -> Bus:
    bus = Bus(cfg, "planner")  # any service: connect() creates the streams
    await bus.connect()
    return bus


async def _publish(bus: Bus, n: int) -> None:
    for i in range(n):
        await bus.js.publish(f"mlsysops.verdict.app-{i}.p", b"{}")


async def _peak_pending(bus: Bus, durable: str, peak: list[int]) -> None:
    """Sample how many messages the consumer has out (delivered, not acked)."""
    stream = bus.subjects.stream("verdicts")
    while True:
        try:
            info = await bus.js.consumer_info(stream, durable)
            peak.append(info.num_ack_pending or 0)
        except Exception:
            pass
        await asyncio.sleep(0.05)


async def _run_consumer(cfg: Any, *, messages: int, concurrency: int, ack_wait: float,
                        work: float) -> tuple[Deliveries, list[int], api.ConsumerInfo]:
    bus = await _bus(cfg)
    seen = Deliveries(work)
    peak: list[int] = []
    try:
        await _publish(bus, messages)
        consumer = asyncio.ensure_future(consume(bus, "verdicts", "load", seen.handler,
                                                 concurrency=concurrency, ack_wait=ack_wait))
        sampler = asyncio.ensure_future(_peak_pending(bus, "load", peak))
        try:
            await kit.wait_for(lambda: len(seen.done) >= messages, timeout=90,
                               what=f"{messages} messages handled")
            await asyncio.sleep(ack_wait * 1.5)  # a late redelivery would show by now
        finally:
            for task in (consumer, sampler):
                task.cancel()
            await asyncio.gather(consumer, sampler, return_exceptions=True)
        info = await bus.js.consumer_info(bus.subjects.stream("verdicts"), "load")
    finally:
        await bus.close()
    return seen, peak, info


async def test_a_handler_slower_than_the_ack_wait_is_not_redelivered(cfg) -> None:
    seen, _, info = await _run_consumer(cfg, messages=3, concurrency=4, ack_wait=1.0,
                                        work=3.0)
    assert [n for _, n in seen.seen] == [1, 1, 1], f"redelivered while handled: {seen.seen}"
    assert sorted(seen.done) == [1, 2, 3]
    assert info.num_redelivered == 0


async def test_a_full_consumer_takes_only_as_many_messages_as_it_has_free_slots(cfg) -> None:
    seen, peak, info = await _run_consumer(cfg, messages=6, concurrency=2, ack_wait=1.0,
                                           work=1.5)
    counts = Counter(seq for seq, _ in seen.seen)
    assert counts == Counter({seq: 1 for seq in range(1, 7)}), (
        f"messages handled more than once: {seen.seen}")
    # It asks for no more than its free slots. A pull that expires on the server just as
    # the client gives up can still deliver one or two late messages (nats.py hands them
    # to the next fetch), and those start at once rather than wait unattended: so the
    # bound is a little above the slots, far below what it held before (every message).
    assert max(peak) <= 4, f"the consumer held {max(peak)} of 6 messages with 2 slots"
    assert info.num_redelivered == 0


async def test_a_durable_made_with_another_ack_wait_gets_the_new_one(cfg) -> None:
    bus = await _bus(cfg)
    try:
        stream = bus.subjects.stream("verdicts")
        await bus.js.add_consumer(stream, api.ConsumerConfig(
            durable_name="old", ack_policy=api.AckPolicy.EXPLICIT, ack_wait=30.0,
            deliver_policy=api.DeliverPolicy.ALL))
        consumer = asyncio.ensure_future(consume(bus, "verdicts", "old", Deliveries(0).handler,
                                                 ack_wait=2.0))

        async def updated() -> bool:
            info = await bus.js.consumer_info(stream, "old")
            return abs((info.config.ack_wait or 0) - 2.0) < 0.01

        try:
            await kit.wait_for(updated, timeout=10, what="the durable's ack wait updated")
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
    finally:
        await bus.close()


# --------------------------------------------------------------------------- the executor
async def _publish_requests(js: Any, plan_ids: list[str], command: dict[str, Any]) -> None:
    async def once() -> bool:  # the executor creates the streams when it connects
        try:
            await js.stream_info("MLSYSOPS_EXEC")
        except Exception:
            return False
        return True

    await kit.wait_for(once, timeout=20, what="the executor's streams")
    for plan_id in plan_ids:
        request = wire.ExecRequest(exec_id=f"{plan_id}.recorder", plan_id=plan_id,
                                   mechanism="recorder", command=dict(command), app="a",
                                   policy="p")
        await js.publish("mlsysops.exec.recorder", wire.encode(request),
                         headers={"Nats-Msg-Id": plan_id})


async def _results(url: str) -> list[dict[str, Any]]:
    """Every result the events stream keeps (JetStream drops de-duplicated copies)."""
    from tests.faults.harness import read_stream

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        return [r for _, r in await read_stream(js, "MLSYSOPS_EVENTS", "mlsysops.result.>")]
    finally:
        await nc.close()


async def _ledger(js: Any, key: str) -> wire.LedgerEntry:
    kv = await js.key_value("mlsysops-ledger")
    return wire.LEDGER.decode((await kv.get(key)).value or b"")


async def test_a_full_executor_never_reports_a_completed_apply_as_interrupted(
        loop_, cfg, plugin_dirs, monkeypatch) -> None:
    """More requests than the executor's 16 slots, each apply longer than the ack wait."""
    import services.executor.service as executor

    monkeypatch.setattr(executor, "ACK_WAIT", 1.0)
    log = kit.recorder(plugin_dirs[1])
    loop_.start("executor")
    plans = [f"F{i}" for i in range(20)]
    nc = await nats.connect(cfg.nats_url)
    try:
        js = nc.jetstream()
        await _publish_requests(js, plans, {"sleep": 2.5})
        await kit.wait_for(lambda: len(kit.applied(log)) >= len(plans), timeout=40,
                           what="every apply finished")
        await asyncio.sleep(2.0)  # results, and any late redelivery
        results = await _results(cfg.nats_url)
        assert {r["plan_id"]: (r["outcome"], r["error"]) for r in results} == {
            p: ("applied", "") for p in plans}
        assert Counter(r["command"]["_plan_id"] for r in kit.applied(log)) == Counter(plans)
        info = await js.consumer_info("MLSYSOPS_EXEC", "executor")
        assert info.num_redelivered == 0
        for p in plans:
            assert (await _ledger(js, f"{p}.recorder")).state == "applied"
    finally:
        await nc.close()


async def test_an_apply_cut_by_a_stopped_executor_is_reported_unknown_within_seconds(
        loop_, cfg, plugin_dirs) -> None:
    log = kit.recorder(plugin_dirs[1])
    loop_.start("executor")
    nc = await nats.connect(cfg.nats_url)
    try:
        js = nc.jetstream()
        await _publish_requests(js, ["CUT"], {"sleep": 20})

        async def started() -> bool:
            try:
                return (await _ledger(js, "CUT.recorder")).state == "started"
            except Exception:
                return False

        await kit.wait_for(started, timeout=20, what="apply started")
        await asyncio.sleep(1.5)  # past the first in-progress acks
        await loop_.stop("executor")
        stopped = time.monotonic()
        loop_.start("executor")
        await kit.wait_for(lambda: kit.stored(js, "EVENTS", "mlsysops.result.recorder"),
                           timeout=12, what="the cut execution's result")
        reported = time.monotonic() - stopped
        (result,) = await _results(cfg.nats_url)
        assert result["outcome"] == "unknown"
        assert result["error"].startswith("interrupted: the executor stopped during apply; "
                                          "the outcome is unknown")
        entry = await _ledger(js, "CUT.recorder")
        assert (entry.state, entry.error) == ("unknown", result["error"])
        assert kit.applied(log) == []
        assert reported < 10
    finally:
        await nc.close()


@pytest.mark.parametrize("how", ["deadline", "CallAbandoned"])
async def test_an_apply_abandoned_at_its_deadline_is_reported_unknown(
        loop_, cfg, plugin_dirs, monkeypatch, how) -> None:
    if how == "CallAbandoned":  # as plugins.py raises it for an overrun call
        original = Plugin.call

        async def call(self: Plugin, name: str, *args: Any, **kwargs: Any) -> Any:
            if name == "apply":
                await asyncio.sleep(1.0)
                raise CallAbandoned(self.name, DEADLINE)
            return await original(self, name, *args, **kwargs)

        monkeypatch.setattr(Plugin, "call", call)
    log = kit.recorder(plugin_dirs[1])
    loop_.cfg = dataclasses.replace(cfg, apply_timeout=1.0)
    loop_.start("executor")
    events: list[dict[str, Any]] = []
    watcher = await kit.collect(cfg.nats_url, events, ("result", "error"))
    nc = await nats.connect(cfg.nats_url)
    try:
        js = nc.jetstream()
        await _publish_requests(js, ["AB"], {"sleep": 5})
        await kit.wait_for(lambda: kit.stored(js, "EVENTS", "mlsysops.result.recorder"),
                           timeout=20, what="the abandoned execution's result")
        (result,) = await _results(cfg.nats_url)
        assert (result["outcome"], result["error"]) == ("unknown", DEADLINE)
        entry = await _ledger(js, "AB.recorder")
        assert (entry.state, entry.error) == ("unknown", DEADLINE)
        await kit.wait_for(lambda: any(e["subject"] == "mlsysops.error.mechanism.recorder"
                                       for e in events), timeout=5, what="the error event")
        error = next(e for e in events if e["subject"] == "mlsysops.error.mechanism.recorder")
        assert error["message"] == DEADLINE
        assert kit.applied(log) == []
    finally:
        await nc.close()
        await watcher.close()
