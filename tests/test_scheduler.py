"""Plan Scheduler: strict order, first plan per mechanism wins, redelivery is harmless."""

from __future__ import annotations

import asyncio

import nats

from mlsysops import wire
from tests import loopkit as kit


async def _publish_plan(js, plan_id: str, commands: dict, *, core: bool = False,
                        msg_id: str | None = None, app: str = "_global", policy: str = "p") -> None:
    # "_global": a global policy's plan, valid without any description (a plan for an
    # application with no description is discarded)
    plan = wire.Plan(plan_id=plan_id, app=app, policy=policy, created_at=wire.now(),
                     commands=commands, core=core)
    await js.publish(f"mlsysops.plan.{app}.{policy}", wire.encode(plan),
                     headers={"Nats-Msg-Id": msg_id or plan_id})


def _decisions(events: list[dict]) -> dict[str, dict]:
    return {e["plan_id"]: e for e in events if e["subject"].startswith("mlsysops.decision.")}


async def test_first_plan_wins_and_later_ones_name_the_holder(loop_, cfg, plugin_dirs) -> None:
    log = kit.recorder(plugin_dirs[1])
    loop_.start("scheduler", "executor")
    events: list[dict] = []
    watcher = await kit.collect(cfg.nats_url, events)
    nc = await nats.connect(cfg.nats_url)
    js = nc.jetstream()
    try:
        await kit.wait_for(lambda: kit.scheduler_active(cfg.nats_url), what="active scheduler")
        await _publish_plan(js, "A", {"recorder": {"n": "A", "sleep": 1.5}})
        await _publish_plan(js, "B", {"recorder": {"n": "B"}})
        await _publish_plan(js, "C", {"recorder": {"n": "C", "key": "other"}})
        await _publish_plan(js, "D", {"nope": {"n": "D"}})
        await _publish_plan(js, "E", {"recorder": {"n": "E"}}, core=True)
        await kit.wait_for(lambda: len(_decisions(events)) == 5, what="five decisions")
        got = _decisions(events)
        assert got["A"]["outcome"] == "scheduled"
        assert got["B"]["outcome"] == "discarded" and got["B"]["holder"] == "A"
        assert "held by plan A" in got["B"]["reason"]
        assert got["C"]["outcome"] == "scheduled"  # another conflict key
        assert got["D"]["outcome"] == "discarded"
        assert "'nope' is not loaded" in got["D"]["reason"]
        assert got["E"]["outcome"] == "scheduled" and got["E"]["holder"] == "A"  # core wins
        order = [e["plan_id"] for e in events if e["subject"].startswith("mlsysops.decision.")]
        assert order == ["A", "B", "C", "D", "E"]
        # once A's execution has a terminal result, the mechanism is free again
        await kit.wait_for(lambda: any(e.get("plan_id") == "A" and e["subject"].startswith(
            "mlsysops.result.") for e in events), what="A's result")
        await kit.wait_for(lambda: any(e.get("plan_id") == "E" and e["subject"].startswith(
            "mlsysops.result.") for e in events), what="E's result")
        await _publish_plan(js, "F", {"recorder": {"n": "F"}})
        await kit.wait_for(lambda: "F" in _decisions(events), what="F decided")
        assert _decisions(events)["F"]["outcome"] == "scheduled"
        await kit.wait_for(lambda: len(kit.applied(log)) == 4, what="four applies")
        assert sorted(r["command"]["n"] for r in kit.applied(log)) == ["A", "C", "E", "F"]
    finally:
        await nc.close()
        await watcher.close()


async def test_redelivered_plan_applies_once(loop_, cfg, plugin_dirs) -> None:
    log = kit.recorder(plugin_dirs[1])
    loop_.start("scheduler", "executor")
    events: list[dict] = []
    watcher = await kit.collect(cfg.nats_url, events)
    nc = await nats.connect(cfg.nats_url)
    js = nc.jetstream()
    try:
        await kit.wait_for(lambda: kit.scheduler_active(cfg.nats_url), what="active scheduler")
        # the same plan three times, with different message ids so JetStream keeps all three
        for copy in range(3):
            await _publish_plan(js, "P1", {"recorder": {"n": 1}}, msg_id=f"P1-{copy}")
        await kit.wait_for(lambda: kit.applied(log), what="apply")
        await kit.wait_for(lambda: sum(e["subject"].startswith("mlsysops.decision.")
                                       for e in events) >= 1, what="decision")
        await asyncio.sleep(1.0)
        assert len(kit.applied(log)) == 1
        # the scheduler decided once: the copies re-published the same decision, which
        # JetStream de-duplicated (core subscribers see every copy; the stream keeps one)
        assert await kit.stored(js, "EVENTS", "mlsysops.decision.recorder") == 1
        assert await kit.stored(js, "EXEC", "mlsysops.exec.recorder") == 1
        # an execution request delivered again (say, by a restarted scheduler) is not applied
        request = wire.ExecRequest(exec_id="P1.recorder", plan_id="P1", mechanism="recorder",
                                   command={"n": 1})
        await js.publish("mlsysops.exec.recorder", wire.encode(request),
                         headers={"Nats-Msg-Id": "again"})
        await asyncio.sleep(1.0)
        assert len(kit.applied(log)) == 1
        results = [e for e in events if e["subject"] == "mlsysops.result.recorder"]
        assert {r["outcome"] for r in results} == {"applied"}
    finally:
        await nc.close()
        await watcher.close()


async def test_claims_survive_a_scheduler_restart(loop_, cfg, plugin_dirs) -> None:
    kit.recorder(plugin_dirs[1])
    loop_.start("scheduler", "executor")
    events: list[dict] = []
    watcher = await kit.collect(cfg.nats_url, events)
    nc = await nats.connect(cfg.nats_url)
    js = nc.jetstream()
    try:
        await kit.wait_for(lambda: kit.scheduler_active(cfg.nats_url), what="active scheduler")
        await _publish_plan(js, "L", {"recorder": {"n": "L", "sleep": 8}})
        await kit.wait_for(lambda: "L" in _decisions(events), what="L decided")
        await loop_.stop("scheduler")
        loop_.start("scheduler")
        await _publish_plan(js, "M", {"recorder": {"n": "M"}})
        await kit.wait_for(lambda: "M" in _decisions(events), timeout=20, what="M decided")
        assert _decisions(events)["M"]["outcome"] == "discarded"
        assert _decisions(events)["M"]["holder"] == "L"
    finally:
        await nc.close()
        await watcher.close()
